"""The server's adapter over the one query pipeline, free of any web framework.

A request becomes `Term`s and a `Query` here (`search_query`, the one place the search options
meet); `retrieval.search.Searcher` turns those into a vector and hits, as for the CLI and
Python; what comes back is shaped here for clip-retrieval's clients (the knn list, metadata)
from the store's read API. Requests never name files: query images arrive as bytes (decoded
here, under the server's limits, and handed to the pipeline decoded), indexed images are named
by id, and a file is served only while it is still the file that was indexed.

One lock serialises model calls and index catch-up (the embedder and the in-memory FAISS
indexes are not safe for concurrent use); store reads and thumbnails run without it, and a
semaphore bounds the image decodes in flight.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from index import __version__
from index.errors import NotFound, TooLarge, UsageProblem
from index.scan import Decoded

from ..filters import FORMAT_ALIASES, Filters
from ..query import Query, SearchResult, Term, terms_from
from ..search import Searcher
from .media import DEFAULT_LIMITS, Limits, OpenedImage, Thumbnails, decode_uploads, open_indexed
from .models import MAX_TERMS, MAX_TEXT

__all__ = ["FIELD_OF_FLAG", "INDICES", "TARGET_OF_MODALITY", "KnnParams", "SearchParams",
           "Service", "in_request_terms", "search_query"]

# clip-retrieval names indices; ours are the two vector indexes, mapped from `modality` too
INDICES = {"images": "images", "captions": "captions"}
TARGET_OF_MODALITY = {"image": "images", "text": "captions"}
UrlFor = Callable[[int], str]

# The pipeline's errors speak the CLI's language ("--top must be at least 1"); an HTTP client
# sent the fields of /api/search, so its errors name those. Flags missing here (--expand,
# --model, ...) are nothing a request can set, and stay as they are.
FIELD_OF_FLAG = {"--not terms": "negatives", "--not": "negatives", "--image": "image",
                 "--top": "top", "--offset": "offset", "--target": "target",
                 "--threshold": "threshold", "--under": "under", "--dedup": "dedup",
                 "--after": "after", "--before": "before", "--year": "year",
                 "--month": "month", "--camera": "camera", "--place": "place",
                 "--near": "near", "--type": "type", "--tag": "tag", "--sort": "sort"}
_FLAG = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, FIELD_OF_FLAG)) + r")(?![\w-])")
EXAMPLES, EXAMPLE_CHARS, EXAMPLE_CANDIDATES = 5, 60, 40  # short captions, spread over the library


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
    # photo metadata filters, as typed (parsed by retrieval.filters.Filters.parse) and sort
    after: str | None = None
    before: str | None = None
    year: str | None = None
    month: str | None = None
    camera: str | None = None
    place: str | None = None
    near: str | None = None
    types: Sequence[str] = ()
    tags: Sequence[str] = ()
    sort: str = "relevance"


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


def search_query(params: SearchParams, uploads: Sequence[Decoded]) -> Query:
    """The Query a search request asks; `uploads` are its images, decoded.

    Texts and negatives may carry `W:` weights. A request never names a file: its images are
    bytes, and a negative is always a text.
    """
    terms = terms_from(params.texts, uploads=zip(params.images, uploads),
                       image_ids=() if params.image_id is None else (params.image_id,),
                       negatives=params.negatives, paths_in_negatives=False)
    filters = Filters.parse(after=params.after, before=params.before, year=params.year,
                            month=params.month, camera=params.camera, place=params.place,
                            near=params.near, types=params.types, tags=params.tags)
    return Query(terms, target=params.target, k=params.top, offset=params.offset,
                 threshold=params.threshold,
                 under=os.path.abspath(params.under) if params.under else None,
                 dedup=params.dedup, filters=filters, sort=params.sort)


def in_request_terms(message: str) -> str:
    """An error message for an HTTP client: CLI flags become request fields (FIELD_OF_FLAG)."""
    return _FLAG.sub(lambda m: FIELD_OF_FLAG[m[1]], message)


def pick_examples(captions: Sequence[str], *, count: int = EXAMPLES,
                  max_chars: int = EXAMPLE_CHARS) -> list[str]:
    """The first `count` distinct captions short enough to read as a query."""
    chosen: dict[str, str] = {}
    for text in captions:
        text = " ".join(text.split())
        if text and len(text) <= max_chars:
            chosen.setdefault(text.casefold(), text)
    return list(chosen.values())[:count]


def check_sizes(params: SearchParams) -> None:
    """Refuse (TooLarge) a request over the term count or text length, before any work."""
    terms = len(params.texts) + len(params.images) + len(params.negatives)
    if terms > MAX_TERMS:
        raise TooLarge(f"{terms} query terms; the limit is {MAX_TERMS}")
    for text in [*params.texts, *params.negatives, params.under or "", params.camera or "",
                 params.place or "", params.near or "", params.after or "", params.before or ""]:
        if len(text) > MAX_TEXT:
            raise TooLarge(f"query texts are at most {MAX_TEXT} characters")


@dataclass
class Service:
    """The server's state: one Searcher, a lock for the model, a decode semaphore, a
    thumbnail cache."""

    searcher: Searcher
    limits: Limits = DEFAULT_LIMITS
    lock: threading.Lock = field(default_factory=threading.Lock)
    _examples: tuple[tuple[int, int], list[str]] | None = field(
        default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.decodes = threading.BoundedSemaphore(self.limits.max_concurrent_decodes)
        self.thumbnails = Thumbnails(max_bytes=self.limits.thumbnail_cache_bytes,
                                     decodes=self.decodes)

    @property
    def store(self):
        return self.searcher.library.store

    # --- searching --------------------------------------------------------------------------
    def search(self, params: SearchParams) -> SearchResult:
        """A search request, answered as `clipdex search` answers it."""
        check_sizes(params)
        return self._run(search_query(params, self._decoded(params.images)))

    def caption(self, image: bytes, *, top: int = 5) -> SearchResult:
        return self.search(SearchParams(images=[image], target="captions", top=top))

    def _run(self, query: Query) -> SearchResult:
        with self.lock:
            return self.searcher.run(query)

    def _decoded(self, images: Sequence[bytes]) -> list[Decoded]:
        """Uploads decoded as the indexer decodes files; no model lock while Pillow works."""
        if not images:
            return []
        with self.lock:
            image_size = self.searcher.embedder.image_size
        return decode_uploads(images, min_side=2 * image_size, limits=self.limits,
                              decodes=self.decodes)

    # --- clip-retrieval ---------------------------------------------------------------------
    def knn(self, params: KnnParams, url_for: UrlFor) -> list[dict]:
        """Results best first: metadata for the first num_images, ids and scores for the rest."""
        terms = self._knn_terms(params)
        query = Query(terms, target=params.target, k=params.num_result_ids,
                      dedup=params.deduplicate)
        try:
            hits = self._run(query).hits
        except UsageProblem as exc:
            if terms[0].kind != "embedding":
                raise
            raise UsageProblem(f"embedding_input: {exc}") from None  # name the field at fault
        shown = self.metadata([h.id for h in hits[:params.num_images]], params.target, url_for)
        return [{**shown.get(h.id, {}), "id": h.id, "similarity": h.score} for h in hits]

    def _knn_terms(self, params: KnnParams) -> tuple[Term, ...]:
        """clip-retrieval's precedence: a text, else an image, else an embedding."""
        if params.text:
            return (Term.text(params.text),)
        if params.image is not None:
            return terms_from(uploads=zip([params.image], self._decoded([params.image])))
        if params.embedding is not None:
            return (Term.vector(params.embedding),)
        raise UsageProblem("give one of text, image (base64) or embedding_input")

    def metadata(self, ids: Iterable[int], target: str, url_for: UrlFor) -> dict[int, dict]:
        """caption / image_path / url of images or captions, by id (unknown ids are absent)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return {}
        if target == "images":
            paths = self.store.image_paths(wanted)
            captions = self.store.first_captions(list(paths))
            return {i: _meta(captions.get(i), i, path, url_for) for i, path in paths.items()}
        return {c.id: _meta(c.text, c.image_id, c.path, url_for)
                for c in self.store.captions(wanted).values()}

    # --- images, stats ----------------------------------------------------------------------
    def open_image(self, image_id: int) -> OpenedImage:
        """The indexed file behind an id, opened, if it is still the file that was indexed."""
        indexed = self.store.image_file(image_id)
        if indexed is None:
            raise NotFound(f"no image with id {image_id} in this library")
        try:
            return open_indexed(indexed)
        except NotFound as exc:
            raise NotFound(f"image {image_id} is indexed but {exc}") from None

    def thumbnail(self, image_id: int, *, size: int) -> bytes:
        with self.open_image(image_id) as image:
            return self.thumbnails.get(image, size=size)

    def examples(self) -> list[str]:
        """A few of the library's own captions to try as queries (none without captions).

        Captions spread evenly over the library's caption ids, so not all from one folder;
        kept until captions are added or removed (reading every id is a scan of the table).
        """
        key = (self.store.generation("caption"), self.store.count("caption"))
        if self._examples is None or self._examples[0] != key:
            ids = self.store.ids("caption")
            step = max(1, len(ids) // EXAMPLE_CANDIDATES)
            picked = self.store.captions(ids[::step][:EXAMPLE_CANDIDATES].tolist())
            texts = [picked[i].text for i in sorted(picked)]
            self._examples = (key, pick_examples(texts))
        return self._examples[1]

    def stats(self) -> dict:
        return self.searcher.library.stats()

    def duplicates(self, *, threshold: float, under: str | None = None) -> dict:
        """Near-duplicate groups (retrieval.duplicates); the page builds thumbnail URLs from ids."""
        from ..duplicates import find_duplicates

        if under is not None and len(under) > MAX_TEXT:
            raise TooLarge(f"under is at most {MAX_TEXT} characters")
        with self.lock:  # the range search uses the in-memory index
            groups = find_duplicates(self.searcher, threshold=threshold, under=under)
        return {"threshold": threshold, "groups": [g.as_dict() for g in groups]}

    def filters(self) -> dict:
        """What the web page's filter bar offers: the library's cameras, places (cities and
        countries), formats and date range, most common first."""
        summary = self.searcher.library.photo_summary()
        cities: dict[str, int] = {}
        for place, n in summary["places"].items():
            for part in place.split(", "):
                cities[part] = cities.get(part, 0) + n
        return {"cameras": list(summary["cameras"]),
                "tags": list(self.store.tag_summary()),
                "places": sorted(cities, key=lambda p: -cities[p]),
                "types": [t for t in summary["formats"] if t in FORMAT_ALIASES.values()],
                "taken": summary["taken"] and {"first": summary["taken"]["first"],
                                               "last": summary["taken"]["last"]},
                "with_gps": summary["with_gps"]}

    def health(self) -> dict:
        return {"status": "ok", "version": __version__, "model": self.searcher.library.model,
                "images": self.store.count("image"), "captions": self.store.count("caption")}


def _meta(caption: str | None, image_id: int | None, path: str | None,
          url_for: UrlFor) -> dict:
    meta: dict = {}
    if caption is not None:
        meta["caption"] = caption
    if image_id is not None and path is not None:
        meta["image_path"] = path
        meta["url"] = url_for(image_id)
    return meta
