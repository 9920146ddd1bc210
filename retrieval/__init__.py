"""clipdex's read path: queries, cross-modal search and fusion."""

from .query import Hit, Query, SearchResult, Term, parse_weighted
from .search import Searcher, build_terms

__all__ = ["Hit", "Query", "SearchResult", "Searcher", "Term", "build_terms", "parse_weighted"]
