"""Shared fixtures: a library home in tmp_path, generated scenes, the shipped tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# huggingface_hub reads this once, at import (which may happen while tests are collected)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never touch the user's real library; never reach for a hub."""
    monkeypatch.setenv("CLIPDEX_HOME", str(tmp_path / "default-home"))
    monkeypatch.delenv("CLIPDEX_DB", raising=False)
    monkeypatch.delenv("CLIPDEX_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CLIPDEX_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs a network; set CLIPDEX_NETWORK_TESTS=1")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_embedder():
    from index.embedder import Embedder

    return Embedder.load("tiny")


@pytest.fixture(scope="module")
def one_model_load():
    """Load each model once per module: every Library and CLI call in it shares the real one."""
    from index.embedder import Embedder

    cache: dict = {}
    original = Embedder.load.__func__

    def load(cls, spec, **options):
        key = (spec, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = original(cls, spec, **options)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Embedder, "load", classmethod(load))
        yield
