"""What an embedder is (a Protocol), and the registry that turns a model spec into one.

The write path and the query path see only this protocol. Specs are strings: `tiny`,
`ViT-B-32:laion2b_s34b_b79k`, `hf-hub:…`, `local-dir:…` load through open_clip (index.clip,
the default); another implementation registers a name, and specs equal to that name or starting
with `name:` load through it. Modules named in CLIPDEX_PLUGINS (comma-separated) are imported
before the first lookup, so a plugin can register itself in any process, subprocesses included.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["PLUGINS_ENV", "Embedder", "EmbedderFactory", "get_embedder", "is_embedder",
           "register_embedder", "unregister_embedder", "uses_open_clip"]

PLUGINS_ENV = "CLIPDEX_PLUGINS"


@runtime_checkable
class Embedder(Protocol):
    """Encodes images and texts of one model into unit vectors of one space.

    Attributes: `spec` (the model string), `dim`, `image_size` (the model's input side),
    `precision`, and `device` (with a `.type`, "cpu" or "cuda": ingestion gates decoders on a
    CPU). `prepare` runs in decode threads (per image, from an upright RGB PIL image) and
    `collate` turns a batch of what it returned into the input of `encode_image_tensors`.
    """

    spec: str
    dim: int
    image_size: int
    precision: str
    device: Any

    def fingerprint(self) -> dict[str, Any]: ...

    def prepare(self, image: "Image.Image") -> Any: ...

    def collate(self, items: Sequence[Any]) -> Any: ...

    def encode_image_tensors(self, batch: Any) -> np.ndarray: ...

    def encode_images(self, images: Sequence["Image.Image"]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


# spec, *, device, precision, threads -> Embedder
EmbedderFactory = Callable[..., Embedder]
_FACTORIES: dict[str, EmbedderFactory] = {}
_plugins_loaded = False


def is_embedder(obj: object) -> bool:
    """Whether `obj` is a loaded embedder (not a factory that makes one)."""
    return isinstance(obj, Embedder)


def register_embedder(name: str, factory: EmbedderFactory) -> None:
    """Load specs `name` and `name:…` with `factory(spec, device=, precision=, threads=)`."""
    if not name or ":" in name:
        raise ValueError(f"an embedder name is a word without ':' (got {name!r})")
    _FACTORIES[name] = factory


def unregister_embedder(name: str) -> None:
    _FACTORIES.pop(name, None)


def get_embedder(spec: str, *, device: str | None = None, precision: str = "auto",
                 threads: int | None = None) -> Embedder:
    """The embedder for a model spec: a registered one, else open_clip's.

    Raises UsageProblem or ModelUnavailable (from the factory) with a message for the user.
    """
    _load_plugins()
    name = spec.strip().partition(":")[0]
    factory = _FACTORIES.get(name)
    if factory is None:
        from .clip import ClipEmbedder

        factory = ClipEmbedder.load
    return factory(spec, device=device, precision=precision, threads=threads)


def uses_open_clip(spec: str) -> bool:
    """Whether `spec` loads through open_clip (no registered embedder claims it)."""
    _load_plugins()
    return spec.strip().partition(":")[0] not in _FACTORIES


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            from .errors import ClipdexError

            raise ClipdexError(f"{PLUGINS_ENV} names {module!r}, which cannot be imported: "
                               f"{exc}") from None
