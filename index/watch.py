"""Watch mode: keep a library in step with folders as photos land, change, move and go.

Events come from `watchfiles` (inotify on Linux through the Rust `notify` crate; polling where a
mount sends none, `poll=True`), chosen over watchdog because it batches a burst of events
itself (a `step` of quiet closes a batch, `debounce` caps how long one can grow) and takes a
stop event. Each batch goes through `Library.index` on just the paths it touched — the same
planning, decoding, embedding, failure records, transactions and vector-index catch-up as
`clipdex index` — after its files have held still for STABLE_S (a photo still being copied
waits for the next batch). A deleted path is indexed through its nearest existing folder, so
the row goes; a move is a deletion and an addition in one batch, so the vector is kept.

Start-up is one full `index` of the watched folders (changes made while nothing watched are
picked up), run once the watch has begun, so nothing that lands meanwhile is missed. A kill
at any point leaves what `index` leaves: every batch committed so far, and the next `watch`
or `index` completes the rest.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import UsageProblem
from .ingest import IngestReport
from .scan import supported_suffixes

__all__ = ["STABLE_S", "WatchBatch", "check_folders", "watch"]

STABLE_S = 0.25  # a file's size and mtime must hold this long before it is indexed
STEP_MS = 50  # watchfiles closes a batch after this much quiet...
DEBOUNCE_MS = 1000  # ...or once it has grown for this long
POLL_MS = 500  # polling mode: how often every folder is listed
# Batches keep the vector index in memory (Library.index(save_index=False)); it is written
# when a quiet second follows a batch, when a stream of batches has run this long, and on exit.
SAVE_EVERY_S = 60.0


@dataclass(frozen=True)
class WatchBatch:
    """One batch: what changed on disk, and what indexing it did (None for the start-up)."""

    paths: tuple[str, ...]
    report: IngestReport
    waiting: int  # files still being written, left for a later batch
    startup: bool = False


def _is_photo(path: str, suffixes: frozenset[str]) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes


def _signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _roots_for(changed: Iterable[str], watched: list[str]) -> list[str]:
    """What to index for these changed paths: an existing file or folder as it is, a
    vanished one through its nearest existing folder within the watched ones; none below
    another."""
    roots: set[str] = set()
    for path in changed:
        target = path
        while not os.path.exists(target) and target not in watched:
            target = os.path.dirname(target)
        if os.path.exists(target):
            roots.add(target)
    ordered = sorted(roots, key=len)
    kept: list[str] = []
    for root in ordered:
        if not any(root == k or root.startswith(k.rstrip(os.sep) + os.sep) for k in kept
                   if os.path.isdir(k)):
            kept.append(root)
    return sorted(kept)


def check_folders(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The folders to watch, absolute; UsageProblem for one that is not a folder."""
    folders = [os.path.abspath(p) for p in paths]
    if not folders:
        raise UsageProblem("watch: give at least one folder")
    for folder in folders:
        if not os.path.isdir(folder):
            problem = "not a folder" if os.path.exists(folder) else "no such folder"
            raise UsageProblem(f"watch: {problem}: {folder}")
    return folders


def watch(library, paths: Iterable[str | os.PathLike], *, model: str | None = None,
          poll: bool = False, on_batch: Callable[[WatchBatch], None] | None = None,
          stop: threading.Event | None = None, startup: bool = True,
          **index_options) -> None:
    """Index `paths` once (unless `startup` is False: the caller did), then every change
    under them, until `stop` is set (or Ctrl-C).

    `index_options` are `Library.index`'s (exclude, include_hidden, workers, ...).
    """
    import watchfiles

    folders = check_folders(paths)
    stop = stop or threading.Event()
    suffixes = supported_suffixes()

    def wanted(change, path: str) -> bool:
        # a folder counts when it appears (moved in whole) or goes; its "modified" events,
        # which each file added to it brings, would rescan all of it for nothing
        return _is_photo(path, suffixes) or change == watchfiles.Change.deleted or (
            change == watchfiles.Change.added and os.path.isdir(path))

    events = watchfiles.watch(*folders, watch_filter=wanted, debounce=DEBOUNCE_MS,
                              step=STEP_MS, stop_event=stop, force_polling=poll or None,
                              poll_delay_ms=POLL_MS, yield_on_timeout=True,
                              rust_timeout=int(STABLE_S * 4000), raise_interrupt=True)
    # The watch starts with the generator's first step (it returns once rust_timeout passes
    # quietly, or with the first changes). Only then the start-up scan: a photo that lands
    # during the scan, or just after it, is buffered by the watcher for the first batch
    # rather than missed until the next start (inotify reports nothing from before it began).
    try:
        first = next(events)
    except StopIteration:  # stopped before it began
        return
    if startup:
        report = library.index(folders, model=model, **index_options)
        if on_batch:
            on_batch(WatchBatch(tuple(folders), report, 0, startup=True))
    # on the way out, write what the batches held in memory (a kill -9 loses nothing: the
    # store holds every vector and the next open catches the file up)
    try:
        _follow(library, folders, itertools.chain([first], events), model=model,
                on_batch=on_batch, stop=stop, **index_options)
    except BaseException:
        with contextlib.suppress(Exception):  # never hide why the watch stopped
            library.save_indexes()
        raise
    library.save_indexes()


def _follow(library, folders: list[str], events, *, model, on_batch, stop,
            **index_options) -> None:
    waiting: dict[str, tuple[int, int] | None] = {}
    deferred: set[str] = set()  # vanished paths held one round: a move's other half may follow
    last_save = time.monotonic()
    for changes in events:
        for _, path in changes:
            waiting[path] = _signature(path)
        if not waiting and not deferred:
            if library.save_indexes():  # a quiet round: write what the batches held
                last_save = time.monotonic()
            continue
        time.sleep(STABLE_S)
        ready, gone, still = [], [], {}
        for path, before in waiting.items():
            now = _signature(path)
            if now is None:
                gone.append(path)
            elif now != before:  # still being written
                still[path] = now
            else:
                ready.append(path)
        waiting = still
        if gone and not ready and not deferred:
            deferred = set(gone)  # only deletions: wait a round for a move's other half
            continue
        ready += gone + sorted(deferred)
        deferred = set()
        roots = _roots_for(ready, folders)
        if not roots:
            continue
        report = library.index(roots, model=model, save_index=False, **index_options)
        if time.monotonic() - last_save > SAVE_EVERY_S:
            library.save_indexes()
            last_save = time.monotonic()
        if on_batch:
            on_batch(WatchBatch(tuple(sorted(ready)), report, len(waiting)))
        if stop.is_set():
            break

