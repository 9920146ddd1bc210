"""`Library`: one folder (or database URL) holding images, captions, vectors and indexes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .atomic import remove_stale_temps
from .captions import MAX_CAPTION_CHARS, CaptionReport, add_captions
from .embedder import Embedder, get_embedder
from .errors import EmptyLibrary, LibraryUnavailable, NoLibrary
from .ingest import IngestProgress, IngestReport, ProgressFn, ingest_images
from .settings import DEFAULT_MODEL, Settings
from .store import Store, StoredFailure, check_model
from .vectors import VectorIndex

__all__ = ["Failure", "Library"]

KINDS = ("image", "caption")


Failure = StoredFailure  # what `failures()` lists: path, reason, failed_at


class Library:
    """A clipdex library: the write path (index, captions) plus stats.

    Args (to `open`):
        home: the library folder (default: CLIPDEX_HOME or the per-user data dir).
        db: an SQLAlchemy URL for the metadata store (default: SQLite inside `home`).
    """

    def __init__(self, settings: Settings, *, create: bool = True) -> None:
        """Open the library `settings` name. Writers (`create`) make it when missing; readers
        write nothing, and a missing library is NoLibrary."""
        self.settings = settings
        if create:
            _make_home(settings.home)
            remove_stale_temps(settings.home)  # e.g. a prior save killed before its rename
        elif settings.db_url is None and not (settings.home / "library.db").is_file():
            raise NoLibrary(f"no library at {settings.home}: run `clipdex index PATH` first")
        self.store = Store(settings.database_url, create=create)
        self._embedders: dict[tuple[str, str], Embedder] = {}

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, *, db: str | None = None,
             create: bool = True) -> "Library":
        """Open by home folder and/or database URL (each else CLIPDEX_HOME / CLIPDEX_DB, else
        the per-user data dir and SQLite inside it); `create=False` for reading only."""
        return cls(Settings.resolve(home, db), create=create)

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

    def embedder(self, model: str | None = None, *, precision: str | None = None) -> Embedder:
        """The library's embedder; `model` must match the recorded one when there is one.

        `model` and `precision` default to the Settings' (flag, CLIPDEX_*, or default)."""
        recorded = self.model
        precision = precision or self.settings.precision
        spec = model or recorded or self.settings.model or DEFAULT_MODEL
        if recorded is not None:
            check_model(recorded, spec)
        key = (spec, precision)
        if key not in self._embedders:
            self._embedders[key] = get_embedder(spec, precision=precision)
        return self._embedders[key]

    def _claim(self, model: str | None, precision: str | None) -> Embedder:
        model = model or self.settings.model
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
              precision: str | None = None, workers: int | None = None,
              retry_failed: bool = False, rehash: bool = False,
              progress: ProgressFn | None = None) -> IngestReport:
        """Index (incrementally) the images under `paths`; returns what changed.

        A file is unchanged while its size and mtime are; `rehash` also compares content
        hashes. `retry_failed` retries every recorded failure, changed or not.
        """
        started = time.perf_counter()
        model = model or self.settings.model
        recorded = self.store.model_fingerprint()
        loading: list[float] = []  # seconds spent loading the model, if it was loaded

        def timed_load() -> Embedder:
            load_started = time.perf_counter()
            try:
                return self.embedder(recorded[0], precision=precision)
            finally:
                loading.append(time.perf_counter() - load_started)

        if recorded is not None:
            check_model(recorded[0], model or recorded[0])
            embedder: Embedder | Callable[[], Embedder] = timed_load  # only if needed
            dim = recorded[1]
        else:
            embedder = self._claim(model, precision)
            loading.append(time.perf_counter() - started)
            dim = embedder.dim
        report = ingest_images(self.store, embedder, [Path(p) for p in paths], exclude=exclude,
                               include_hidden=include_hidden,
                               workers=workers or self.settings.workers,
                               retry_failed=retry_failed, rehash=rehash,
                               decode_gate=self.settings.decode_gate,
                               decode_nice=self.settings.decode_nice, progress=progress)
        def note(message: str) -> None:  # a rebuild after crossing a threshold says so
            if progress:
                progress(IngestProgress("index", 0, 0, {"index": message}))

        images = VectorIndex.open(self.store, "image", dim, self.settings.index_dir, save=True,
                                  progress=note)
        captions = VectorIndex.open(self.store, "caption", dim, self.settings.index_dir,
                                    save=True)
        from dataclasses import replace

        load = sum(loading)
        lazy = load if recorded is not None else 0.0  # a lazy load ran inside the ingest
        return replace(report, index={"images": images.describe(),
                                      "captions": captions.describe()},
                       seconds=max(0.0, report.seconds - lazy), model_load_seconds=load,
                       total_seconds=time.perf_counter() - started)

    def add_captions(self, path: str | os.PathLike, *, format: str | None = None,
                     model: str | None = None, precision: str | None = None,
                     max_chars: int = MAX_CAPTION_CHARS, progress=None) -> CaptionReport:
        """Embed a caption file (csv, tsv, jsonl or COCO json) into the caption index."""
        embedder = self._claim(model, precision)
        report = add_captions(self.store, embedder, Path(path), fmt=format, max_chars=max_chars,
                              progress=progress)
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
        return self.store.failures()

    def stats(self) -> dict:
        recorded = self.store.model_fingerprint()
        index_info = {}
        for kind in KINDS:
            path, generation = VectorIndex.newest_file(self.settings.index_dir, kind)
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
    from .vectors import describe_index

    return describe_index(index)


def _make_home(home: Path) -> None:
    """The library folder, made if missing; one clear error when it cannot be used."""
    if home.exists() and not home.is_dir():
        raise LibraryUnavailable(f"the library home {home} is not a folder (--home)")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LibraryUnavailable(f"cannot create the library home {home}: "
                                 f"{exc.strerror or exc}") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise LibraryUnavailable(f"the library home {home} is not writable")


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
