"""What the HTTP server does, free of any web framework: queries with uploaded images,
caption lookup, the clip-retrieval knn service and metadata, thumbnails and stats.

Requests never name files: query images arrive as bytes, indexed images are named by id and
their paths come from the store, and a file is served only while it is still the file that
was indexed. One lock serialises model calls and index catch-up (the embedder and the
in-memory FAISS indexes are not safe for concurrent use); store reads and thumbnails run
without it, and a semaphore bounds the image decodes in flight.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select

from index import __version__
from index.errors import UsageProblem
from index.scan import Decoded
from index.store import CaptionRow, ImageRow

from .query import NEGATIVE_WEIGHT, Query, SearchResult, Term, parse_weighted
from .search import Searcher
from .server_media import (
    DEFAULT_LIMITS,
    Limits,
    NotFound,
    OpenedImage,
    Thumbnails,
    decode_uploads,
    open_indexed,
)

__all__ = ["INDICES", "KnnParams", "SearchParams", "Service"]

# clip-retrieval names indices; ours are the two vector indexes, mapped from `modality` too
INDICES = {"images": "images", "captions": "captions"}
TARGET_OF_MODALITY = {"image": "images", "text": "captions"}
UrlFor = Callable[[int], str]


@dataclass(frozen=True)
class SearchParams:
    """One search request: texts, uploaded image bytes and/or an indexed image, and options."""

    texts: Sequence[str] = ()
    images: Sequence[bytes] = ()
    image_id: int | None = None
    negatives: Sequence[str] = ()
    target: str = "images"
    top: int = 10
    offset: int = 0
    threshold: float | None = None
    under: str | None = None
    dedup: bool = False


@dataclass(frozen=True)
class KnnParams:
    """A clip-retrieval /knn-service request, already parsed and validated."""

    text: str | None = None
    image: bytes | None = None
    embedding: Sequence[float] | None = None
    target: str = "images"
    num_images: int = 40
    num_result_ids: int = 40
    deduplicate: bool = False


@dataclass
class Service:
    """The server's state: one Searcher, a lock for the model, a decode semaphore, a
    thumbnail cache."""

    searcher: Searcher
    limits: Limits = DEFAULT_LIMITS
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.decodes = threading.BoundedSemaphore(self.limits.max_concurrent_decodes)
        self.thumbnails = Thumbnails(max_bytes=self.limits.thumbnail_cache_bytes,
                                     decodes=self.decodes)

    @property
    def store(self):
        return self.searcher.library.store

    # --- searching --------------------------------------------------------------------------
    def search(self, params: SearchParams) -> SearchResult:
        with self.lock:
            image_size = self.searcher.embedder.image_size
        uploads = self._decoded(params.images, image_size)  # no model lock: pure Pillow
        query = Query(_terms(params, uploads), target=params.target, k=params.top,
                      offset=params.offset, threshold=params.threshold,
                      under=os.path.abspath(params.under) if params.under else None,
                      dedup=params.dedup)
        by_value = {term.value: decoded for term, decoded in zip(_upload_terms(uploads), uploads)}
        with self.lock:
            vector, exclude = self._vector(query.terms, by_value)
            return self.searcher.search_vector(vector, query, exclude=exclude)

    def caption(self, image: bytes, *, top: int = 5) -> SearchResult:
        return self.search(SearchParams(images=[image], target="captions", top=top))

    def _decoded(self, images: Sequence[bytes], image_size: int) -> list[Decoded]:
        return decode_uploads(images, min_side=2 * image_size, limits=self.limits,
                              decodes=self.decodes)

    def _vector(self, terms: Sequence[Term],
                uploads: dict[str, Decoded]) -> tuple[np.ndarray, set[int]]:
        """q = normalise(Σ wᵢ·vᵢ), as Searcher.query_vector, but images come as bytes or ids."""
        embedder = self.searcher.embedder
        total = np.zeros(embedder.dim, np.float32)
        exclude: set[int] = set()
        texts = [t for t in terms if t.kind == "text"]
        if texts:
            vectors = embedder.encode_texts([t.value for t in texts])
            total += (np.array([t.weight for t in texts], np.float32)[:, None] * vectors).sum(0)
        for term in (t for t in terms if t.kind == "image"):
            if term.value in uploads:
                decoded = uploads[term.value]
                total += term.weight * embedder.encode_images([decoded.image])[0]
                exclude |= self._ids_with_hash(decoded.content_hash)
            else:
                image_id = int(term.value.removeprefix("library:"))
                total += term.weight * self._stored_vector(image_id)
                exclude.add(image_id)
        return _unit(total), exclude

    def _stored_vector(self, image_id: int) -> np.ndarray:
        stored = self.store.vectors_for("image", [image_id])
        if image_id not in stored:
            raise NotFound(f"no image with id {image_id} in this library")
        return stored[image_id]

    def _ids_with_hash(self, content_hash: str) -> set[int]:
        with self.store.session() as s:
            return set(s.scalars(select(ImageRow.id).where(ImageRow.content_hash == content_hash)))

    # --- clip-retrieval ---------------------------------------------------------------------
    def knn(self, params: KnnParams, url_for: UrlFor) -> list[dict]:
        """Results best first: metadata for the first num_images, ids and scores for the rest."""
        query, vector, exclude = self._knn_query(params)
        with self.lock:
            if vector is None:
                vector, exclude = self._vector(query.terms, {})
            result = self.searcher.search_vector(vector, query, exclude=exclude)
        shown = [h.id for h in result.hits[:params.num_images]]
        metadata = self.metadata(shown, params.target, url_for)
        return [{**(metadata.get(h.id, {}) if i < params.num_images else {}),
                 "id": h.id, "similarity": h.score} for i, h in enumerate(result.hits)]

    def _knn_query(self, params: KnnParams) -> tuple[Query, np.ndarray | None, set[int]]:
        """clip-retrieval's precedence: a text, else an image, else an embedding."""
        k = max(params.num_result_ids, 1)
        options = dict(target=params.target, k=k, dedup=params.deduplicate)
        if params.text:
            return Query((Term("text", params.text),), **options), None, set()
        if params.image is not None:
            result_terms, vector, exclude = self._knn_image(params.image)
            return Query(result_terms, **options), vector, exclude
        if params.embedding is not None:
            vector = self._embedding(params.embedding)
            return Query((Term.vector(vector),), **options), vector, set()
        raise UsageProblem("give one of text, image (base64) or embedding_input")

    def _knn_image(self, data: bytes) -> tuple[tuple[Term, ...], np.ndarray, set[int]]:
        with self.lock:
            image_size = self.searcher.embedder.image_size
        decoded = self._decoded([data], image_size)[0]
        terms = _upload_terms([decoded])
        with self.lock:
            vector, exclude = self._vector(terms, {terms[0].value: decoded})
        return terms, vector, exclude

    def _embedding(self, values: Sequence[float]) -> np.ndarray:
        with self.lock:
            dim = self.searcher.embedder.dim
        vector = np.asarray(values, np.float64).reshape(-1)
        if vector.shape[0] != dim:
            raise UsageProblem(f"embedding_input has {vector.shape[0]} values; this library's "
                               f"model needs {dim}")
        if not np.all(np.abs(vector) <= np.finfo(np.float32).max):  # also catches NaN, inf
            raise UsageProblem("embedding_input holds values that are not finite float32")
        return _unit(vector)

    def metadata(self, ids: Iterable[int], target: str, url_for: UrlFor) -> dict[int, dict]:
        """caption / image_path / url of images or captions, by id (unknown ids are absent)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return {}
        with self.store.session() as s:
            if target == "images":
                rows = s.execute(select(ImageRow.id, ImageRow.path).where(ImageRow.id.in_(wanted)))
                paths = {r.id: (r.id, r.path) for r in rows}
                captions = _first_captions(s, list(paths))
                return {i: _meta(captions.get(i), image_id, path, url_for)
                        for i, (image_id, path) in paths.items()}
            rows = s.execute(select(CaptionRow.id, CaptionRow.text, CaptionRow.image_id,
                                    ImageRow.path)
                             .outerjoin(ImageRow, ImageRow.id == CaptionRow.image_id)
                             .where(CaptionRow.id.in_(wanted)))
            return {r.id: _meta(r.text, r.image_id, r.path, url_for) for r in rows}

    # --- images, stats ----------------------------------------------------------------------
    def open_image(self, image_id: int) -> OpenedImage:
        """The indexed file behind an id, opened, if it is still the file that was indexed."""
        with self.store.session() as s:
            row = s.execute(select(ImageRow.path, ImageRow.size, ImageRow.mtime_ns)
                            .where(ImageRow.id == image_id)).first()
        if row is None:
            raise NotFound(f"no image with id {image_id} in this library")
        try:
            return open_indexed(row.path, size=row.size, mtime_ns=row.mtime_ns)
        except NotFound as exc:
            raise NotFound(f"image {image_id} is indexed but {exc}") from None

    def thumbnail(self, image_id: int, *, size: int) -> bytes:
        with self.open_image(image_id) as image:
            return self.thumbnails.get(image, size=size)

    def stats(self) -> dict:
        return self.searcher.library.stats()

    def health(self) -> dict:
        return {"status": "ok", "version": __version__, "model": self.searcher.library.model,
                "images": self.store.count("image"), "captions": self.store.count("caption")}


def _terms(params: SearchParams, uploads: Sequence[Decoded]) -> tuple[Term, ...]:
    """Query terms; texts and negatives may carry `W:` weights, negatives are never paths."""
    terms = [Term("text", value, w) for w, value in map(parse_weighted, params.texts)]
    terms += _upload_terms(uploads)
    if params.image_id is not None:
        terms.append(Term("image", f"library:{params.image_id}", 1.0))
    for raw in params.negatives:
        w, value = parse_weighted(raw, default=NEGATIVE_WEIGHT)
        terms.append(Term("text", value, -abs(w)))
    return tuple(terms)


def _upload_terms(uploads: Sequence[Decoded]) -> tuple[Term, ...]:
    # an uploaded image has no path: name it by content so the echoed query says which it was
    return tuple(Term("image", f"upload:{d.content_hash[:16]}", 1.0) for d in uploads)


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector.astype(np.float64)))  # float32 squares overflow at 1e19
    if norm < 1e-6:
        raise UsageProblem("the query terms cancel out (their weighted sum is zero)")
    return (vector / norm).astype(np.float32)


def _first_captions(session, image_ids: list[int]) -> dict[int, str]:
    """One caption per image (its first added), for clip-retrieval's `caption` field."""
    if not image_ids:
        return {}
    first = (select(CaptionRow.image_id, func.min(CaptionRow.id).label("cid"))
             .where(CaptionRow.image_id.in_(image_ids)).group_by(CaptionRow.image_id)
             .subquery())
    rows = session.execute(select(first.c.image_id, CaptionRow.text)
                           .join(CaptionRow, CaptionRow.id == first.c.cid))
    return {r.image_id: r.text for r in rows}


def _meta(caption: str | None, image_id: int | None, path: str | None,
          url_for: UrlFor) -> dict:
    meta: dict = {}
    if caption is not None:
        meta["caption"] = caption
    if image_id is not None and path is not None:
        meta["image_path"] = path
        meta["url"] = url_for(image_id)
    return meta
