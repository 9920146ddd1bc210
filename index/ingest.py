"""Incremental, crash-safe ingestion of photo folders into the store.

Files are classified against the store (new / changed / unchanged / moved / removed), decoded in
worker threads while the model runs, and committed one batch per transaction together with the
generation bump, so a kill at any point loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, insert, select

from . import faults
from .captions import link_captions
from .embedder import Embedder
from .scan import Decoded, DecodeFailure, FoundFile, ScanError, decode_file, scan
from .store import FailureRow, ImageRow, Store, now

__all__ = ["IngestProgress", "IngestReport", "ingest_images"]

BATCH_SIZE = 64
# Decode threads run this much nicer than the model's threads (Linux, per thread). Decoding and
# the model share the cores; at equal priority the decoders preempt torch's OpenMP workers,
# which then stall each other at every barrier. Env CLIPDEX_DECODE_NICE overrides (0: off).
DECODE_NICE = 10
# Env CLIPDEX_DECODE_GATE=0 lets decoding overlap the model on a CPU (see ingest_images).
GATE_DECODERS_ON_CPU = os.environ.get("CLIPDEX_DECODE_GATE", "1") != "0"


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _init_decode_thread() -> None:
    """Decode threads: one torch thread each (preprocess's tensor ops would otherwise start
    an OpenMP team per decoder), and a lower priority than the model's threads."""
    import torch

    torch.set_num_threads(1)  # per calling thread: the model's threads are unaffected
    nice = int(os.environ.get("CLIPDEX_DECODE_NICE", DECODE_NICE))
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
    seconds: float = 0.0
    failures: tuple[tuple[str, str], ...] = ()
    index: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "new": self.new, "changed": self.changed, "unchanged": self.unchanged,
            "moved": self.moved, "removed": self.removed, "failed": self.failed,
            "skipped_failed": self.skipped_failed, "seconds": round(self.seconds, 3),
            "images_per_second": round((self.new + self.changed) / self.seconds, 2)
            if self.seconds else None,
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
            "index": self.index,
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


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _plan(store: Store, roots: list[Path], found: list[FoundFile],
          scan_errors: list[ScanError]) -> _Plan:
    root_strs = [os.path.abspath(r) for r in roots]
    # what sits in a folder that could not be listed was not seen, not deleted: keep it
    unlisted = [e.path for e in scan_errors if e.folder]
    with store.session() as s:
        rows = {
            r.path: r for r in s.execute(
                select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                       ImageRow.content_hash))
            if _under(r.path, root_strs) and not _under(r.path, unlisted)
        }
        failures = {f.path: f for f in s.scalars(select(FailureRow))
                    if _under(f.path, root_strs) and not _under(f.path, unlisted)}
    to_embed, changed_ids, scan_failures = [], {}, []
    unchanged = skipped_failed = 0
    found_paths = set()
    unusable = [(FoundFile(e.path, e.size, e.mtime_ns), e.reason)
                for e in scan_errors if not e.folder]
    for f, reason in [(f, None) for f in found] + unusable:
        found_paths.add(f.path)
        row = rows.get(f.path)
        if reason is None and row is not None and (row.size, row.mtime_ns) == (f.size, f.mtime_ns):
            unchanged += 1
            continue
        failure = failures.get(f.path)
        if row is None and failure is not None and \
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
                 vanished_failures, scan_failures)


class _Turns:
    """Decoders and the model take turns on the CPU: any number of decodes at once, or the
    model alone (a readers–writer lock that favours the model)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._decoding = 0
        self._model = False

    @contextlib.contextmanager
    def decode(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._model)
            self._decoding += 1
        try:
            yield
        finally:
            with self._cond:
                self._decoding -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def model(self) -> Iterator[None]:
        with self._cond:
            self._model = True  # no new decode starts; the ones running finish first
            self._cond.wait_for(lambda: self._decoding == 0)
        try:
            yield
        finally:
            with self._cond:
                self._model = False
                self._cond.notify_all()


class _Batch:
    """Rows waiting for the model and the commit."""

    def __init__(self) -> None:
        self.files: list[FoundFile] = []
        self.decoded: list[Decoded] = []
        self.tensors: list = []  # what Embedder.prepare returned, per image
        self.failures: list[tuple[FoundFile, str]] = []
        self.moves: list[tuple[int, FoundFile]] = []

    def __len__(self) -> int:
        return len(self.files) + len(self.failures) + len(self.moves)


def ingest_images(
    store: Store,
    embedder: Embedder | Callable[[], Embedder],
    roots: Iterable[Path],
    *,
    exclude: Iterable[str] = (),
    include_hidden: bool = False,
    workers: int | None = None,
    batch_size: int = BATCH_SIZE,
    progress: ProgressFn | None = None,
) -> IngestReport:
    """Bring the store's images under `roots` in line with the files on disk.

    `embedder` may be a zero-argument factory, called only when something needs embedding.
    """
    started = time.perf_counter()
    roots = [Path(r) for r in roots]
    scan_errors: list[ScanError] = []
    found = []
    for f in scan(roots, exclude=exclude, include_hidden=include_hidden,
                  on_error=scan_errors.append):
        faults.crash_test_hook("scan")
        found.append(f)
    plan = _plan(store, roots, found, scan_errors)
    counts = {"new": 0, "changed": 0, "unchanged": plan.unchanged, "moved": 0, "failed": 0}
    if progress:
        progress(IngestProgress("scan", len(found), len(found), dict(counts)))
    # folders that could not be listed are reported each run; files that failed are recorded
    failures: list[tuple[str, str]] = [(e.path, e.reason) for e in scan_errors if e.folder]
    counts["failed"] += len(failures)

    def flush(batch: _Batch) -> None:
        _commit(store, embedder, batch, plan, counts, failures, gate)
        if progress:
            done = counts["new"] + counts["changed"] + counts["moved"] + counts["failed"]
            total = len(plan.to_embed) + len(plan.scan_failures)
            progress(IngestProgress("embed", done, total, dict(counts)))

    if plan.to_embed and not isinstance(embedder, Embedder):
        embedder = embedder()  # an unchanged tree never pays for loading the model
    # decode JPEGs no smaller than twice the model input
    min_side = 2 * embedder.image_size if plan.to_embed else 0
    # one decoder per core: on a CPU they take turns with the model, on a GPU decoding is the
    # only CPU work (an H200 with 16 cores indexed 12 MP photos at 55 img/s with 4 decoders,
    # 145 with 16: bench/gpu_ingest.py)
    workers = workers or _cores()
    batch = _Batch()
    batch.failures.extend(plan.scan_failures)
    # On a CPU the decoders and the model take turns: both want every core, and sharing them
    # stalls torch's OpenMP threads at each barrier. Taking turns costs what the model-only and
    # decode-only figures add up to, the bound bench/ingest.py measures against; overlapping
    # cost more CPU per photo (alternating A/B, bench/ingest_ab.py CLIPDEX_DECODE_GATE=0,1:
    # tiny 1 MP 8.61 → 8.30 ms, tiny 12 MP 52.1 → 50.6, ViT-B-32 1 MP 57.7 → 55.1). On a GPU
    # the decoders keep going.
    gate: _Turns | None = None
    device = getattr(embedder, "device", None)
    if GATE_DECODERS_ON_CPU and getattr(device, "type", None) == "cpu":
        gate = _Turns()
    with ThreadPoolExecutor(workers, thread_name_prefix="clipdex-decode",
                            initializer=_init_decode_thread) as pool:
        pending: deque[tuple[FoundFile, Future]] = deque()
        files = iter(plan.to_embed)
        window = max(2 * batch_size, 4 * workers)  # bounded memory on any library size
        for f in files:
            pending.append((f, pool.submit(_decode_and_preprocess, f.path, min_side, embedder,
                                           gate)))
            if len(pending) >= window:
                _take(pending.popleft(), batch, plan)
                if len(batch) >= batch_size:
                    flush(batch)
                    batch = _Batch()
        while pending:
            _take(pending.popleft(), batch, plan)
            if len(batch) >= batch_size:
                flush(batch)
                batch = _Batch()
    if len(batch):
        flush(batch)
    removed = _remove_vanished(store, plan)
    with store.session() as s, s.begin():
        link_captions(store, s)
    return IngestReport(
        new=counts["new"], changed=counts["changed"], unchanged=plan.unchanged,
        moved=counts["moved"], removed=removed, failed=counts["failed"],
        skipped_failed=plan.skipped_failed, seconds=time.perf_counter() - started,
        failures=tuple(failures))


def _decode_and_preprocess(path: str, min_side: int, embedder: Embedder,
                           gate: _Turns | None):
    with gate.decode() if gate is not None else contextlib.nullcontext():
        return _decode_and_preprocess_now(path, min_side, embedder)


def _decode_and_preprocess_now(path: str, min_side: int, embedder: Embedder):
    try:
        decoded = decode_file(path, min_side=min_side)
    except DecodeFailure as exc:
        return exc
    except Exception as exc:  # a decoder bug in Pillow must not stop the run
        return DecodeFailure(f"unexpected decoder error: {type(exc).__name__}: {exc}")
    return decoded, embedder.prepare(decoded.image)


def _take(item: tuple[FoundFile, Future], batch: _Batch, plan: _Plan) -> None:
    f, future = item
    result = future.result()
    if isinstance(result, DecodeFailure):
        batch.failures.append((f, str(result)))
        return
    decoded, tensor = result
    moved_ids = plan.vanished_by_hash.get(decoded.content_hash)
    if moved_ids and f.path not in plan.changed_ids:
        moved_id = moved_ids.pop()
        del plan.vanished[moved_id]
        batch.moves.append((moved_id, f))  # same bytes under a new name: keep the vector
        return
    batch.files.append(f)
    batch.decoded.append(decoded)
    batch.tensors.append(tensor)


def _commit(store: Store, embedder: Embedder, batch: _Batch, plan: _Plan, counts: dict,
            failures: list[tuple[str, str]], gate: _Turns | None) -> None:
    vectors = None
    if batch.tensors:
        faults.crash_test_hook("embed")
        with gate.model() if gate is not None else contextlib.nullcontext():
            vectors = embedder.encode_image_tensors(embedder.collate(batch.tensors))
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
                 "vector": v.tobytes(), "added_at": stamp}
                for f, d, v in zip(batch.files, batch.decoded, vectors)])
        done_paths = [f.path for f in batch.files] + [f.path for _, f in batch.moves]
        if done_paths:
            s.execute(delete(FailureRow).where(FailureRow.path.in_(done_paths)))
        for f, reason in batch.failures:
            s.merge(FailureRow(path=f.path, size=f.size, mtime_ns=f.mtime_ns, reason=reason,
                               failed_at=stamp))
            old_id = plan.changed_ids.get(f.path)
            if old_id is not None:  # the file changed into something unreadable: drop the old
                s.execute(delete(ImageRow).where(ImageRow.id == old_id))
            failures.append((f.path, reason))
            counts["failed"] += 1
        dropped = any(plan.changed_ids.get(f.path) for f, _ in batch.failures)
        if batch.files or batch.moves or dropped:
            store.bump_generation(s, "image")
        s.flush()
        faults.crash_test_hook("commit")


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
