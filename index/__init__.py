"""clipdex's write path: the embedder, scanning, ingestion, the store and the vector indexes."""

from .captions import CaptionReport
from .embedder import Embedder
from .errors import (
    CaptionFileError,
    ClipdexError,
    EmptyLibrary,
    ModelMismatch,
    ModelUnavailable,
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
    "ModelMismatch",
    "ModelUnavailable",
    "Settings",
    "UsageProblem",
    "__version__",
]
