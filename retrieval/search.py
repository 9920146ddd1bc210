"""Cross-modal search over a library: text→image, image→image, text/image→caption, mixtures.

A query is a weighted sum of unit vectors (texts and images; `--not` terms have negative
weights), normalised again: q = normalise(Σ wᵢ·vᵢ). Candidates come from the FAISS index and are
re-scored exactly: on float16 codes (Flat and IVF up to the compressed tier) a few more than
wanted, from the vectors the index gives back; on compressed codes many more, from the store's
vectors (float32 indexes of older libraries score exactly already); then filtered
(--under, --threshold, the query image itself, --dedup) and cut to --offset/--top.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from index import Library
from index.embedder import Embedder
from index.errors import EmptyLibrary, NotFound, UsageProblem
from index.photo_meta import iso_time
from index.scan import Decoded, DecodeFailure, decode_file, decode_image
from index.vectors import VectorIndex

from .filters import Filters, MetaFrame
from .query import (
    Hit,
    ImageBytes,
    ImagePath,
    IndexedImage,
    Query,
    RawVector,
    SearchResult,
    Term,
    TextSource,
    terms_from,
)

if TYPE_CHECKING:
    from .expansion import Expanders, Expansion, SavedExpanders

__all__ = ["Searcher", "build_terms"]

DEDUP_COSINE = 0.985  # images closer than this to a better-ranked hit are near-duplicates
KIND_OF_TARGET = {"images": "image", "captions": "caption"}
# A metadata filter that keeps at most this many vectors is answered exactly: their vectors,
# read from the index, scored against the query (bench/filters.py: ~N ms for 10k at 1M);
# more go through the index with an IDSelectorBatch (exact on Flat; on IVF with nprobe raised
# by the share kept). Both return what exact filtered search returns on a Flat index.
EXACT_FILTER_MAX = 20_000
# `under` a folder with at most this many images: their ids come from the store's path index
# and restrict the search up front (a watched folder of 10 photos in a 1M library took 25 s
# as a filter on the hits: every path was fetched); a bigger folder filters the hits.
UNDER_IDS_MAX = EXACT_FILTER_MAX


def build_terms(texts: Sequence[str] = (), images: Sequence[str] = (),
                negatives: Sequence[str] = ()) -> tuple[Term, ...]:
    """Terms from CLI-style strings, each with an optional `W:` weight prefix."""
    return terms_from(texts, images=images, negatives=negatives, paths_in_negatives=True)


class Searcher:
    """Answers queries against one library, keeping its vector indexes warm between queries.

    Every query, from the CLI, Python or HTTP, goes one way: terms (texts, image files, image
    bytes, indexed images, raw vectors) → `query_vector` → `search_vector` → hits.
    """

    def __init__(self, library: Library, *, precision: str | None = None,
                 mmap: bool = False, notify: Callable[[str], None] | None = None,
                 expanders: "SavedExpanders | None" = None) -> None:
        """Args:
            library: the library to read (opened with `create=False` by `open`).
            precision: the query encoder's (default: the library's Settings).
            mmap: map index files instead of loading them (one-shot queries).
            notify: receives warnings for the user (e.g. from query expansion).
            expanders: expansion maps to use instead of those `clipdex prior train` saved.
        """
        self.library = library
        self.precision = precision or library.settings.precision
        self.mmap = mmap
        self.notify = notify
        self._indexes: dict[str, VectorIndex] = {}
        self._frame: tuple[tuple, MetaFrame] | None = None
        self._caption_links: tuple[tuple, tuple[np.ndarray, np.ndarray]] | None = None
        self._saved_expanders = expanders
        self._expanders: "Expanders | None" = None

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, *, db: str | None = None,
             **options) -> "Searcher":
        """Open a library for reading (nothing is created: a missing one is NoLibrary);
        `options` are the constructor's."""
        return cls(Library.open(home, db=db, create=False), **options)

    def close(self) -> None:
        self.library.close()

    @property
    def embedder(self) -> Embedder:
        if self.library.model is None:
            raise EmptyLibrary(f"the library at {self.library.settings.home} is empty: add "
                               f"images with `clipdex index PATH` first")
        return self.library.query_embedder(precision=self.precision, notify=self.notify)

    def index_for(self, target: str) -> VectorIndex:
        """The target's vector index, caught up with the store (in memory) when it changed."""
        kind = KIND_OF_TARGET[target]
        vi = self._indexes.get(kind)
        if vi is None:
            vi = self._indexes[kind] = self.library.vector_index(kind, mmap=self.mmap)
        else:
            vi.catch_up(self.library.store)
        return vi

    # --- the API ----------------------------------------------------------------------------
    def search(self, text: str | Sequence[str] | None = None, *,
               image: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
               negatives: Sequence[str] = (), target: str = "images", k: int = 10,
               offset: int = 0, threshold: float | None = None,
               under: str | os.PathLike | None = None,
               dedup: bool = False, expand: "Expansion | str | None" = None,
               filters: Filters | None = None, sort: str = "relevance",
               **filter_values) -> SearchResult:
        """Search with texts and/or images (each may carry a `W:` weight prefix), narrowed by
        photo metadata; with filters and no text or image, list the matching photos by date.

        Args:
            text: one query text or several.
            image: one image path or several (need not be in the library).
            negatives: texts (or image paths) to steer away from.
            target: "images" or "captions".
            k: how many hits; offset: how many best hits to skip (paging).
            threshold: drop hits scoring below this cosine similarity.
            under: keep only images (or captions linked to images) below this folder, which
                must exist (UsageProblem otherwise); a symlinked folder also keeps what lies
                below its target.
            dedup: collapse near-identical images (or identical caption texts).
            expand: move the text query towards the image side first: a method name
                ("contrastive", "prior", "meanshift", "ridge", "pixels") or an Expansion.
            filters: a ready `Filters`, or the values to parse as keywords: after, before
                (ISO dates or times, the camera's clock; after inclusive, before exclusive),
                year, month ("2024-06"), camera, place (country, region or city), near
                ("LAT,LON[,KM]"), types ("jpeg", ["png", "heic"]), tags (zero-shot tags
                from `clipdex tag`, all must match). Captions are filtered by their linked
                image.
            sort: "relevance" (default), "date" (oldest first) or "-date" (newest first).
                With a query, the k hits relevance picks (after offset) are put in date
                order; with filters alone, photos are listed newest first unless "date".
        Returns:
            A SearchResult with the parsed query and the hits, best first.
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [image] if isinstance(image, (str, os.PathLike)) else list(image or [])
        terms = build_terms(texts, [str(p) for p in images], negatives)
        expansion = _expansion(expand)
        if filters is None:
            filters = Filters.parse(**filter_values)
        elif filter_values:
            raise TypeError("give `filters` or filter keywords, not both")
        query = Query(terms, target=target, k=k, offset=offset, threshold=threshold,
                      under=_under_folder(under), dedup=dedup,
                      expand=expansion.method if expansion else None, filters=filters,
                      sort=sort)
        return self.run(query, expansion=expansion)

    def caption(self, image: str | os.PathLike, *, k: int = 5) -> SearchResult:
        """The captions closest to an image (which need not be in the library)."""
        return self.search(image=image, target="captions", k=k)

    def run(self, query: Query, *, expansion: "Expansion | None" = None) -> SearchResult:
        """Answer a parsed query: its vector, expanded when asked, searched in its target."""
        if query.browse:
            return self.browse(query)
        if expansion is not None:
            return self.expanders.search(query, expansion)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        vector, exclude = self.query_vector(query.terms)
        timings["encode"] = (time.perf_counter() - t0) * 1000
        return self.search_vector(vector, query, exclude=exclude, timings=timings)

    @property
    def expanders(self) -> "Expanders":
        """Query expansion's maps, loaded on the first expanded query (never for plain ones)."""
        if self._expanders is None:
            from .expansion.expanders import Expanders

            self._expanders = Expanders(self, notify=self.notify, saved=self._saved_expanders)
        return self._expanders

    # --- steps ------------------------------------------------------------------------------
    def query_vector(self, terms: Sequence[Term]) -> tuple[np.ndarray, set[int]]:
        """q = normalise(Σ wᵢ·vᵢ) over the terms, and the ids of indexed images that are a
        positive query image itself (never returned as its own hit)."""
        embedder = self.embedder
        total = np.zeros(embedder.dim, np.float64)  # float32 squares overflow at 1e19
        exclude: set[int] = set()
        texts = [t for t in terms if isinstance(t.source, TextSource)]
        if texts:
            vectors = embedder.encode_texts([t.source.text for t in texts])
            total += (np.array([t.weight for t in texts])[:, None] * vectors).sum(0)
        for term in (t for t in terms if not isinstance(t.source, TextSource)):
            vector, same = self._source_vector(term.source, embedder)
            total += term.weight * vector
            if term.weight > 0:
                exclude |= same
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise UsageProblem("the query terms cancel out (their weighted sum is zero)")
        return (total / norm).astype(np.float32), exclude

    def _source_vector(self, source, embedder: Embedder) -> tuple[np.ndarray, set[int]]:
        """One non-text term's unit vector, and the indexed images it is a copy of."""
        store = self.library.store
        if isinstance(source, IndexedImage):
            stored = store.vectors_for("image", [source.image_id])
            if source.image_id not in stored:
                raise NotFound(f"no image with id {source.image_id} in this library")
            return stored[source.image_id], {source.image_id}
        if isinstance(source, RawVector):
            return _raw_vector(source.values, embedder.dim), set()
        if isinstance(source, ImagePath):
            decoded = _decode_query_image(source.path, embedder.image_size)
        elif isinstance(source, ImageBytes):
            decoded = source.decoded or _decode_query_bytes(source.data, embedder.image_size)
        else:
            raise TypeError(f"unknown query source {source!r}")
        vector = embedder.encode_images([decoded.image])[0]
        return vector, store.ids_with_hash(decoded.content_hash)

    def search_vector(self, vector: np.ndarray, query: Query, *, exclude: set[int] = frozenset(),
                      timings: dict | None = None) -> SearchResult:
        """Search with a ready query vector (used by the HTTP API and expansion too)."""
        timings = {} if timings is None else timings
        vi = self.index_for(query.target)
        if vi.size == 0:
            raise EmptyLibrary(f"no {query.target} in this library yet" + (
                ": add some with `clipdex captions add FILE`" if query.target == "captions"
                else ": index a folder with `clipdex index PATH`"))
        t0 = time.perf_counter()
        allowed = self.allowed_ids(query.target, query.filters)
        if query.target == "images":
            allowed = _both(allowed, self._ids_under(query.under))
        timings["filter"] = (time.perf_counter() - t0) * 1000
        want = query.offset + query.k
        filtering = query.under or query.threshold is not None or query.dedup
        pool = vi.size if allowed is None else len(allowed)
        if pool == 0:
            return SearchResult(query, (), timings)
        t0 = time.perf_counter()
        if allowed is not None and len(allowed) <= EXACT_FILTER_MAX:
            candidates = self._exact_among(vi, vector, allowed)
        else:
            def candidates(fetch: int) -> tuple[np.ndarray, np.ndarray]:
                # compressed codes: more candidates than wanted, re-scored exactly
                scores, ids = vi.search(vector[None, :], vi.rescore_depth(fetch), among=allowed)
                scores, ids = self._rescore(vi, vector, scores[0], ids[0])
                return scores[:fetch], ids[:fetch]
        timings["search"] = (time.perf_counter() - t0) * 1000  # reading allowed vectors
        timings["hydrate"] = 0.0
        fetch = min((want + len(exclude)) * (4 if filtering else 1), pool)
        while True:
            t0 = time.perf_counter()
            scores, ids = candidates(fetch)
            timings["search"] += (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            hits = self._filter(self._hydrate(query.target, ids, scores), query, exclude, vi)
            timings["hydrate"] += (time.perf_counter() - t0) * 1000
            if len(hits) >= want or fetch >= pool:
                break
            fetch = min(fetch * 4, pool)
        hits = self._with_meta(hits[query.offset:want], query.sort)
        return SearchResult(query, tuple(hits), timings)

    def _exact_among(self, vi: VectorIndex, vector: np.ndarray, allowed: np.ndarray):
        """The allowed vectors, read once from the index (else the store), scored exactly
        against the query; candidates are their best `fetch`. FAISS's own exact k-NN scores
        them: numpy's BLAS threads right after FAISS's OpenMP ones were seen to run far slower
        on 2 cores (bench/filters.py while writing it: ~8 ms instead of 0.07 for 2000 × 512)."""
        import faiss

        try:
            vectors = vi.vectors(allowed)
        except RuntimeError:  # an index that cannot reconstruct: the store has them all
            stored = self.library.store.vectors_for(vi.kind, allowed.tolist())
            vectors = np.stack([stored[int(i)] for i in allowed])
        query = np.ascontiguousarray(vector[None, :], np.float32)

        def candidates(fetch: int) -> tuple[np.ndarray, np.ndarray]:
            scores, rows = faiss.knn(query, vectors, min(fetch, len(allowed)),
                                     metric=faiss.METRIC_INNER_PRODUCT)
            keep = rows[0] >= 0
            return scores[0][keep], allowed[rows[0][keep]]
        return candidates

    # --- photo metadata -----------------------------------------------------------------------
    def meta_frame(self) -> MetaFrame:
        """Every image's filterable metadata, loaded once and again when the library changes."""
        store = self.library.store
        key = store.meta_generation()
        if self._frame is None or self._frame[0] != key:
            self._frame = (key, MetaFrame(store.meta_columns(), store.tag_ids()))
        return self._frame[1]

    def allowed_ids(self, target: str, filters: Filters) -> np.ndarray | None:
        """The ids (of `target`'s kind) the filters keep; None when there are no filters."""
        if not filters.active:
            return None
        frame = self.meta_frame()
        if not frame.has_meta and len(frame):
            raise UsageProblem(
                "this library has no photo metadata yet: run `clipdex index` on its folders "
                "once more (metadata is read from the files; nothing is re-embedded)")
        if filters.tags:
            _check_tags(filters.tags, frame.tags)
        images = frame.select(filters)
        if target == "images":
            return images
        store = self.library.store
        key = (store.generation("caption"), store.generation("image"))
        if self._caption_links is None or self._caption_links[0] != key:
            self._caption_links = (key, store.caption_links())
        caption_ids, image_ids = self._caption_links[1]
        return caption_ids[np.isin(image_ids, images)]

    def _ids_under(self, under: str | None) -> np.ndarray | None:
        """The ids of the images below `under` when few (UNDER_IDS_MAX), else None: the
        hits are then filtered by path as they come."""
        if not under:
            return None
        return self.library.store.image_ids_under(list(_folder_prefixes(under)), UNDER_IDS_MAX)

    def browse(self, query: Query) -> SearchResult:
        """The images the filters keep, by capture time (newest first unless sort="date")."""
        t0 = time.perf_counter()
        frame = self.meta_frame()
        if not len(frame):
            raise EmptyLibrary(f"the library at {self.library.settings.home} is empty: add "
                               f"images with `clipdex index PATH` first")
        ids = self.allowed_ids("images", query.filters) if query.filters.active else frame.ids
        ids = _both(ids, self._ids_under(query.under))
        taken = frame.taken_of(ids) if len(ids) != len(frame.ids) else frame.taken
        # newest first: by -time, undated last, then by id; oldest first: by time, then id
        dated = np.where(np.isnan(taken), np.inf if query.sort == "date" else -np.inf, taken)
        order = np.lexsort((ids, dated)) if query.sort == "date" else \
            np.lexsort((ids, -dated))
        ranked = ids[order]
        timings = {"filter": (time.perf_counter() - t0) * 1000}
        want = query.offset + query.k
        fetch = min(want * (4 if query.under or query.dedup else 1), len(ranked))
        vi = self.index_for("images") if query.dedup else None
        while True:
            chosen = ranked[:fetch]
            paths = self.library.store.image_paths(chosen.tolist())
            hits = [Hit(int(i), None, "image", paths[int(i)], None, int(i))
                    for i in chosen if int(i) in paths]
            hits = self._filter(hits, query, set(), vi)
            if len(hits) >= want or fetch >= len(ranked):
                break
            fetch = min(fetch * 4, len(ranked))
        hits = self._with_meta(hits[query.offset:want], "keep")
        timings["hydrate"] = (time.perf_counter() - t0) * 1000 - timings["filter"]
        shown = query if query.sort != "relevance" else replace(query, sort="-date")
        return SearchResult(shown, tuple(hits), timings)

    def _with_meta(self, hits: list[Hit], sort: str) -> list[Hit]:
        """The hits with their (linked) image's metadata, in `sort` order ("keep": as given)."""
        store = self.library.store
        if not hits or not store.has_meta_table:
            return hits
        image_ids = [h.image_id for h in hits if h.image_id is not None]
        raw = store.image_meta(image_ids)
        tags = store.image_tags(image_ids)
        hits = [replace(h, meta={**_meta_out(raw[h.image_id]), "tags": [
                    {"group": g, "label": label, "score": round(score, 4)}
                    for g, label, score in tags.get(h.image_id, [])]})
                if h.image_id in raw else h for h in hits]
        if sort in ("date", "-date"):
            def when(hit: Hit) -> float:
                value = raw.get(hit.image_id, {}).get("taken_at")
                return value if value is not None else math.inf * (1 if sort == "date" else -1)
            hits.sort(key=when, reverse=sort == "-date")  # stable: ties keep relevance order
        return hits

    def _rescore(self, vi: VectorIndex, vector: np.ndarray, scores: np.ndarray,
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        if vi.exact_scores or not len(ids):  # float32 codes: FAISS's scores are already exact
            return scores, ids
        if vi.keeps_vectors:  # float16 codes: the store's vectors, given back by the index
            vectors = vi.vectors(ids)
        else:
            stored = self.library.store.vectors_for(vi.kind, ids.tolist())
            ids = np.array([i for i in ids if int(i) in stored], np.int64)  # gone: dropped
            if not len(ids):
                return np.empty(0, np.float32), ids
            vectors = np.stack([stored[int(i)] for i in ids])
        exact = vectors @ np.asarray(vector, np.float32)
        order = np.argsort(-exact, kind="stable")
        return exact[order].astype(np.float32), ids[order]

    def _hydrate(self, target: str, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        id_list = [int(i) for i in ids]
        store = self.library.store
        if target == "images":
            paths = store.image_paths(id_list)
            return [Hit(i, float(sc), "image", paths[i], None, i)
                    for i, sc in zip(id_list, scores) if i in paths]
        captions = store.captions(id_list)
        return [Hit(i, float(sc), "caption", captions[i].path, captions[i].text,
                    captions[i].image_id)
                for i, sc in zip(id_list, scores) if i in captions]

    def _filter(self, hits: list[Hit], query: Query, exclude: set[int],
                vi: VectorIndex) -> list[Hit]:
        out = []
        prefixes = _folder_prefixes(query.under) if query.under else None
        for hit in hits:
            if hit.kind == "image" and hit.id in exclude:
                continue
            if query.threshold is not None and hit.score is not None and \
                    hit.score < query.threshold:
                break  # hits are sorted: the rest score lower still
            if prefixes and not (hit.path or "").startswith(prefixes):
                continue
            out.append(hit)
        return self._dedup(out, vi) if query.dedup else out

    def _dedup(self, hits: list[Hit], vi: VectorIndex) -> list[Hit]:
        if not hits:
            return hits
        if hits[0].kind == "caption":
            seen: set[str] = set()
            return [h for h in hits if not (h.text in seen or seen.add(h.text))]  # type: ignore
        stored = self.library.store.vectors_for("image", [h.id for h in hits])
        kept: list[Hit] = []
        kept_vectors: list[np.ndarray] = []
        for hit in hits:
            v = stored[hit.id]
            if kept_vectors and float(np.max(np.stack(kept_vectors) @ v)) >= DEDUP_COSINE:
                continue
            kept.append(hit)
            kept_vectors.append(v)
        return kept


def _check_tags(wanted: Sequence[str], known: dict) -> None:
    """A tag no image has is a usage error naming the ones there are (not "no results")."""
    if not known:
        raise UsageProblem("this library has no tags yet: run `clipdex tag` first")
    missing = [t for t in wanted if t not in known]
    if missing:
        some = ", ".join(sorted(known, key=lambda t: -len(known[t]))[:12])
        raise UsageProblem(f"--tag: no image is tagged {missing[0]!r}; tags here: {some}")


def _meta_out(row: dict) -> dict:
    """A stored metadata row as hits carry it (`meta` in --json and the HTTP API)."""
    place = ", ".join(dict.fromkeys(p for p in (row.get("city"), row.get("region"),
                                                row.get("country")) if p)) or None
    return {"taken_at": iso_time(row.get("taken_at"), row.get("taken_offset")),
            "taken_at_source": row.get("taken_source"), "camera": row.get("camera"),
            "lens": row.get("lens"), "lat": row.get("lat"), "lon": row.get("lon"),
            "alt": row.get("alt"), "place": place, "city": row.get("city"),
            "region": row.get("region"), "country": row.get("country"),
            "country_code": row.get("country_code"), "width": row.get("width"),
            "height": row.get("height"), "format": row.get("format"),
            "bytes": row.get("bytes")}


def _under_folder(under: str | os.PathLike | None) -> str | None:
    """`under` as an absolute path; a UsageProblem when it is not a folder (else a typo would
    read as "no results")."""
    if under is None or str(under) == "":
        return None
    if not os.path.isdir(under):
        problem = "not a folder" if os.path.exists(under) else "no such folder"
        raise UsageProblem(f"--under: {problem}: {os.fspath(under)}")
    return os.path.abspath(under)


def _both(allowed: np.ndarray | None, more: np.ndarray | None) -> np.ndarray | None:
    """Ids both restrictions keep (None: no restriction)."""
    if allowed is None or more is None:
        return more if allowed is None else allowed
    return np.intersect1d(allowed, more)


def _folder_prefixes(folder: str) -> tuple[str, ...]:
    """What paths below `folder` start with: as written and, when a symlink leads there, as
    resolved (the scan stores a file reached both ways under its real path)."""
    return tuple({os.path.join(path, "") for path in (folder, os.path.realpath(folder))})


def _expansion(expand: "Expansion | str | None") -> "Expansion | None":
    if expand is None or not isinstance(expand, str):
        return expand
    from .expansion.options import Expansion

    return Expansion(expand)


def _decode_query_image(path: str, image_size: int) -> Decoded:
    if not os.path.exists(path):
        raise UsageProblem(f"query image not found: {path}")
    if os.path.isdir(path):
        raise UsageProblem(f"query image is a folder, not a file: {path}")
    try:
        return decode_file(path, min_side=2 * image_size)
    except DecodeFailure as exc:
        raise UsageProblem(f"cannot use {path} as a query image: {exc}") from None


def _decode_query_bytes(data: bytes, image_size: int) -> Decoded:
    import hashlib

    if not data:
        raise UsageProblem("the query image is empty (0 bytes)")
    try:
        image, width, height = decode_image(io.BytesIO(data), 2 * image_size)
    except DecodeFailure as exc:
        raise UsageProblem(f"cannot use the query image: {exc}") from None
    return Decoded(hashlib.sha256(data).hexdigest(), width, height, image)


def _raw_vector(values: Sequence[float], dim: int) -> np.ndarray:
    vector = np.asarray(values, np.float64).reshape(-1)
    if vector.shape[0] != dim:
        raise UsageProblem(f"the embedding has {vector.shape[0]} values; this library's model "
                           f"needs {dim}")
    if not np.all(np.abs(vector) <= np.finfo(np.float32).max):  # also catches NaN, inf
        raise UsageProblem("the embedding holds values that are not finite float32")
    norm = float(np.linalg.norm(vector))
    if norm < 1e-12:
        raise UsageProblem("the embedding is all zeros")
    return vector / norm
