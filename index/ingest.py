"""Incremental, crash-safe ingestion of photo folders into the store.

Files are classified against the store (new / changed / unchanged / moved / removed), decoded in
worker threads while the model runs, and committed one batch per transaction together with the
generation bump, so a kill at any point loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from . import faults
from .embedder import Embedder, is_embedder
from .errors import ConcurrentWriter
from .photo_meta import META_VERSION, PhotoMeta, places_for, read_file_meta
from .scan import (
    Decoded,
    DecodeFailure,
    FileVanished,
    FoundFile,
    ScanError,
    decode_file,
    hash_file,
    retried_every_run,
    scan,
)
from .settings import DECODE_NICE
from .store import FailureRow, ImageRow, Store, failure_reason, now, rows_under

__all__ = ["IngestProgress", "IngestReport", "RayJob", "ingest_images"]

BATCH_SIZE = 64
# A file whose decoding takes longer than this is recorded as a failure and the run goes on
# (a 179 MP PNG, the largest accepted, decodes in ~3 s here; a hung network mount never ends).
DECODE_TIMEOUT_S = 300.0


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _init_decode_thread(nice: int) -> None:
    """Decode threads: one torch thread each (preprocess's tensor ops would otherwise start
    an OpenMP team per decoder), and `nice` lower priority than the model's threads (see
    settings.DECODE_NICE)."""
    torch = sys.modules.get("torch")  # an embedder without torch needs no thread setting
    if torch is not None:
        torch.set_num_threads(1)  # per calling thread: the model's threads are unaffected
    if nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:  # on Linux a thread id is a valid PRIO_PROCESS target and affects that thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
        except OSError:
            pass


@dataclass(frozen=True)
class IngestReport:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    failed: int = 0  # files that failed in this run (reasons in `failures`)
    skipped_failed: int = 0  # files that failed before and have not changed since
    rehashed: int = 0  # unchanged files whose content hash was checked (--rehash)
    seconds: float = 0.0  # scanning and embedding (Library.index takes a model load out)
    failures: tuple[tuple[str, str], ...] = ()
    index: dict = field(default_factory=dict)
    model_load_seconds: float = 0.0
    total_seconds: float = 0.0  # the whole call: model load, scan, embed, index files
    queries: str = ""  # the ONNX query export: "ready", "exported…", or why queries use torch
    export_seconds: float = 0.0  # of total_seconds, exporting the model for queries
    metadata: dict = field(default_factory=dict)  # photo metadata read this run (_MetaCounts)
    tagged: int = 0  # images given zero-shot tags this run (once a library has tags)
    ray: dict = field(default_factory=dict)  # --ray: the cluster, its workers, start time
    runtime: str = ""  # what embedded the photos: "onnx", "torch", "ray" ("": nothing loaded)

    @property
    def failures_remain(self) -> bool:
        """Whether files under the indexed paths are still not indexed (`clipdex index` exits
        3): those that failed now, and those that failed before and did not change."""
        return bool(self.failed or self.skipped_failed)

    def as_dict(self) -> dict:
        return {
            "new": self.new, "changed": self.changed, "unchanged": self.unchanged,
            "moved": self.moved, "removed": self.removed, "failed": self.failed,
            "skipped_failed": self.skipped_failed, "rehashed": self.rehashed,
            "failures_remain": self.failures_remain, "seconds": round(self.seconds, 3),
            "model_load_seconds": round(self.model_load_seconds, 3),
            "total_seconds": round(self.total_seconds, 3),
            "queries": self.queries, "export_seconds": round(self.export_seconds, 3),
            "runtime": self.runtime,
            "images_per_second": round((self.new + self.changed) / self.seconds, 2)
            if self.seconds else None,
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
            "metadata": self.metadata, "tagged": self.tagged,
            "index": self.index, **({"ray": self.ray} if self.ray else {}),
        }


@dataclass(frozen=True)
class IngestProgress:
    """Sent to the progress callback: `total` files to embed, `done` so far, running counts."""

    phase: str  # "scan" | "embed" | "index"
    done: int
    total: int
    counts: dict


ProgressFn = Callable[[IngestProgress], None]


@dataclass
class _Plan:
    found: list[FoundFile]
    to_embed: list[FoundFile]
    changed_ids: dict[str, int]  # path -> id of the row a changed file replaces
    unchanged: int
    skipped_failed: int
    vanished: dict[int, str]  # id -> content hash of rows whose file is no longer found
    vanished_by_hash: dict[str, list[int]]  # content hash -> such row ids (for move detection)
    vanished_failures: list[str]
    scan_failures: list[tuple[FoundFile, str]]  # broken links etc., new or changed since
    unchanged_rows: list[tuple[FoundFile, int, str]] = field(default_factory=list)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _plan(store: Store, roots: list[Path], found: list[FoundFile],
          scan_errors: list[ScanError], *, retry_failed: bool = False,
          keep_unchanged: bool = False) -> _Plan:
    root_strs = [os.path.abspath(r) for r in roots]
    # what sits in a folder that could not be listed was not seen, not deleted: keep it
    unlisted = [e.path for e in scan_errors if e.folder]
    with store.session() as s:
        rows = {
            r.path: r for r in rows_under(
                s, select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                          ImageRow.content_hash), ImageRow.path, root_strs)
            if _under(r.path, root_strs) and not _under(r.path, unlisted)
        }
        failures = {f.path: f for f in rows_under(s, select(FailureRow), FailureRow.path,
                                                   root_strs, scalars=True)
                    if _under(f.path, root_strs) and not _under(f.path, unlisted)}
    to_embed, changed_ids, scan_failures = [], {}, []
    unchanged = skipped_failed = 0
    unchanged_rows: list[tuple[FoundFile, int, str]] = []
    found_paths = set()
    unusable = [(FoundFile(e.path, e.size, e.mtime_ns), e.reason)
                for e in scan_errors if not e.folder]
    for f, reason in [(f, None) for f in found] + unusable:
        found_paths.add(f.path)
        row = rows.get(f.path)
        if reason is None and row is not None and (row.size, row.mtime_ns) == (f.size, f.mtime_ns):
            unchanged += 1
            if keep_unchanged:
                unchanged_rows.append((f, row.id, row.content_hash))
            continue
        failure = failures.get(f.path)
        if row is None and failure is not None and not retry_failed and \
                not retried_every_run(failure.reason) and \
                (failure.size, failure.mtime_ns) == (f.size, f.mtime_ns):
            skipped_failed += 1  # retried only once the file changes
            continue
        if row is not None:
            changed_ids[f.path] = row.id
        if reason is None:
            to_embed.append(f)
        else:
            scan_failures.append((f, reason))
    vanished = {r.id: r.content_hash for p, r in rows.items() if p not in found_paths}
    by_hash: dict[str, list[int]] = {}
    for row_id, content_hash in vanished.items():
        by_hash.setdefault(content_hash, []).append(row_id)
    vanished_failures = [p for p in failures if p not in found_paths]
    return _Plan(found, to_embed, changed_ids, unchanged, skipped_failed, vanished, by_hash,
                 vanished_failures, scan_failures, unchanged_rows)


class _Turns:
    """Decoders and the model take turns on the CPU: any number of decodes at once, or the
    model alone (a readers–writer lock that favours the model).

    A decode running longer than `stale_after` seconds no longer holds the model back: the
    run has given up on it (DECODE_TIMEOUT_S), and the model must not wait for it either.
    """

    def __init__(self, *, stale_after: float | None = None) -> None:
        self._cond = threading.Condition()
        self._decoding: dict[object, float] = {}  # token -> start time
        self._model = False
        self._stale_after = DECODE_TIMEOUT_S if stale_after is None else stale_after

    @contextlib.contextmanager
    def decode(self) -> Iterator[None]:
        token = object()
        with self._cond:
            self._cond.wait_for(lambda: not self._model)
            self._decoding[token] = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                del self._decoding[token]
                self._cond.notify_all()

    def _decodes_done(self) -> bool:
        oldest_alive = time.monotonic() - self._stale_after
        return all(started < oldest_alive for started in self._decoding.values())

    @contextlib.contextmanager
    def model(self) -> Iterator[None]:
        with self._cond:
            self._model = True  # no new decode starts; the ones running finish first
            try:
                while not self._cond.wait_for(self._decodes_done, timeout=1.0):
                    pass  # woken each second: a decode may have gone stale meanwhile
            except BaseException:  # Ctrl-C while waiting: decoders must not wait for ever
                self._model = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._model = False
                self._cond.notify_all()


class _MetaCounts:
    """What this run read of photo metadata: images, how many with a camera time, a camera,
    GPS, a place, and the fields left empty because their value could not be used."""

    def __init__(self) -> None:
        self.read = self.updated = self.with_exif_time = self.with_camera = 0
        self.with_gps = self.with_place = 0
        self.problems: dict[str, int] = {}

    def add(self, meta: PhotoMeta) -> None:
        self.read += 1
        self.with_exif_time += meta.taken_source not in (None, "mtime")
        self.with_camera += meta.camera is not None
        self.with_gps += meta.lat is not None
        self.with_place += meta.place is not None
        for problem in meta.problems:
            self.problems[problem] = self.problems.get(problem, 0) + 1

    def as_dict(self) -> dict:
        return {"read": self.read, "updated_without_embedding": self.updated,
                "with_exif_time": self.with_exif_time, "with_camera": self.with_camera,
                "with_gps": self.with_gps, "with_place": self.with_place,
                "unusable": dict(sorted(self.problems.items()))}


def _with_places(metas: list[PhotoMeta]) -> list[PhotoMeta]:
    """The metadata with each GPS position's place filled in (offline reverse geocoding)."""
    located = [i for i, m in enumerate(metas) if m.lat is not None and m.lon is not None]
    if not located:
        return metas
    try:
        places = places_for([(metas[i].lat, metas[i].lon) for i in located])
    except ImportError:  # reverse-geocode missing: positions are kept, places stay empty
        return metas
    out = list(metas)
    for i, place in zip(located, places):
        out[i] = replace(out[i], place=place)
    return out


class _Batch:
    """Rows waiting for the model and the commit."""

    def __init__(self) -> None:
        self.files: list[FoundFile] = []
        self.decoded: list[Decoded] = []  # hash and size only: the pixels are in `tensors`
        self.tensors: list = []  # what Embedder.prepare returned, per image
        self.failures: list[tuple[FoundFile, str]] = []
        self.moves: list[tuple[int, FoundFile]] = []
        self.vanished: list[FoundFile] = []  # deleted since the scan: removals

    def __len__(self) -> int:
        return len(self.files) + len(self.failures) + len(self.moves) + len(self.vanished)


def ingest_images(
    store: Store,
    embedder: Embedder | Callable[[], Embedder],
    roots: Iterable[Path],
    *,
    exclude: Iterable[str] = (),
    include_hidden: bool = False,
    workers: int | None = None,
    batch_size: int = BATCH_SIZE,
    retry_failed: bool = False,
    rehash: bool = False,
    decode_gate: bool = True,
    decode_nice: int = DECODE_NICE,
    progress: ProgressFn | None = None,
    ray: "RayJob | None" = None,
) -> IngestReport:
    """Bring the store's images under `roots` in line with the files on disk.

    A file counts as unchanged while its size and mtime are; with `rehash`, unchanged files
    are hashed too and re-embedded when their content differs. Recorded failures are retried
    when their file changes, when the reason was a permission error, or with `retry_failed`.
    `embedder` may be a zero-argument factory, called only when something needs embedding.
    `decode_gate` and `decode_nice` are Settings' (how decoders share a CPU with the model).
    With `ray`, decoding and embedding run on a Ray cluster (index.distributed) and
    `embedder` is not used; planning and commits are the same.
    """
    started = time.perf_counter()
    roots = [Path(r) for r in roots]
    plan, scan_errors = _scan_and_plan(store, roots, exclude=exclude,
                                       include_hidden=include_hidden,
                                       retry_failed=retry_failed, rehash=rehash)
    workers = workers or _cores()
    rehashed = _rehash_unchanged(plan, workers) if rehash else 0
    counts = {"new": 0, "changed": 0, "unchanged": plan.unchanged, "moved": 0, "failed": 0,
              "removed": 0}
    meta = _MetaCounts()
    if progress:
        progress(IngestProgress("scan", len(plan.found), len(plan.found), dict(counts)))
    # folders that could not be listed are reported each run; files that failed are recorded
    failures: list[tuple[str, str]] = [(e.path, e.reason) for e in scan_errors if e.folder]
    counts["failed"] += len(failures)
    ray_report: dict = {}
    ray_start = 0.0  # starting the cluster and its workers' model load: reported apart
    if ray is not None:
        ray_report, ray_start = _embed_planned_ray(store, ray, plan, counts, failures, meta,
                                                   batch_size=batch_size, progress=progress)
    else:
        if plan.to_embed and not is_embedder(embedder):
            embedder = embedder()  # an unchanged tree never pays for loading the model
        _embed_planned(store, embedder, plan, counts, failures, meta, workers=workers,
                       batch_size=batch_size, gate=_gate_for(embedder, decode_gate),
                       nice=decode_nice, progress=progress)
    _backfill_meta(store, plan, meta, workers=workers, progress=progress)
    removed = _remove_vanished(store, plan) + counts["removed"]
    with store.session() as s, s.begin():
        store.link_captions(s)
    return IngestReport(
        new=counts["new"], changed=counts["changed"], unchanged=plan.unchanged,
        moved=counts["moved"], removed=removed, failed=counts["failed"],
        skipped_failed=plan.skipped_failed, rehashed=rehashed,
        seconds=time.perf_counter() - started - ray_start, failures=tuple(failures),
        metadata=meta.as_dict(), ray=ray_report,
        model_load_seconds=ray_report.get("model_load_seconds", 0.0))


def _scan_and_plan(store: Store, roots: list[Path], *, exclude: Iterable[str],
                   include_hidden: bool, retry_failed: bool,
                   rehash: bool) -> tuple[_Plan, list[ScanError]]:
    scan_errors: list[ScanError] = []
    found = []
    for f in scan(roots, exclude=exclude, include_hidden=include_hidden,
                  on_error=scan_errors.append):
        faults.crash_test_hook("scan")
        found.append(f)
    plan = _plan(store, roots, found, scan_errors, retry_failed=retry_failed,
                 keep_unchanged=rehash)
    return plan, scan_errors


def _rehash_unchanged(plan: _Plan, workers: int) -> int:
    """Hash the files that look unchanged; those whose bytes differ are re-embedded."""
    with ThreadPoolExecutor(workers, thread_name_prefix="clipdex-hash") as pool:
        hashes = pool.map(_hash_or_none, [f.path for f, _, _ in plan.unchanged_rows])
        for (f, row_id, stored_hash), digest in zip(plan.unchanged_rows, hashes):
            if digest is not None and digest != stored_hash:
                plan.to_embed.append(f)
                plan.changed_ids[f.path] = row_id
                plan.unchanged -= 1
    return len(plan.unchanged_rows)


def _hash_or_none(path: str) -> str | None:
    try:
        return hash_file(path)
    except OSError:
        return None  # gone or unreadable: the embedding pass will not see it either


def _backfill_meta(store: Store, plan: _Plan, meta: _MetaCounts, *, workers: int,
                   progress: ProgressFn | None, batch_size: int = 512) -> None:
    """Give the indexed images found this run that have no (current) metadata row theirs:
    read from each file's header, nothing decoded or embedded (a library indexed before photo
    metadata existed gains it this way on its next run)."""
    if store.meta_complete(META_VERSION):  # two counts, not a join over every image
        return
    found = {f.path for f in plan.found}
    few = len(found) <= 5000  # a watch batch: ask for its files, not every image's row
    todo = [(i, path, mtime) for i, path, mtime in store.images_needing_meta(
        META_VERSION, sorted(found) if few else None) if path in found]
    if not todo:
        return
    done = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="clipdex-meta") as pool:
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            read = list(pool.map(_file_meta_or_none, [(p, m) for _, p, m in part]))
            rows = [(image_id, m) for (image_id, _, _), m in zip(part, read) if m is not None]
            located = _with_places([m for _, m in rows])
            with store.session() as s, s.begin():
                store.write_meta(s, [(image_id, m.row())
                                     for (image_id, _), m in zip(rows, located)])
            for m in located:
                meta.add(m)
            meta.updated += len(rows)
            done += len(part)
            if progress:
                progress(IngestProgress("metadata", done, len(todo), {"metadata": done}))


def _file_meta_or_none(item: tuple[str, int]) -> PhotoMeta | None:
    path, mtime_ns = item
    try:
        return read_file_meta(path, mtime_ns)
    except Exception:  # gone or unreadable since the scan, or a Pillow bug on a strange
        return None  # header: it must not stop the run, and the next run tries again


def _embed_planned(store: Store, embedder: Embedder, plan: _Plan, counts: dict,
                   failures: list[tuple[str, str]], meta: _MetaCounts, *, workers: int,
                   batch_size: int,
                   gate: "_Turns | None", nice: int, progress: ProgressFn | None) -> None:
    """Decode (threads) and embed (batches) what the plan lists; one transaction per batch."""
    # decode JPEGs no smaller than twice the model input
    min_side = 2 * embedder.image_size if plan.to_embed else 0

    def flush(batch: _Batch) -> None:
        try:
            _commit(store, embedder, batch, plan, counts, failures, meta, gate)
        except IntegrityError:
            _raise_if_concurrent(store, batch)
            raise
        if progress:
            done = counts["new"] + counts["changed"] + counts["moved"] + counts["failed"]
            total = len(plan.to_embed) + len(plan.scan_failures)
            progress(IngestProgress("embed", done, total, dict(counts)))

    batch = _Batch()
    batch.failures.extend(plan.scan_failures)
    # one decoder per core: on a CPU they take turns with the model, on a GPU decoding is the
    # only CPU work (an H200 with 16 cores indexed 12 MP photos at 55 img/s with 4 decoders,
    # 145 with 16: bench/gpu_ingest.py)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="clipdex-decode",
                              initializer=_init_decode_thread, initargs=(nice,))
    stuck = False
    try:
        pending: deque[tuple[FoundFile, Future]] = deque()
        window = max(2 * batch_size, 4 * workers)  # bounded memory on any library size
        files = iter(plan.to_embed)
        while True:
            for f in files:
                pending.append((f, pool.submit(_decode_and_preprocess, f.path, min_side,
                                               embedder, gate)))
                if len(pending) >= window:
                    break
            if not pending:
                break
            stuck |= _take(pending.popleft(), batch, plan)
            if len(batch) >= batch_size:
                flush(batch)
                batch = _Batch()
    finally:
        # a decode that never returns keeps its thread; the run does not wait for it
        pool.shutdown(wait=not stuck, cancel_futures=True)
    if len(batch):
        flush(batch)


def _gate_for(embedder: Embedder | Callable[[], Embedder], enabled: bool) -> "_Turns | None":
    """On a CPU the decoders and the model take turns: both want every core, and sharing them
    stalls torch's OpenMP threads at each barrier. Taking turns costs what the model-only and
    decode-only figures add up to, the bound bench/ingest.py measures against; overlapping
    cost more CPU per photo (alternating A/B, bench/ingest_ab.py CLIPDEX_DECODE_GATE=0,1:
    tiny 1 MP 8.61 → 8.30 ms, tiny 12 MP 52.1 → 50.6, ViT-B-32 1 MP 57.7 → 55.1). On a GPU
    the decoders keep going. Settings.decode_gate (CLIPDEX_DECODE_GATE=0) turns it off."""
    device = getattr(embedder, "device", None)
    if enabled and getattr(device, "type", None) == "cpu":
        return _Turns()
    return None


def _decode_and_preprocess(path: str, min_side: int, embedder: Embedder,
                           gate: _Turns | None):
    with gate.decode() if gate is not None else contextlib.nullcontext():
        return _decode_and_preprocess_now(path, min_side, embedder)


def _decode_and_preprocess_now(path: str, min_side: int, embedder: Embedder):
    try:
        decoded = decode_file(path, min_side=min_side, meta=True)
        prepared = embedder.prepare(decoded.image)
    except DecodeFailure as exc:
        return exc
    except Exception as exc:  # a decoder bug in Pillow must not stop the run
        return DecodeFailure(f"unexpected decoder error: {type(exc).__name__}: {exc}")
    # keep only what the commit needs: a batch of full-size pixels would cost gigabytes
    return replace(decoded, image=None), prepared


def _take(item: tuple[FoundFile, Future], batch: _Batch, plan: _Plan) -> bool:
    """Put one decoded file into the batch; True when its decoding timed out."""
    f, future = item
    try:
        result = future.result(timeout=DECODE_TIMEOUT_S)
    except FutureTimeout:
        batch.failures.append((f, f"decoding took longer than {DECODE_TIMEOUT_S:.0f} s "
                                  f"(a hung file system or a pathological image); skipped"))
        return True
    if isinstance(result, FileVanished):
        batch.vanished.append(f)
        return False
    if isinstance(result, DecodeFailure):
        batch.failures.append((f, str(result)))
        return False
    decoded, tensor = result
    if not _moved(f, decoded.content_hash, batch, plan):
        batch.files.append(f)
        batch.decoded.append(decoded)
        batch.tensors.append(tensor)
    return False


def _moved(f: FoundFile, content_hash: str, batch: _Batch, plan: _Plan) -> bool:
    """Whether `f` is a vanished row's bytes under a new name (then a move in the batch)."""
    moved_ids = plan.vanished_by_hash.get(content_hash)
    if moved_ids and f.path not in plan.changed_ids:
        moved_id = moved_ids.pop()
        del plan.vanished[moved_id]
        batch.moves.append((moved_id, f))  # same bytes under a new name: keep the vector
        return True
    return False


@dataclass(frozen=True)
class RayJob:
    """ingest_images(ray=…): the library's model and how to use the cluster."""

    spec: str
    precision: str
    options: object  # index.distributed.RayOptions


def _embed_planned_ray(store: Store, job: RayJob, plan: _Plan, counts: dict,
                       failures: list[tuple[str, str]], meta: _MetaCounts, *, batch_size: int,
                       progress: ProgressFn | None) -> tuple[dict, float]:
    """What `_embed_planned` does, with decoding and the model on Ray workers; the commits
    are the same, in the same order. Returns the report's `ray` entry and the seconds to
    keep out of `seconds` (reported apart, as a model load is): starting or joining the
    cluster here, and the slowest worker's model load."""
    import pickle

    import numpy as np

    from . import distributed

    by_path = {f.path: f for f in plan.to_embed}
    total = len(plan.to_embed) + len(plan.scan_failures)

    def flush(batch: _Batch, vectors: list) -> None:
        try:
            _commit(store, None, batch, plan, counts, failures, meta, None,
                    vectors=np.stack(vectors) if vectors else None)
        except IntegrityError:
            _raise_if_concurrent(store, batch)
            raise
        if progress:
            done = counts["new"] + counts["changed"] + counts["moved"] + counts["failed"]
            progress(IngestProgress("embed", done, total, dict(counts)))

    if not plan.to_embed:
        if plan.scan_failures:
            batch = _Batch()
            batch.failures.extend(plan.scan_failures)
            flush(batch, [])
        return {}, 0.0
    entered = time.perf_counter()
    with distributed.ray_session(job.options) as ray:
        entering = time.perf_counter() - entered  # ~0 when the CLI joined the cluster first
        run = distributed.RayRun(address=job.options.address or "local", workers=0,
                                 layout=job.options.layout, decoders=0,
                                 start_seconds=distributed.start_seconds)
        batch, vectors = _Batch(), []
        batch.failures.extend(plan.scan_failures)
        for out in distributed.embed_on_ray(ray, [f.path for f in plan.to_embed], job.spec,
                                            job.precision, job.options, batch_size, run):
            run.model_load_seconds = max(run.model_load_seconds, float(out["load_s"].max()))
            for path, status, reason, info, vector in zip(
                    out["path"], out["status"], out["reason"], out["info"], out["vector"]):
                f = by_path[str(path)]
                if status == "vanished":
                    batch.vanished.append(f)
                elif status == "failed":
                    batch.failures.append((f, str(reason)))
                else:
                    decoded = pickle.loads(info)
                    if not _moved(f, decoded.content_hash, batch, plan):
                        batch.files.append(f)
                        batch.decoded.append(decoded)
                        vectors.append(vector)
                if len(batch) >= batch_size:  # the single-process path's batches, exactly
                    flush(batch, vectors)
                    batch, vectors = _Batch(), []
        if len(batch):
            flush(batch, vectors)
    return run.as_dict(), entering + run.model_load_seconds


def _commit(store: Store, embedder: Embedder | None, batch: _Batch, plan: _Plan, counts: dict,
            failures: list[tuple[str, str]], meta: _MetaCounts, gate: _Turns | None,
            vectors=None) -> None:
    """Embed the batch (unless `vectors` come with it: --ray) and commit it whole."""
    if batch.tensors:
        faults.crash_test_hook("embed")
        with gate.model() if gate is not None else contextlib.nullcontext():
            vectors = embedder.encode_image_tensors(embedder.collate(batch.tensors))
    metas = _with_places([d.meta or PhotoMeta() for d in batch.decoded])
    stamp = now()
    with store.session() as s, s.begin():
        for row_id, f in batch.moves:
            row = s.get(ImageRow, row_id)
            if row is not None:
                row.path, row.size, row.mtime_ns = f.path, f.size, f.mtime_ns
                counts["moved"] += 1
        # a changed file gets a new id, so derived indexes see a removal and an addition
        old_ids = [plan.changed_ids[f.path] for f in batch.files if f.path in plan.changed_ids]
        if old_ids:
            s.execute(delete(ImageRow).where(ImageRow.id.in_(old_ids)))
        counts["changed"] += len(old_ids)
        counts["new"] += len(batch.files) - len(old_ids)
        if batch.files:  # one executemany, not an ORM object per row
            s.execute(insert(ImageRow), [
                {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns,
                 "content_hash": d.content_hash, "width": d.width, "height": d.height,
                 "added_at": stamp}
                for f, d in zip(batch.files, batch.decoded)])
            new_ids = dict(s.execute(select(ImageRow.path, ImageRow.id).where(
                ImageRow.path.in_([f.path for f in batch.files]))).all())
            store.add_vectors(s, "image", [new_ids[f.path] for f in batch.files], vectors)
            store.write_meta(s, [(new_ids[f.path], m.row())
                                 for f, m in zip(batch.files, metas)])
            for m in metas:
                meta.add(m)
        done_paths = [f.path for f in batch.files] + [f.path for _, f in batch.moves] + \
            [f.path for f in batch.vanished]
        if done_paths:
            s.execute(delete(FailureRow).where(FailureRow.path.in_(done_paths)))
        gone_ids = [plan.changed_ids[f.path] for f in batch.vanished if f.path in plan.changed_ids]
        if gone_ids:  # a changed file deleted before it was read: its old row goes
            s.execute(delete(ImageRow).where(ImageRow.id.in_(gone_ids)))
            counts["removed"] += len(gone_ids)
        for f, reason in batch.failures:
            s.merge(FailureRow(path=f.path, size=f.size, mtime_ns=f.mtime_ns,
                               reason=failure_reason(reason), failed_at=stamp))
            old_id = plan.changed_ids.get(f.path)
            if old_id is not None:  # the file changed into something unreadable: drop the old
                s.execute(delete(ImageRow).where(ImageRow.id == old_id))
            failures.append((f.path, reason))
            counts["failed"] += 1
        dropped = gone_ids or any(plan.changed_ids.get(f.path) for f, _ in batch.failures)
        if batch.files or batch.moves or dropped:
            store.bump_generation(s, "image")
        s.flush()
        faults.crash_test_hook("commit")


def _raise_if_concurrent(store: Store, batch: _Batch) -> None:
    """A batch refused for a duplicate path: when another writer has committed some of its
    files since this run planned them, say so (the batch was rolled back whole)."""
    paths = [f.path for f in batch.files]
    with store.session() as s:
        taken = s.scalars(select(ImageRow.path).where(ImageRow.path.in_(paths))).all()
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise ConcurrentWriter(
            f"another clipdex writer indexed {taken[0]}{more} while this run was embedding "
            f"them: the batches committed before are kept; run the command again when the "
            f"other writer is done (it skips what is indexed)")


def _remove_vanished(store: Store, plan: _Plan) -> int:
    ids = list(plan.vanished)
    with store.session() as s, s.begin():
        for start in range(0, len(ids), 900):
            s.execute(delete(ImageRow).where(ImageRow.id.in_(ids[start:start + 900])))
        for start in range(0, len(plan.vanished_failures), 900):
            chunk = plan.vanished_failures[start:start + 900]
            s.execute(delete(FailureRow).where(FailureRow.path.in_(chunk)))
        if ids:
            store.bump_generation(s, "image")
    return len(ids)
