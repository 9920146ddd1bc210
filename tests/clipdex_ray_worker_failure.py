"""A plugin for tests/test_ray.py: the `nodisk` embedder is the `test` one in the driver, and
fails to load in a Ray worker as a model whose weights a node lacks does (ModelUnavailable)."""

from __future__ import annotations

import sys

from clipdex_test_embedder import StubEmbedder

from index.embedder import register_embedder
from index.errors import ModelUnavailable

NAME = "nodisk"


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    worker = ray._private.worker.global_worker
    return getattr(worker, "mode", None) == ray.WORKER_MODE


def load(spec: str, **options) -> StubEmbedder:
    if _in_ray_worker():
        raise ModelUnavailable(f"cannot load model {spec!r}: its weights are not on this node")
    return StubEmbedder.load(spec, **options)


register_embedder(NAME, load)
