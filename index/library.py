"""`Library`: one folder (or database URL) holding images, captions, vectors and indexes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sqlalchemy import select

from .captions import CaptionReport, add_captions
from .embedder import Embedder
from .errors import EmptyLibrary
from .ingest import IngestProgress, IngestReport, ProgressFn, ingest_images
from .settings import DEFAULT_MODEL, Settings
from .store import FailureRow, Store, check_model
from .vectors import VectorIndex

__all__ = ["Failure", "Library"]

KINDS = ("image", "caption")


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str
    failed_at: float


class Library:
    """A clipdex library: the write path (index, captions) plus stats.

    Args (to `open`):
        home: the library folder (default: CLIPDEX_HOME or the per-user data dir).
        db: an SQLAlchemy URL for the metadata store (default: SQLite inside `home`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.database_url)
        self._embedders: dict[tuple[str, str], Embedder] = {}

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, *, db: str | None = None) -> "Library":
        return cls(Settings.resolve(home, db))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- model ------------------------------------------------------------------------------
    @property
    def model(self) -> str | None:
        """The model spec this library was built with (None while empty)."""
        recorded = self.store.model_fingerprint()
        return recorded[0] if recorded else None

    def embedder(self, model: str | None = None, *, precision: str = "auto") -> Embedder:
        """The library's embedder; `model` must match the recorded one when there is one."""
        recorded = self.model
        spec = model or recorded or DEFAULT_MODEL
        if recorded is not None:
            check_model(recorded, spec)
        key = (spec, precision)
        if key not in self._embedders:
            self._embedders[key] = Embedder.load(spec, precision=precision)
        return self._embedders[key]

    def _claim(self, model: str | None, precision: str) -> Embedder:
        recorded = self.model
        if recorded is not None and model is not None and model != recorded:
            check_model(recorded, model)  # refuse before loading anything heavy
        embedder = self.embedder(model, precision=precision)
        fp = embedder.fingerprint()
        self.store.claim_model(fp["model"], fp["dim"], fp["preprocess"])
        return embedder

    # --- write path -------------------------------------------------------------------------
    def index(self, paths: Iterable[str | os.PathLike], *, model: str | None = None,
              exclude: Iterable[str] = (), include_hidden: bool = False,
              precision: str = "auto", workers: int | None = None,
              progress: ProgressFn | None = None) -> IngestReport:
        """Index (incrementally) the images under `paths`; returns what changed."""
        recorded = self.store.model_fingerprint()
        if recorded is not None:
            check_model(recorded[0], model or recorded[0])
            embedder: Embedder | Callable[[], Embedder] = partial(
                self.embedder, recorded[0], precision=precision)
            dim = recorded[1]
        else:
            embedder = self._claim(model, precision)
            dim = embedder.dim
        report = ingest_images(self.store, embedder, [Path(p) for p in paths], exclude=exclude,
                               include_hidden=include_hidden, workers=workers, progress=progress)
        def note(message: str) -> None:  # a rebuild after crossing a threshold says so
            if progress:
                progress(IngestProgress("index", 0, 0, {"index": message}))

        images = VectorIndex.open(self.store, "image", dim, self.settings.index_dir, save=True,
                                  progress=note)
        captions = VectorIndex.open(self.store, "caption", dim, self.settings.index_dir,
                                    save=True)
        from dataclasses import replace

        return replace(report, index={"images": images.describe(),
                                      "captions": captions.describe()})

    def add_captions(self, path: str | os.PathLike, *, format: str | None = None,
                     model: str | None = None, precision: str = "auto",
                     progress=None) -> CaptionReport:
        """Embed a caption file (csv, tsv, jsonl or COCO json) into the caption index."""
        embedder = self._claim(model, precision)
        report = add_captions(self.store, embedder, Path(path), fmt=format, progress=progress)
        VectorIndex.open(self.store, "caption", embedder.dim, self.settings.index_dir, save=True)
        return report

    # --- read side helpers ------------------------------------------------------------------
    def vector_index(self, kind: str, *, mmap: bool = False) -> VectorIndex:
        """The kind's index for reading, caught up in memory; `mmap` maps the file instead of
        loading it (instant open for one-shot queries, slower per query)."""
        recorded = self.store.model_fingerprint()
        if recorded is None:
            raise EmptyLibrary(f"the library at {self.settings.home} is empty: add images with "
                               f"`clipdex index PATH` or captions with `clipdex captions add FILE`")
        return VectorIndex.open(self.store, kind, recorded[1], self.settings.index_dir, mmap=mmap)

    def failures(self) -> list[Failure]:
        with self.store.session() as s:
            rows = s.scalars(select(FailureRow).order_by(FailureRow.path)).all()
        return [Failure(r.path, r.reason, r.failed_at) for r in rows]

    def stats(self) -> dict:
        recorded = self.store.model_fingerprint()
        index_info = {}
        for kind in KINDS:
            path, generation = VectorIndex._newest_file(self.settings.index_dir, kind)
            index_info[kind + "s"] = {
                "file": str(path) if path else None, "generation": generation,
                "store_generation": self.store.generation(kind)}
            if path is not None:
                import faiss

                idx = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
                index_info[kind + "s"].update(type=_factory_name(idx), vectors=int(idx.ntotal))
        return {
            "home": str(self.settings.home),
            "database": _redact(self.store.url),
            "images": self.store.count("image"),
            "captions": self.store.count("caption"),
            "failed": len(self.failures()),
            "model": recorded[0] if recorded else None,
            "dim": recorded[1] if recorded else None,
            "index": index_info,
            "bytes": _disk_bytes(self.settings),
        }


def _factory_name(index) -> str:
    from .vectors import _describe

    return _describe(index)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _disk_bytes(settings: Settings) -> int:
    total = 0
    for root, _, files in os.walk(settings.home):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total
