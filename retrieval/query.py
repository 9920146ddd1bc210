"""Query values: weighted terms, the parsed request, and the hits it returns."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from index.errors import UsageProblem

__all__ = ["Hit", "Query", "SearchResult", "Term", "parse_weighted", "TARGETS"]

TARGETS = ("images", "captions")
NEGATIVE_WEIGHT = 0.5  # `--not X` subtracts half of X's unit vector unless a weight is given
_WEIGHT = re.compile(r"^\s*(?P<w>[+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*:(?P<rest>.*)$", re.S)


@dataclass(frozen=True)
class Term:
    """One part of a query: a text or an image path with a weight (negative subtracts)."""

    kind: str  # "text" | "image"
    value: str
    weight: float = 1.0


def parse_weighted(raw: str, *, default: float = 1.0) -> tuple[float, str]:
    """Split an optional `W:` prefix: "2:a beach" → (2.0, "a beach"); "a beach" → (1.0, ...).

    A path like `C:\\x.jpg` or a text with a colon later on keeps its colon: only a leading
    number followed by a colon is a weight.
    """
    m = _WEIGHT.match(raw)
    if m and m["rest"].strip():
        return float(m["w"]), m["rest"].strip()
    return default, raw.strip()


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

    def __post_init__(self) -> None:
        if not self.terms:
            raise UsageProblem("empty query: give a text, an --image, or both")
        for term in self.terms:
            if term.kind == "text" and not term.value.strip():
                raise UsageProblem("empty query text")
        if self.target not in TARGETS:
            raise UsageProblem(f"target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        if self.k < 1:
            raise UsageProblem(f"--top must be at least 1 (got {self.k})")
        if self.offset < 0:
            raise UsageProblem(f"--offset cannot be negative (got {self.offset})")
        if all(t.weight <= 0 for t in self.terms):
            raise UsageProblem("a query needs at least one positive term, not only --not terms")

    def as_dict(self) -> dict:
        return {
            "terms": [asdict(t) for t in self.terms], "target": self.target, "top": self.k,
            "offset": self.offset, "threshold": self.threshold, "under": self.under,
            "dedup": self.dedup, "expand": self.expand,
        }


@dataclass(frozen=True)
class Hit:
    """One result. Fields that do not apply to its kind are None."""

    id: int
    score: float
    kind: str  # "image" | "caption"
    path: str | None  # the image's path (for a caption: its linked image's path, if any)
    text: str | None  # the caption text (for an image: None)
    image_id: int | None  # the image's id (for a caption: its linked image, if any)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["score"] = round(float(self.score), 6)
        return d


@dataclass(frozen=True)
class SearchResult:
    query: Query
    hits: tuple[Hit, ...] = field(default_factory=tuple)
    timings_ms: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"query": self.query.as_dict(), "hits": [h.as_dict() for h in self.hits]}
