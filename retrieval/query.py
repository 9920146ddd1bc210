"""Query values: weighted terms, the parsed request, and the hits it returns."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from index.errors import UsageProblem
from index.scan import IMAGE_SUFFIXES

from .filters import SORTS, Filters

__all__ = ["TARGETS", "Hit", "ImageBytes", "ImagePath", "IndexedImage", "Query", "RawVector",
           "SearchResult", "Source", "Term", "TextSource", "parse_weighted", "terms_from"]

TARGETS = ("images", "captions")
NEGATIVE_WEIGHT = 0.5  # `--not X` subtracts half of X's unit vector unless a weight is given
# A weight is a number, a colon, then anything but a digit: "2:sunset" and "0.5: hills" are
# weighted, while times and ratios, common at the start of a query ("10:00 alarm clock",
# "16:9 photo"), stay texts. The (?!\d) lookahead is that whole rule.
_WEIGHT = re.compile(r"^\s*(?P<w>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*:(?!\d)(?P<rest>.*)$", re.S)


# --- what a term stands for ---------------------------------------------------------------
@dataclass(frozen=True)
class TextSource:
    text: str


@dataclass(frozen=True)
class ImagePath:
    """An image file on disk (need not be indexed)."""

    path: str


@dataclass(frozen=True)
class ImageBytes:
    """An image's encoded bytes (an upload); `decoded` when the caller decoded it already,
    under its own limits (index.scan.Decoded)."""

    data: bytes = field(repr=False)
    decoded: object = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"upload:{hashlib.sha256(self.data).hexdigest()[:16]}"


@dataclass(frozen=True)
class IndexedImage:
    """An image of the library, by id: its stored vector is the term's vector."""

    image_id: int


@dataclass(frozen=True)
class RawVector:
    """A ready embedding (clip-retrieval's embedding_input); normalised before use."""

    values: tuple[float, ...] = field(repr=False)


Source = TextSource | ImagePath | ImageBytes | IndexedImage | RawVector


@dataclass(frozen=True)
class Term:
    """One part of a query with its weight (negative subtracts).

    `kind` and `value` are what the echoed query shows ("text" and the text, "image" and the
    path or a label such as `upload:<hash>` or `library:<id>`, "embedding"); `source` is what
    the query pipeline encodes. `Term("text", "a dog")` and `Term("image", "x.jpg")` make
    their source themselves; the constructors below make the others.
    """

    kind: str  # "text" | "image" | "embedding"
    value: str
    weight: float = 1.0
    source: Source = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.source is None:
            if self.kind == "text":
                object.__setattr__(self, "source", TextSource(self.value))
            elif self.kind == "image":
                object.__setattr__(self, "source", ImagePath(self.value))
            else:
                raise UsageProblem(f"a {self.kind!r} term needs its source")

    @classmethod
    def text(cls, text: str, weight: float = 1.0) -> "Term":
        return cls("text", text, weight)

    @classmethod
    def image_path(cls, path: str, weight: float = 1.0) -> "Term":
        return cls("image", path, weight)

    @classmethod
    def image_bytes(cls, data: bytes, weight: float = 1.0, *, decoded: object = None) -> "Term":
        source = ImageBytes(data, decoded)
        return cls("image", source.label, weight, source)

    @classmethod
    def indexed_image(cls, image_id: int, weight: float = 1.0) -> "Term":
        return cls("image", f"library:{image_id}", weight, IndexedImage(int(image_id)))

    @classmethod
    def vector(cls, values, weight: float = 1.0) -> "Term":
        return cls("embedding", "embedding_input", weight,
                   RawVector(tuple(float(v) for v in values)))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "weight": self.weight}


def parse_weighted(raw: str, *, default: float = 1.0) -> tuple[float, str]:
    """Split an optional `W:` prefix: "2:a beach" → (2.0, "a beach"); "a beach" → (1.0, ...).

    A weight is a number (`2`, `-1`, `0.5`, `.5`, `+3`), a colon, and then whitespace or any
    character but a digit. So "2:sunset", "0.5: mountains" and "-1:x" are weighted, while
    "10:00 alarm clock", "16:9 photo", "12:30 lunch" and "2:3 people" are plain texts, as are
    a path like `C:\\x.jpg` and a text with a colon later on ("red: a circle"). Only the first
    prefix is read, and a space after its colon lets any text follow: "2: 3 people" is weight 2
    on "3 people", and "1: 2:sunset" searches the text "2:sunset" itself (weight 1).
    """
    m = _WEIGHT.match(raw)
    if m and m["rest"].strip():
        return float(m["w"]), m["rest"].strip()
    return default, raw.strip()


def terms_from(texts: Iterable[str] = (), *, images: Iterable[str] = (),
               uploads: Iterable[bytes | tuple[bytes, object]] = (),
               image_ids: Iterable[int] = (), negatives: Iterable[str] = (),
               paths_in_negatives: bool = False) -> tuple[Term, ...]:
    """Terms from request-style values: texts and negatives may carry a `W:` weight prefix
    (negatives weigh NEGATIVE_WEIGHT unless they say), image paths too unless the path exists
    as written; uploads are image bytes, or (bytes, Decoded) when already decoded.

    `paths_in_negatives`: a negative naming an existing image file is an image term (the CLI
    and Python API); requests from the network never name files, so the server leaves it off.
    """
    terms = [Term.text(value, w) for w, value in map(parse_weighted, texts)]
    for raw in images:
        w, value = (1.0, raw) if os.path.exists(raw) else parse_weighted(raw)
        terms.append(Term.image_path(value, w))
    for upload in uploads:
        data, decoded = upload if isinstance(upload, tuple) else (upload, None)
        terms.append(Term.image_bytes(data, decoded=decoded))
    terms += [Term.indexed_image(image_id) for image_id in image_ids]
    for raw in negatives:
        w, value = parse_weighted(raw, default=NEGATIVE_WEIGHT)
        as_image = paths_in_negatives and _looks_like_image(value)
        terms.append(Term.image_path(value, -abs(w)) if as_image else Term.text(value, -abs(w)))
    return tuple(terms)


def _looks_like_image(value: str) -> bool:
    return os.path.isfile(value) and Path(value).suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...]
    target: str = "images"
    k: int = 10
    offset: int = 0
    threshold: float | None = None
    under: str | None = None
    dedup: bool = False
    expand: str | None = None
    filters: Filters = field(default_factory=Filters)
    sort: str = "relevance"  # | "date" (oldest first) | "-date" (newest first)

    @property
    def browse(self) -> bool:
        """No query terms: the filters alone list the library's images by date."""
        return not self.terms

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise UsageProblem(f"--sort must be one of {', '.join(SORTS)}, not {self.sort!r}")
        if not self.terms:
            if not self.filters.active and self.sort == "relevance":
                raise UsageProblem("empty query: give a text, an --image, or a filter "
                                   "(--after, --before, --camera, --place, --near, --type, "
                                   "--tag) to list photos by date")
            if self.target != "images":
                raise UsageProblem("listing by filters alone shows images: give a query text "
                                   "or --image to search --target captions")
            if self.threshold is not None:
                raise UsageProblem("--threshold needs a query: a text or an --image")
            if self.expand:
                raise UsageProblem("--expand needs a query text")
        for term in self.terms:
            if term.kind == "text" and not term.value.strip():
                raise UsageProblem("empty query text")
        if self.target not in TARGETS:
            raise UsageProblem(f"target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        if self.k < 1:
            raise UsageProblem(f"--top must be at least 1 (got {self.k})")
        if self.offset < 0:
            raise UsageProblem(f"--offset cannot be negative (got {self.offset})")
        if self.terms and all(t.weight <= 0 for t in self.terms):
            raise UsageProblem("a query needs at least one positive term, not only --not terms")

    def as_dict(self) -> dict:
        return {
            "terms": [t.as_dict() for t in self.terms], "target": self.target, "top": self.k,
            "offset": self.offset, "threshold": self.threshold, "under": self.under,
            "dedup": self.dedup, "expand": self.expand, "filters": self.filters.as_dict(),
            "sort": self.sort,
        }


@dataclass(frozen=True)
class Hit:
    """One result. Fields that do not apply to its kind are None."""

    id: int
    score: float | None  # cosine similarity; None when listing by filters alone
    kind: str  # "image" | "caption"
    path: str | None  # the image's path (for a caption: its linked image's path, if any)
    text: str | None  # the caption text (for an image: None)
    image_id: int | None  # the image's id (for a caption: its linked image, if any)
    # the (linked) image's photo metadata: taken_at (ISO), taken_at_source, camera, lens, lat,
    # lon, alt, place, city, region, country, country_code, width, height, format, bytes
    meta: dict | None = field(default=None, compare=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["score"] = None if self.score is None else round(float(self.score), 6)
        return d


@dataclass(frozen=True)
class SearchResult:
    query: Query
    hits: tuple[Hit, ...] = field(default_factory=tuple)
    timings_ms: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"query": self.query.as_dict(), "hits": [h.as_dict() for h in self.hits]}
