"""clipdex's write path: the embedder, scanning, ingestion, the store and the vector indexes."""

from .captions import CaptionReport
from .embedder import Embedder, get_embedder, register_embedder
from .errors import (
    CaptionFileError,
    ClipdexError,
    EmptyLibrary,
    LibraryUnavailable,
    ModelMismatch,
    ModelUnavailable,
    NoLibrary,
    UsageProblem,
)
from .ingest import IngestProgress, IngestReport
from .library import Failure, Library
from .settings import DEFAULT_MODEL, Settings

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CaptionFileError",
    "CaptionReport",
    "ClipdexError",
    "Embedder",
    "EmptyLibrary",
    "Failure",
    "IngestProgress",
    "IngestReport",
    "Library",
    "LibraryUnavailable",
    "ModelMismatch",
    "ModelUnavailable",
    "NoLibrary",
    "Settings",
    "UsageProblem",
    "__version__",
    "get_embedder",
    "register_embedder",
]
