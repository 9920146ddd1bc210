"""Expanded search: the expanders a Searcher keeps warm, and the fused query they make."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from index.errors import PriorNotTrained, UsageProblem

from ..query import Hit, Query, SearchResult, Term
from .fusion import RRF_DEPTH, interpolate, reciprocal_rank_fusion, rrf_weights
from .maps import MeanShift, PriorExpander, RidgeMap, training_pairs
from .options import Expansion, QueryExpander
from .saved import SavedExpanders, load_expanders

if TYPE_CHECKING:
    from ..search import Searcher

__all__ = ["Expanders"]


class Expanders:
    """The expanders a Searcher uses for `search(..., expand=...)`, loaded or fitted once and
    kept warm between queries; `search` runs one expanded query through the Searcher.

    Args:
        searcher: whose model encodes, and whose index answers.
        notify: receives warnings for the user (e.g. a generator running on the CPU).
        saved: use these instead of the ones `clipdex prior train` saved (benchmarks).
    """

    def __init__(self, searcher: "Searcher", *, notify: Callable[[str], None] | None = None,
                 saved: "SavedExpanders | None" = None) -> None:
        self.searcher = searcher
        self.notify = notify
        # False: not looked for yet; None: looked for, none saved
        self._saved: SavedExpanders | None | bool = saved if saved else False
        self._fitted: dict[str, QueryExpander] = {}
        self._generators: dict[str, QueryExpander] = {}

    def search(self, query: Query, expansion: Expansion) -> SearchResult:
        """The query's vector fused with its image-side samples (interp: one search; rrf:
        K+1 searches merged by rank)."""
        text_terms = _expandable_terms(query)
        expander = self.expander(expansion)  # before encoding: a missing prior fails fast
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        query_vector, exclude = self.searcher.query_vector(query.terms)
        text_vector = (query_vector if len(text_terms) == len(query.terms)
                       else self.searcher.query_vector(text_terms)[0])
        timings["encode"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        samples = expander.image_vectors(text_vector, [t.value for t in text_terms], expansion)
        timings["expand"] = (time.perf_counter() - t0) * 1000
        if expansion.fusion == "interp":
            fused = interpolate(query_vector, samples, expansion.a)
            return self.searcher.search_vector(fused, query, exclude=exclude, timings=timings)
        return self._rrf(query, query_vector, samples, expansion.a, exclude, timings)

    def _rrf(self, query: Query, query_vector: np.ndarray, samples: np.ndarray, weight: float,
             exclude: set[int], timings: dict) -> SearchResult:
        deep = replace(query, k=max(RRF_DEPTH, 4 * (query.offset + query.k)), offset=0)
        lists = [self.searcher.search_vector(v, deep, exclude=exclude, timings=timings).hits
                 for v in [query_vector, *samples]]
        by_id: dict[int, Hit] = {h.id: h for hits in lists for h in hits}
        fused = reciprocal_rank_fusion([[h.id for h in hits] for hits in lists],
                                       rrf_weights(len(samples), weight))
        hits = [replace(by_id[i], score=score) for i, score in fused]
        return SearchResult(query, tuple(hits[query.offset:query.offset + query.k]), timings)

    def expander(self, expansion: Expansion) -> QueryExpander:
        """The (cached) expander for a method: saved by `prior train`, or fitted now."""
        method = expansion.method
        if method == "pixels":
            return self._pixel_expander(expansion.generator or "")
        saved = self.saved()
        if method in ("prior", "contrastive"):
            if saved is None:
                what = "diffusion prior" if method == "prior" else "contrastive map"
                raise PriorNotTrained(
                    f"--expand {method} needs the library's trained {what}, and the library "
                    f"at {self.searcher.library.settings.home} has none: run `clipdex prior "
                    f"train` first (or use --expand meanshift / --expand ridge, which need "
                    f"no training)")
            return PriorExpander(saved.prior) if method == "prior" else saved.contrastive
        if saved is not None:
            return saved.meanshift if method == "meanshift" else saved.ridge
        if method not in self._fitted:
            pairs = training_pairs(self.searcher.library)
            fit = MeanShift.fit if method == "meanshift" else RidgeMap.fit
            self._fitted[method] = fit(pairs.text_vectors, pairs.image_vectors)
        return self._fitted[method]

    def saved(self) -> SavedExpanders | None:
        if self._saved is False:
            self._saved = load_expanders(self.searcher.library)
        return self._saved  # type: ignore[return-value]

    def _pixel_expander(self, generator: str) -> QueryExpander:
        if generator not in self._generators:
            from .pixels import PixelExpander

            self._generators[generator] = PixelExpander.load(
                generator, self.searcher.embedder, notify=self.notify)
        return self._generators[generator]


def _expandable_terms(query: Query) -> list[Term]:
    """The positive text terms an expansion starts from; refuses queries it cannot expand."""
    if query.target != "images":
        raise UsageProblem("--expand moves a text query towards images: it works with "
                           "--target images only")
    texts = [t for t in query.terms if t.kind == "text" and t.weight > 0]
    if not texts:
        raise UsageProblem("--expand needs a query text to expand (an --image query is "
                           "already on the image side)")
    return texts
