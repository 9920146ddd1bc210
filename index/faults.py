"""Fault injection for the crash-safety tests; does nothing unless CLIPDEX_TEST_KILL_AT or
CLIPDEX_TEST_PAUSE_AT is set."""

from __future__ import annotations

import os
import signal
import time

KILL_AT_ENV = "CLIPDEX_TEST_KILL_AT"
PAUSE_AT_ENV = "CLIPDEX_TEST_PAUSE_AT"
_counts: dict[str, int] = {}


def crash_test_hook(point: str) -> None:
    """SIGKILL this process at `point` when CLIPDEX_TEST_KILL_AT names it.

    The value is `POINT` or `POINT:N` (the Nth time the point is reached); points are "scan"
    (per file found), "embed" (per batch, before the model runs), "commit" (per batch, inside
    the open transaction) and "save" (index.vectors, between the temp file and its rename).
    tests/test_crash.py uses it to prove a kill anywhere leaves a library that recovers.
    """
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted or wanted.partition(":")[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= int(wanted.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def pause_test_hook(point: str) -> None:
    """Sleep at `point` when CLIPDEX_TEST_PAUSE_AT is `POINT:SECONDS`: the Ray tests slow each
    worker batch ("ray-batch", "ray-decode") so that a worker can be killed mid-run."""
    wanted = os.environ.get(PAUSE_AT_ENV)
    if wanted and wanted.partition(":")[0] == point:
        time.sleep(float(wanted.partition(":")[2] or 1))
