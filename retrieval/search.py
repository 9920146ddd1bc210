"""Cross-modal search over a library: text→image, image→image, text/image→caption, mixtures.

A query is a weighted sum of unit vectors (texts and images; `--not` terms have negative
weights), normalised again: q = normalise(Σ wᵢ·vᵢ). Candidates come from the FAISS index; when
it stores compressed codes they are re-scored exactly from the stored vectors (Flat and IVF-Flat
keep full vectors, so their scores are exact already), then filtered
(--under, --threshold, the query image itself, --dedup) and cut to --offset/--top.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import select

from index import Library
from index.embedder import Embedder
from index.errors import EmptyLibrary, UsageProblem
from index.scan import DecodeFailure, decode_file
from index.store import CaptionRow, ImageRow
from index.vectors import VectorIndex

from .query import NEGATIVE_WEIGHT, Hit, Query, SearchResult, Term, parse_weighted

__all__ = ["Searcher", "build_terms"]

DEDUP_COSINE = 0.985  # images closer than this to a better-ranked hit are near-duplicates
KIND_OF_TARGET = {"images": "image", "captions": "caption"}


def build_terms(texts: Iterable[str] = (), images: Iterable[str] = (),
                negatives: Iterable[str] = ()) -> tuple[Term, ...]:
    """Terms from CLI-style strings, each with an optional `W:` weight prefix."""
    terms = []
    for raw in texts:
        w, value = parse_weighted(raw)
        terms.append(Term("text", value, w))
    for raw in images:
        w, value = parse_weighted(raw) if not os.path.exists(raw) else (1.0, raw)
        terms.append(Term("image", value, w))
    for raw in negatives:
        w, value = parse_weighted(raw, default=NEGATIVE_WEIGHT)
        terms.append(Term("image" if _looks_like_image(value) else "text", value, -abs(w)))
    return tuple(terms)


def _looks_like_image(value: str) -> bool:
    return os.path.isfile(value) and Path(value).suffix.lower() in {
        ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class Searcher:
    """Answers queries against one library, keeping its vector indexes warm between queries."""

    def __init__(self, library: Library, *, precision: str = "auto", mmap: bool = False) -> None:
        self.library = library
        self.precision = precision
        self.mmap = mmap  # map index files instead of loading them (one-shot queries)
        self._indexes: dict[str, VectorIndex] = {}

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, *, db: str | None = None,
             precision: str = "auto", mmap: bool = False) -> "Searcher":
        return cls(Library.open(home, db=db), precision=precision, mmap=mmap)

    def close(self) -> None:
        self.library.close()

    @property
    def embedder(self) -> Embedder:
        if self.library.model is None:
            raise EmptyLibrary(f"the library at {self.library.settings.home} is empty: add "
                               f"images with `clipdex index PATH` first")
        return self.library.embedder(precision=self.precision)

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
               offset: int = 0, threshold: float | None = None, under: str | None = None,
               dedup: bool = False) -> SearchResult:
        """Search with texts and/or images (each may carry a `W:` weight prefix).

        Args:
            text: one query text or several.
            image: one image path or several (need not be in the library).
            negatives: texts (or image paths) to steer away from.
            target: "images" or "captions".
            k: how many hits; offset: how many best hits to skip (paging).
            threshold: drop hits scoring below this cosine similarity.
            under: keep only images (or captions linked to images) below this folder.
            dedup: collapse near-identical images (or identical caption texts).
        Returns:
            A SearchResult with the parsed query and the hits, best first.
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [image] if isinstance(image, (str, os.PathLike)) else list(image or [])
        terms = build_terms(texts, [str(p) for p in images], negatives)
        query = Query(terms, target=target, k=k, offset=offset, threshold=threshold,
                      under=os.path.abspath(under) if under else None, dedup=dedup)
        return self.run(query)

    def caption(self, image: str | os.PathLike, *, k: int = 5) -> SearchResult:
        """The captions closest to an image (which need not be in the library)."""
        return self.search(image=image, target="captions", k=k)

    def run(self, query: Query) -> SearchResult:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        vector, exclude = self.query_vector(query.terms)
        timings["encode"] = (time.perf_counter() - t0) * 1000
        return self.search_vector(vector, query, exclude=exclude, timings=timings)

    # --- steps ------------------------------------------------------------------------------
    def query_vector(self, terms: Sequence[Term]) -> tuple[np.ndarray, set[int]]:
        """The unit query vector, and ids of indexed images identical to a query image."""
        embedder = self.embedder
        total = np.zeros(embedder.dim, np.float32)
        exclude: set[int] = set()
        texts = [t for t in terms if t.kind == "text"]
        if texts:
            vectors = embedder.encode_texts([t.value for t in texts])
            total += (np.array([t.weight for t in texts], np.float32)[:, None] * vectors).sum(0)
        for term in (t for t in terms if t.kind == "image"):
            decoded = _decode_query_image(term.value, embedder.image_size)
            total += term.weight * embedder.encode_images([decoded.image])[0]
            if term.weight > 0:
                exclude |= self._ids_with_hash(decoded.content_hash)
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise UsageProblem("the query terms cancel out (their weighted sum is zero)")
        return total / norm, exclude

    def _ids_with_hash(self, content_hash: str) -> set[int]:
        with self.library.store.session() as s:
            return set(s.scalars(select(ImageRow.id).where(ImageRow.content_hash == content_hash)))

    def search_vector(self, vector: np.ndarray, query: Query, *, exclude: set[int] = frozenset(),
                      timings: dict | None = None) -> SearchResult:
        """Search with a ready query vector (used by the HTTP API and expansion too)."""
        timings = {} if timings is None else timings
        vi = self.index_for(query.target)
        if vi.size == 0:
            raise EmptyLibrary(f"no {query.target} in this library yet" + (
                ": add some with `clipdex captions add FILE`" if query.target == "captions"
                else ": index a folder with `clipdex index PATH`"))
        want = query.offset + query.k
        filtering = query.under or query.threshold is not None or query.dedup
        fetch = min((want + len(exclude)) * (4 if filtering else 1), vi.size)
        while True:
            t0 = time.perf_counter()
            scores, ids = vi.search(vector[None, :], fetch)
            scores, ids = self._rescore(vi, vector, scores[0], ids[0])
            timings["search"] = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            hits = self._filter(self._hydrate(query.target, ids, scores), query, exclude, vi)
            timings["hydrate"] = (time.perf_counter() - t0) * 1000
            if len(hits) >= want or fetch >= vi.size:
                break
            fetch = min(fetch * 4, vi.size)
        return SearchResult(query, tuple(hits[query.offset:want]), timings)

    def _rescore(self, vi: VectorIndex, vector: np.ndarray, scores: np.ndarray,
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        if vi.exact_scores or not len(ids):  # Flat codes: FAISS's scores are already exact
            return scores, ids
        stored = self.library.store.vectors_for(vi.kind, ids.tolist())
        exact = np.array([float(stored[int(i)] @ vector) for i in ids], np.float32)
        order = np.argsort(-exact, kind="stable")
        return exact[order], ids[order]

    def _hydrate(self, target: str, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        id_list = [int(i) for i in ids]
        with self.library.store.session() as s:
            if target == "images":
                rows = {r.id: r for r in s.execute(
                    select(ImageRow.id, ImageRow.path).where(ImageRow.id.in_(id_list)))}
                return [Hit(i, float(sc), "image", rows[i].path, None, i)
                        for i, sc in zip(id_list, scores) if i in rows]
            rows = {r.id: r for r in s.execute(
                select(CaptionRow.id, CaptionRow.text, CaptionRow.image_id, ImageRow.path)
                .outerjoin(ImageRow, ImageRow.id == CaptionRow.image_id)
                .where(CaptionRow.id.in_(id_list)))}
            return [Hit(i, float(sc), "caption", rows[i].path, rows[i].text, rows[i].image_id)
                    for i, sc in zip(id_list, scores) if i in rows]

    def _filter(self, hits: list[Hit], query: Query, exclude: set[int],
                vi: VectorIndex) -> list[Hit]:
        out = []
        prefix = query.under.rstrip(os.sep) + os.sep if query.under else None
        for hit in hits:
            if hit.kind == "image" and hit.id in exclude:
                continue
            if query.threshold is not None and hit.score < query.threshold:
                break  # hits are sorted: the rest score lower still
            if prefix and not (hit.path or "").startswith(prefix):
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


def _decode_query_image(path: str, image_size: int):
    if not os.path.exists(path):
        raise UsageProblem(f"query image not found: {path}")
    if os.path.isdir(path):
        raise UsageProblem(f"query image is a folder, not a file: {path}")
    try:
        return decode_file(path, min_side=2 * image_size)
    except DecodeFailure as exc:
        raise UsageProblem(f"cannot use {path} as a query image: {exc}") from None
