"""Atomic file writes (temp file, fsync, rename) and the clean-up of temp files a kill left.

Temp files are named `.<final name>.<pid>.tmp` beside their target: a kill between the write and
the rename leaves one behind, and its pid tells whether its writer is still alive.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from . import faults

__all__ = ["atomic_write", "atomic_write_text", "fsync_path", "remove_stale_temps",
           "temp_path"]

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
# tempfile.mkstemp names from clipdex before 2026-12 (no pid): removed once this old
_LEGACY_TEMP = re.compile(r"^tmp[\w-]{6,}\.tmp$")
LEGACY_TEMP_AGE_S = 3600


def temp_path(final: Path) -> Path:
    return final.parent / f".{final.name}.{os.getpid()}.tmp"


def atomic_write(final: Path, write: Callable[[Path], None], *,
                 crash_point: str | None = None) -> Path:
    """Call `write(temp)` and move the result over `final`: readers see the old file or the
    new one, never half of one, and a crash leaves at most a stale temp file."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if crash_point:
            faults.crash_test_hook(crash_point)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(final.parent)
    return final


def atomic_write_text(final: Path, text: str) -> Path:
    return atomic_write(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temps(directory: Path, *, prefix: str = "") -> int:
    """Delete temp files whose writer is dead (a kill between write and rename); returns how
    many. Temp files of live writers are left alone."""
    removed = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and m["name"].startswith(prefix) and not _alive(int(m["pid"])):
            removed += _unlink(entry)
        elif not prefix and _LEGACY_TEMP.match(entry.name) and _older_than(entry,
                                                                          LEGACY_TEMP_AGE_S):
            removed += _unlink(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _unlink(path: Path) -> int:
    """Remove a temp file, or a temp folder (an on-disk index's build or copy)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        return 0
    return 1


def fsync_path(path: Path) -> None:
    """fsync a folder (its entries: a rename) or a file (its pages, written or mapped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
