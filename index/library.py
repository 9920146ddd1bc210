"""`Library`: one folder (or database URL) holding images, captions, vectors and indexes."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import remove_stale_temps
from .captions import MAX_CAPTION_CHARS, CaptionReport, add_captions
from .embedder import Embedder, get_embedder, uses_open_clip
from .errors import ClipdexError, EmptyLibrary, LibraryUnavailable, ModelUnavailable, NoLibrary
from .ingest import IngestProgress, IngestReport, ProgressFn, RayJob, ingest_images
from .settings import DEFAULT_MODEL, Settings
from .store import Store, StoredFailure, check_model
from .vectors import VectorIndex, notice_on_stderr

if TYPE_CHECKING:
    from .distributed import RayOptions

__all__ = ["Failure", "Library"]

KINDS = ("image", "caption")


Failure = StoredFailure  # what `failures()` lists: path, reason, failed_at


class Library:
    """A clipdex library: the write path (index, captions) plus stats.

    Args (to `open`):
        home: the library folder (default: CLIPDEX_HOME or the per-user data dir).
        db: an SQLAlchemy URL for the metadata store (default: SQLite inside `home`).
    """

    def __init__(self, settings: Settings, *, create: bool = True,
                 notice: Callable[[str], None] | None = None) -> None:
        """Open the library `settings` name. Writers (`create`) make it when missing and
        migrate an older one in place, telling `notice` (default: a line on stderr); readers
        write nothing, and a missing library is NoLibrary."""
        self.settings = settings
        # a database of its own (a URL) is opened first: one that cannot be reached or used
        # leaves no library folder behind
        database_first = settings.db_url is not None
        if create and not database_first:
            _begin_home(settings.home)
        elif not create and not database_first and not (settings.home / "library.db").is_file():
            raise NoLibrary(f"no library at {settings.home}: run `clipdex index PATH` first")
        self.store = Store(settings.database_url, create=create,
                           notice=notice or notice_on_stderr)
        if create and database_first:
            try:
                _begin_home(settings.home)
            except ClipdexError:
                self.store.close()
                raise
        self._embedders: dict[tuple[str, str], Embedder] = {}
        self._held: dict[str, VectorIndex] = {}  # index(save_index=False): kept, not saved

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, *, db: str | None = None,
             create: bool = True, notice: Callable[[str], None] | None = None) -> "Library":
        """Open by home folder and/or database URL (each else CLIPDEX_HOME / CLIPDEX_DB, else
        the per-user data dir and SQLite inside it); `create=False` for reading only."""
        return cls(Settings.resolve(home, db), create=create, notice=notice)

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

    def query_embedder(self, *, precision: str | None = None,
                       notify: Callable[[str], None] | None = None) -> Embedder:
        """The embedder queries use: the library's model on ONNX Runtime (no torch import)
        where its export passed the probe, exported first when missing; else torch.

        `notify` hears, once each, why a tower runs on torch and when an export is made or
        found damaged. Settings.runtime "torch" always uses torch, "onnx" never does.
        """
        recorded = self.store.model_fingerprint()
        if recorded is None:
            raise EmptyLibrary(f"the library at {self.settings.home} is empty: add images "
                               f"with `clipdex index PATH` first")
        spec, dim = recorded
        precision = precision or self.settings.precision
        if not self._exports_for_queries(spec, precision):
            return self.embedder(spec, precision=precision)
        key = ("onnx:" + spec, precision)
        if key not in self._embedders:
            self._embedders[key] = self._onnx_embedder(spec, dim, precision, notify)
        return self._embedders[key]

    def _onnx_embedder(self, spec: str, dim: int, precision: str,
                       notify: Callable[[str], None] | None) -> Embedder:
        from .onnx_runtime import ExportUnusable, OnnxEmbedder, export_folder, read_manifest

        say = notify or (lambda message: None)
        strict = self.settings.runtime == "onnx"
        folder = export_folder(self.settings.home, spec, dim)
        try:
            manifest = read_manifest(folder, spec, dim)
        except ExportUnusable as why:
            manifest = self._export(spec, dim, f"the ONNX export is {why}", say, strict)
            if manifest is None:
                return self.embedder(spec, precision=precision)
        told: set[str] = set()

        def fallback() -> Embedder:
            if strict:
                raise ModelUnavailable("CLIPDEX_RUNTIME=onnx, but a tower of this library's "
                                       "model is not exported: " + _tower_errors(manifest))
            return self.embedder(spec, precision=precision)

        def tell(reason: str) -> None:  # a tower on torch: said once per process
            if reason not in told:
                told.add(reason)
                say(reason)

        def damaged(reason: str) -> None:
            from .onnx_export import remove_export

            tell(f"the ONNX export of {spec} is damaged ({reason}): this query uses torch, "
                 f"the next one exports it again")
            from .onnx_runtime import shared_folder

            for damaged_folder in (folder, shared_folder(folder)):  # the files may be links
                remove_export(damaged_folder)

        return OnnxEmbedder(folder, manifest, precision=precision, fallback=fallback,
                            notify=tell, damaged=damaged)

    def _export(self, spec: str, dim: int, why: str, say: Callable[[str], None],
                strict: bool = False) -> dict | None:
        """Export the model for queries now; its manifest, or None (said) to use torch."""
        from .onnx_runtime import (
            export_folder,
            read_manifest,
            share_export,
            shared_folder,
        )

        folder = export_folder(self.settings.home, spec, dim)
        manifest = share_export(shared_folder(folder), folder, spec, dim)
        if manifest is not None:  # another library of this model exported it already
            return manifest
        try:
            from .onnx_export import export_model

            self._embedders.clear()  # the write path's model: not needed now, and large
            folder, _ = export_model(self.settings.home, spec)
            share_export(folder, shared_folder(folder), spec, dim)
            return read_manifest(folder, spec, dim)
        except ClipdexError:
            raise
        except Exception as exc:  # the exporter's, onnxruntime's, ExportUnusable
            from .clip import shorten

            message = (f"{why} and exporting it failed ({type(exc).__name__}: "
                       f"{shorten(str(exc), 200)}): queries use torch")
            if strict:
                raise ModelUnavailable(message) from None
            say(message)
            return None

    def prepare_queries(self, progress: Callable[[str], None] | None = None) -> str:
        """Export the model for the torch-free query runtime when that is not done yet (the
        end of `index` and `captions add` calls this); says what it did."""
        from .onnx_runtime import ExportUnusable, export_folder, read_manifest

        recorded = self.store.model_fingerprint()
        if recorded is None or self.settings.runtime == "torch" or not uses_open_clip(
                recorded[0]):
            return "not needed"
        spec, dim = recorded
        try:
            read_manifest(export_folder(self.settings.home, spec, dim), spec, dim)
            return "ready"
        except ExportUnusable:
            pass
        if progress:
            progress("exporting the model to ONNX for fast queries")
        said: list[str] = []
        manifest = self._export(spec, dim, "the ONNX export is missing", said.append)
        if manifest is None:
            return said[0]
        errors = _tower_errors(manifest)
        return "exported" + (f" (on torch: {errors})" if errors else "")

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
              progress: ProgressFn | None = None, save_index: bool = True,
              ray: "RayOptions | None" = None) -> IngestReport:
        """Index (incrementally) the images under `paths`; returns what changed.

        A file is unchanged while its size and mtime are; `rehash` also compares content
        hashes. `retry_failed` retries every recorded failure, changed or not.

        With `save_index=False` (watch mode: many small batches) the vector indexes are kept
        in memory and caught up from the store on the next call, instead of being read and
        rewritten whole each time (2 GB at a million ViT-B-32 images); `save_indexes()` writes
        them. Nothing is lost meanwhile: the store holds every vector, and whoever opens the
        saved file catches it up.

        With `ray` (index.distributed.RayOptions) decoding and embedding run on a Ray cluster
        (a local instance when it names no address); planning and commits stay here.
        """
        started = time.perf_counter()
        model = model or self.settings.model
        recorded = self.store.model_fingerprint()
        loading: list[float] = []  # seconds spent loading the model, if it was loaded
        runtime: list[str] = []  # what the image tower ran on, once something was embedded
        queries: str | None = None  # the ONNX export's state, when it was made before ingest
        export_seconds = 0.0

        def note(message: str) -> None:  # a rebuild after crossing a threshold says so
            if progress:
                progress(IngestProgress("index", 0, 0, {"index": message}))

        def pick(spec: str, dim: int) -> Embedder:
            """ONNX Runtime where the export's image tower runs on it, else torch."""
            chosen = None if ray is not None else self._ingest_embedder(spec, dim, precision)
            runtime.append("torch" if chosen is None else "onnx")
            return chosen or self.embedder(spec, precision=precision)

        def timed_load() -> Embedder:
            load_started = time.perf_counter()
            try:
                return pick(*recorded)
            finally:
                loading.append(time.perf_counter() - load_started)

        if ray is not None:
            from .distributed import check_address

            check_address(ray.address)  # one line before anything is loaded or written
        if recorded is not None:
            check_model(recorded[0], model or recorded[0])
            embedder: Embedder | Callable[[], Embedder] = timed_load  # only if needed
            spec, dim = recorded
        elif ray is None and (shared := self._shared_export(model, precision)) is not None:
            # a new library of a model this machine has exported: claimed from the export's
            # manifest and embedded on it, without loading torch at all
            fp = shared["fingerprint"]
            self.store.claim_model(fp["model"], fp["dim"], fp["preprocess"])
            spec, dim = fp["model"], int(fp["dim"])
            export_started = time.perf_counter()
            queries = self.prepare_queries(note)  # links the shared export into this home
            export_seconds = time.perf_counter() - export_started
            embedder = timed_load
            recorded = (spec, dim)
        else:
            claimed = self._claim(model, precision)
            loading.append(time.perf_counter() - started)
            dim = claimed.dim
            spec = claimed.spec
            embedder = claimed
            if ray is None and self._exports_for_queries(spec, precision):
                # a new library: its export is made first (the end of the run makes it
                # otherwise) and embeds the photos, 1.2x torch's img/s (bench/onnx_ingest_e2e)
                del claimed, embedder
                self._embedders.clear()  # the torch model: the export loads its own
                export_started = time.perf_counter()
                queries = self.prepare_queries(note)
                export_seconds = time.perf_counter() - export_started
                load_started = time.perf_counter()
                embedder = pick(spec, dim)
                loading.append(time.perf_counter() - load_started)
            else:
                runtime.append("torch")
        job = None if ray is None else \
            RayJob(spec, precision or self.settings.precision, ray)
        report = ingest_images(self.store, embedder, [Path(p) for p in paths], exclude=exclude,
                               include_hidden=include_hidden,
                               workers=workers or self.settings.workers,
                               retry_failed=retry_failed, rehash=rehash,
                               decode_gate=self.settings.decode_gate,
                               decode_nice=self.settings.decode_nice, progress=progress,
                               ray=job)
        images = self._write_index("image", dim, save_index, note)
        captions = self._write_index("caption", dim, save_index)
        if queries is None:
            export_started = time.perf_counter()
            queries = self.prepare_queries(note)
            export_seconds = time.perf_counter() - export_started
        tagged = self._tag_untagged()
        from dataclasses import replace

        load = sum(loading)
        lazy = load if recorded is not None else 0.0  # a lazy load ran inside the ingest
        return replace(report, index={"images": images.describe(),
                                      "captions": captions.describe()},
                       seconds=max(0.0, report.seconds - lazy),
                       model_load_seconds=load + report.model_load_seconds,  # + Ray workers
                       total_seconds=time.perf_counter() - started, queries=queries,
                       export_seconds=export_seconds, tagged=tagged,
                       runtime="ray" if ray is not None else (runtime[0] if runtime else ""))

    def _exports_for_queries(self, spec: str, precision: str | None) -> bool:
        """Whether this library's model gets an ONNX export (for queries, and to ingest on)."""
        precision = precision or self.settings.precision
        return (self.settings.runtime != "torch" and uses_open_clip(spec)
                and not (precision == "bf16" and self.settings.runtime == "auto"))

    def _shared_export(self, model: str | None, precision: str | None) -> dict | None:
        """For a new library: the manifest of a finished export of its model in the per-user
        cache, made by an earlier library (its image tower on ONNX); None otherwise."""
        from .onnx_runtime import (
            MANIFEST,
            ExportUnusable,
            export_folder,
            read_manifest,
            shared_root,
        )

        spec = model or self.settings.model or DEFAULT_MODEL
        if not self._exports_for_queries(spec, precision):
            return None
        cache = shared_root()
        try:
            candidates = sorted(cache.iterdir())
        except OSError:
            return None
        for folder in candidates:
            try:
                head = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
                manifest = read_manifest(folder, spec, int(head.get("dim", 0)))
            except (OSError, ValueError, TypeError, AttributeError, ExportUnusable):
                continue
            if folder.name == export_folder(cache, spec, manifest["dim"]).name and (
                    manifest.get("towers", {}).get("image", {}).get("files")):
                return manifest
        return None

    def _ingest_embedder(self, spec: str, dim: int, precision: str | None) -> Embedder | None:
        """The ONNX Runtime embedder to ingest with, its image session open: where the export
        is made and its image tower passed the probe; None (torch) otherwise. Measured at
        1.21x torch int8's img/s end to end with ViT-B-32 (bench/onnx_ingest_e2e.py, 7 runs),
        2.6x model-only with `tiny`."""
        from .onnx_runtime import ExportUnusable, export_folder, read_manifest

        precision = precision or self.settings.precision
        if not self._exports_for_queries(spec, precision):
            return None
        try:
            read_manifest(export_folder(self.settings.home, spec, dim), spec, dim)
        except ExportUnusable:  # not made yet: the end of this run makes it
            return None
        embedder = self.query_embedder(precision=precision)
        if not getattr(embedder, "open_tower", None) or not embedder.open_tower("image"):
            return None
        return embedder

    def _write_index(self, kind: str, dim: int, save: bool,
                     progress: Callable[[str], None] | None = None) -> VectorIndex:
        """The kind's index caught up after a write: saved, or (not `save`) held in memory."""
        with _index_files_lock(self.settings.home) if save else contextlib.nullcontext():
            return self._catch_up_index(kind, dim, save, progress)

    def _catch_up_index(self, kind: str, dim: int, save: bool,
                        progress: Callable[[str], None] | None) -> VectorIndex:
        held = self._held.get(kind)
        if held is None or held.dim != dim:
            vi = VectorIndex.open(self.store, kind, dim, self.settings.index_dir, save=save,
                                  hold=not save, progress=progress)
        else:
            vi = held
            vi.catch_up(self.store, progress=progress)
            if save:
                self._save(vi)
        if save:
            self._held.pop(kind, None)
        else:
            self._held[kind] = vi
        return vi

    def _newer_than_file(self, vi: VectorIndex) -> bool:
        return VectorIndex.newest_file(self.settings.index_dir, vi.kind)[1] < vi.generation

    def _save(self, vi: VectorIndex) -> bool:
        if not self._newer_than_file(vi):
            return False  # that generation is on disk already
        vi.save()
        return True

    def unsaved_indexes(self) -> list[str]:
        """The kinds whose held index (`index(save_index=False)`) is newer than its file."""
        return [kind for kind, vi in self._held.items() if self._newer_than_file(vi)]

    def save_indexes(self) -> list[str]:
        """Write every held index newer than its file (see `index`); returns their kinds."""
        with _index_files_lock(self.settings.home):
            return [kind for kind, vi in self._held.items() if self._save(vi)]

    # --- tags -------------------------------------------------------------------------------
    def tag(self, labels: str | os.PathLike | None = None, *,
            progress: Callable[[int, int], None] | None = None) -> dict:
        """Tag every image zero-shot from `labels` (a label file; default: the built-in
        vocabulary for the library's model), replacing earlier tags; new images are then
        tagged by each `index` run. Returns counts per label."""
        from .tags import builtin_vocabulary, read_labels

        if self.model is None:
            raise EmptyLibrary(f"the library at {self.settings.home} is empty: add images "
                               f"with `clipdex index PATH` first")
        vocabulary = read_labels(labels) if labels is not None else builtin_vocabulary(self.model)
        ids = self.store.ids("image")
        self._write_tags(vocabulary, ids, replace_all=True, progress=progress)
        return {"images": len(ids), "labels": vocabulary.size, "source": vocabulary.source,
                "tags": self.store.tag_summary()}

    def _tag_untagged(self) -> int:
        """Tag the images that have none yet, once the library has a vocabulary."""
        from .tags import Vocabulary

        recorded = self.store.tag_vocabulary()
        if not recorded:
            return 0
        ids = self.store.untagged_image_ids()
        if ids:
            self._write_tags(Vocabulary.from_json(recorded), ids, replace_all=False)
        return len(ids)

    def _write_tags(self, vocabulary, ids, *, replace_all: bool,
                    progress: Callable[[int, int], None] | None = None,
                    chunk: int = 4096) -> None:
        import numpy as np

        from .tags import label_vectors, tag_vectors

        labels = label_vectors(self.query_embedder(), vocabulary)
        ids = [int(i) for i in ids]
        with self.store.session() as s, s.begin():  # all or nothing: a kill keeps the old tags
            if replace_all:  # the vocabulary and its tags commit together
                self.store.replace_tags(s, [], image_ids=None)
                self.store.set_meta(s, "tags.vocabulary", vocabulary.to_json())
            for start in range(0, len(ids), chunk):
                part = ids[start:start + chunk]
                stored = self.store.vectors_for("image", part)
                present = [i for i in part if i in stored]
                tags = tag_vectors(np.stack([stored[i] for i in present]) if present
                                   else np.empty((0, 1), np.float32), vocabulary, labels)
                self.store.replace_tags(
                    s, [(i, t.group, t.label, t.score) for i, image_tags in zip(present, tags)
                        for t in image_tags], image_ids=present)
                if progress:
                    progress(min(start + chunk, len(ids)), len(ids))

    def add_captions(self, path: str | os.PathLike, *, format: str | None = None,
                     model: str | None = None, precision: str | None = None,
                     max_chars: int = MAX_CAPTION_CHARS, progress=None) -> CaptionReport:
        """Embed a caption file (csv, tsv, jsonl or COCO json) into the caption index."""
        embedder = self._claim(model, precision)
        report = add_captions(self.store, embedder, Path(path), fmt=format, max_chars=max_chars,
                              progress=progress)
        with _index_files_lock(self.settings.home):
            VectorIndex.open(self.store, "caption", embedder.dim, self.settings.index_dir,
                             save=True)
        self.prepare_queries()
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
            if path is not None and recorded:
                import faiss

                from .vectors import UnreadableIndex, read_index_file

                try:  # as the library reads it: on-disk lists beside it, nothing on stdout
                    idx = read_index_file(path, faiss.IO_FLAG_MMAP, recorded[1])
                except UnreadableIndex:  # the next writer or reader rebuilds it from the store
                    index_info[kind + "s"].update(type="unreadable", vectors=None)
                    continue
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
            "photos": self.photo_summary(),
            "tags": self.store.tag_summary(),
        }

    def photo_summary(self) -> dict:
        """The photos' metadata in brief: date range (ISO, camera clock), cameras and places
        with their counts (most first), how many have GPS, formats."""
        from .photo_meta import iso_time

        summary = self.store.meta_summary()
        taken = summary["taken"]
        if taken:
            summary["taken"] = {**taken, "first": iso_time(taken["first"], None),
                                "last": iso_time(taken["last"], None)}
        summary["needs_reindex"] = (self.store.count("image") - summary["with_metadata"])
        return summary


def _tower_errors(manifest: dict) -> str:
    """Why towers were not exported: "image: reason; …" ("" when both were)."""
    return "; ".join(f"{tower}: {info['error']}" for tower, info in
                     manifest.get("towers", {}).items() if info.get("error"))


def _factory_name(index) -> str:
    from .vectors import describe_index

    return describe_index(index)


def _begin_home(home: Path) -> None:
    """A writer's library folder: made when missing, cleared of the temp files of writers
    that were killed (a save between its write and its rename)."""
    _make_home(home)
    remove_stale_temps(home)


INDEX_FILES_LOCK = "index.lock"


@contextlib.contextmanager
def _index_files_lock(home: Path) -> Iterator[None]:
    """Writers of one library (two `clipdex index` runs on a shared PostgreSQL store) write
    its index files one at a time: each then starts from the other's newest file, and none
    lists a file the other deletes before it is read (which would rebuild the index from the
    store for nothing). An flock: released by the kernel when its holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: writers race as before, and catch up on the next open
        yield
        return
    with open(home / INDEX_FILES_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
