"""A deterministic, torch-free embedder for the tests of ingestion, storage, crash recovery and
bad input: registered as `test` through the real registry (index.embedder), so libraries,
the CLI and subprocesses (CLIPDEX_PLUGINS=clipdex_test_embedder) load it as they would CLIP.

Images: the mean colour of each cell of an 8×8 grid over a 32×32 resize, through a fixed random
projection. Texts: a sum of one fixed random vector per word. Both unit vectors of DIM floats,
the same in every process. Nothing here means anything: tests that use it look at counts, ids,
stored bytes and files, never at what a query finds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from index.embedder import register_embedder

NAME = "test"
_TESTS = Path(__file__).resolve().parent
# what a subprocess needs to load this embedder through the same registry
SUBPROCESS_ENV = {"CLIPDEX_PLUGINS": "clipdex_test_embedder",
                  "PYTHONPATH": os.pathsep.join([str(_TESTS), str(_TESTS.parent)])}
DIM = 32
SIDE = 32
GRID = 8
_PROJECTION = np.random.default_rng(0).standard_normal((GRID * GRID * 3, DIM)).astype(np.float32)


class StubEmbedder:
    """Implements index.embedder.Embedder without a model."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.dim = DIM
        self.image_size = SIDE
        self.precision = "fp32"
        self.device = SimpleNamespace(type="cpu")

    @classmethod
    def load(cls, spec: str, **_: Any) -> "StubEmbedder":
        return cls(spec)

    def fingerprint(self) -> dict[str, Any]:
        return {"model": self.spec, "dim": self.dim, "preprocess": f"resize {SIDE} bilinear"}

    def prepare(self, image) -> np.ndarray:
        from PIL import Image

        return np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR),
                          np.uint8)

    def collate(self, items: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(items)

    def encode_image_tensors(self, batch: np.ndarray) -> np.ndarray:
        cell = SIDE // GRID
        grid = batch.astype(np.float32).reshape(len(batch), GRID, cell, GRID, cell, 3)
        features = grid.mean(axis=(2, 4)).reshape(len(batch), -1) / 255.0 - 0.5
        return _unit(features @ _PROJECTION)

    def encode_images(self, images: Sequence) -> np.ndarray:
        if not len(images):
            return np.empty((0, DIM), np.float32)
        return self.encode_image_tensors(self.collate([self.prepare(im) for im in images]))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.empty((0, DIM), np.float32)
        return _unit(np.stack([sum((_word(w) for w in t.lower().split()), np.zeros(DIM))
                               + _word(t) * 1e-3 for t in texts]).astype(np.float32))


def _word(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8", "surrogatepass")).digest()[:8],
                          "little")
    return np.random.default_rng(seed).standard_normal(DIM)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


register_embedder(NAME, StubEmbedder.load)
