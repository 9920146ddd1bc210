"""clipdex's read path: queries, cross-modal search, fusion and query expansion."""

from .expansion import Expansion
from .query import Hit, Query, SearchResult, Term, parse_weighted
from .search import Searcher, build_terms

__all__ = ["Expansion", "Hit", "Query", "SearchResult", "Searcher", "Term",
           "build_terms", "parse_weighted"]
