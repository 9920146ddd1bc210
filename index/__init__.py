"""clipdex's write path: the embedder, scanning, ingestion, the store and the vector indexes.

The names below load their module on first use (PEP 562), so that `index.settings` or
`index.onnx_runtime` can be imported without SQLAlchemy, FAISS or the ingestion code: a cold
query starts its model's session on those before the store's imports (cli.py).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "CaptionReport": "captions",
    "Embedder": "embedder", "get_embedder": "embedder", "register_embedder": "embedder",
    "CaptionFileError": "errors", "ClipdexError": "errors", "EmptyLibrary": "errors",
    "LibraryUnavailable": "errors", "ModelMismatch": "errors", "ModelUnavailable": "errors",
    "NoLibrary": "errors", "UsageProblem": "errors",
    "IngestProgress": "ingest", "IngestReport": "ingest",
    "Failure": "library", "Library": "library",
    "DEFAULT_MODEL": "settings", "Settings": "settings",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'index' has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


if TYPE_CHECKING:
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
