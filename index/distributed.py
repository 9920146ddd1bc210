"""`clipdex index --ray`: decoding and embedding fanned out over a Ray cluster with Ray Data.

The driver (the `clipdex index` process) scans and plans exactly as a single-process run does
(index.ingest: new, changed, moved, gone), then hands the paths to embed to Ray Data: a
`map_batches` over an actor pool whose actors each load the model once. Their results stream
back to the driver in order, and it commits them one batch per transaction through the same
code as the single-process path (ingest._commit), so generation bumps, failure records, moves
and metadata come out the same. A kill of the driver loses at most the batch in flight; a
killed worker is restarted by Ray and its batch retried (Ray Data's actor pools restart actors
and retry their tasks by default).

Two layouts (`RayOptions.decode`):
- "actor": each model actor decodes its own batch, then embeds it. On CPUs this is the one
  that scales: a worker is one process doing one photo's whole work, nothing crosses the
  object store but paths, vectors and a few fields.
- "actors": a separate pool of CPU decoder actors feeds the model actors prepared pixels
  (each decoder loads the embedder once, on the CPU, for its `prepare`). This is the GPU
  layout: an H200 runs the model at 7.7k img/s but one 16-core node decodes 1 MP photos at
  ~280 img/s (bench/gpu_ingest.py), so decoding must be spread over many CPU workers, on any
  node, while the GPU actor only runs the model.

Workers open photos by the paths the driver found: on a cluster of several machines every node
must see the library's folders under the same paths (a shared or network file system), and
have clipdex and its model installed. Ray is the `ray` extra (`pip install 'clipdex[ray]'`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from . import faults
from .errors import ClipdexError, MissingExtra, RayFailed, RayUnavailable, UsageProblem

__all__ = ["RayFailed", "RayOptions", "RayUnavailable", "check_address", "embed_on_ray",
           "import_ray", "looks_like_address", "ray_session"]

RAY_EXTRA = "pip install 'clipdex[ray]'"
# how long `check_address` waits for the cluster's port to answer (ray.init itself would retry
# for minutes on an address nobody listens on)
CONNECT_TIMEOUT_S = 5.0
# how long the last ray_session took to start or join its cluster (for the report)
start_seconds = 0.0
# rows per input block at most: a block is the unit Ray Data schedules and retries
MAX_BLOCKS = 4096
# environment variables handed to the workers (plugins, test fault hooks, model caches)
_PASSED_ENV_PREFIXES = ("CLIPDEX_", "HF_", "HUGGINGFACE_", "TORCH_HOME", "XDG_CACHE_HOME")


@dataclass(frozen=True)
class RayOptions:
    """How `Library.index(..., ray=RayOptions(...))` uses Ray.

    address: a running cluster ("HOST:PORT" of its head, "ray://HOST:PORT" for Ray Client, or
    "auto" for the one `ray start` left on this machine); None starts a local Ray instance for
    the run and stops it after. workers: model actors (default: the cluster's CPUs divided by
    `cpus`, or its GPUs divided by `gpus`). cpus / gpus: per model actor. decode: "actor",
    "actors" or "auto" (separate decoders when the model actors have GPUs; see the module).
    decoders: decoder actors in the "actors" layout (default: the CPUs left over, at least 1).
    local_cpus: CPUs of a local instance (default: all of this machine's).
    """

    address: str | None = None
    workers: int | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    decode: str = "auto"
    decoders: int | None = None
    local_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.decode not in ("auto", "actor", "actors"):
            raise UsageProblem(f"RayOptions.decode is 'auto', 'actor' or 'actors', "
                               f"not {self.decode!r}")
        if self.cpus <= 0 or self.gpus < 0:
            raise UsageProblem("a Ray worker needs cpus > 0 and gpus >= 0")
        for name in ("workers", "decoders", "local_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageProblem(f"RayOptions.{name} must be at least 1 (got {value})")

    @property
    def layout(self) -> str:
        if self.decode != "auto":
            return self.decode
        return "actors" if self.gpus > 0 else "actor"


def import_ray():
    """Ray and Ray Data, or MissingExtra naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the `data` part of the extra)
    except ImportError as exc:
        raise MissingExtra(f"--ray needs Ray Data ({exc.name or 'ray'} is not installed): "
                           f"{RAY_EXTRA}") from None
    return ray


def check_address(address: str | None) -> None:
    """Fail fast, in one line, when Ray is not installed or `address` names a cluster nobody
    answers at: called before the library is opened or the model loaded, so nothing is
    written. None (a local instance), "local" and "auto" need no answer."""
    import importlib.util

    for module in ("ray", "ray.data"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtra(f"--ray needs Ray Data ({module} is not installed): {RAY_EXTRA}")
    if address in (None, "auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageProblem(f"--ray {address!r}: expected HOST:PORT of the cluster's head "
                           f"(as `ray start --head` prints), ray://HOST:PORT, or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError | socket.timeout):
            reason = f"no answer in {CONNECT_TIMEOUT_S:.0f} s"
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {reason} (start one "
                             f"with `ray start --head`, or leave out the address to run on a "
                             f"local Ray instance)") from None


def looks_like_address(value: str) -> bool:
    """Whether a `--ray` value is a cluster address rather than a folder to index."""
    return value in ("auto", "local") or value.startswith("ray://") or \
        (":" in value and value.rpartition(":")[2].isdigit())


def _worker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_PASSED_ENV_PREFIXES)}


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[object]:
    """Ray initialised for one run: connected to `options.address`, or a local instance that
    is shut down after. A Ray already initialised in this process is used as it is."""
    ray = import_ray()
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO  # not --verbose
    if ray.is_initialized():
        with _without_ray_notes([]) if quiet else contextlib.nullcontext(), \
                _ray_messages_on_stderr(ray, quiet):
            yield ray
        return
    check_address(options.address)
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    # Ray Data's notes ("execution finished", "progress bars disabled", a failed worker's
    # traceback: the job's error says it in one line) are not the user's
    data_logger = logging.getLogger("ray.data")
    data_level = data_logger.level
    if quiet:
        data_logger.setLevel(logging.CRITICAL)
    notes: list[bytes] = []
    started = time.perf_counter()
    with _without_ray_notes(notes) if quiet else contextlib.nullcontext():
        try:
            if options.address in (None, "local"):
                # "local": a new instance even when `ray start` left one on this machine
                ray.init(address="local", num_cpus=options.local_cpus,
                         **_short_temp_dir(), **kwargs)
            else:
                ray.init(address=options.address, **kwargs)
        except ClipdexError:
            raise
        except Exception as exc:  # ConnectionError, RuntimeError, a version mismatch …
            raise RayUnavailable(_init_failed(options.address, exc, notes)) from None
        global start_seconds
        start_seconds = time.perf_counter() - started
        try:
            with _ray_messages_on_stderr(ray, quiet):
                yield ray
        finally:
            ray.shutdown()
            data_logger.setLevel(data_level)


@contextlib.contextmanager
def _ray_messages_on_stderr(ray, quiet: bool) -> Iterator[None]:
    """The cluster's messages to the driver ("Task … failed. There are infinite retries
    remaining, so the task will be retried" when a worker dies) on stderr, not stdout: stdout
    is the --json report's. `quiet` (not --verbose): each message's first line, without the
    worker's traceback (a job that fails says why in one line of its own). Ray prints them
    from a thread through `ray._private.worker.print_to_stdstream`; where a Ray version has
    no such function nothing is changed."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    original = getattr(worker, "print_to_stdstream", None)
    if original is None:
        yield
        return

    def to_stderr(data, *args, **kwargs):
        lines = data.get("lines", [])
        if quiet:
            lines = [(str(line).partition(" Error: ")[0].strip().splitlines() or [""])[0]
                     for line in lines if str(line).strip()]
        return original(dict(data, is_err=True, lines=lines), *args, **kwargs)

    worker.print_to_stdstream = to_stderr
    try:
        yield
    finally:
        worker.print_to_stdstream = original


# Ray's sockets live under TEMP/ray/session_<date>_<time>_<pid>/sockets/plasma_store, and a
# Unix socket's path is at most 107 bytes: a long TMPDIR (pytest's, a CI runner's) fails
# ray.init with "AF_UNIX path length cannot exceed 107 bytes"
_RAY_SESSION_SUFFIX = len("/ray/session_2026-12-02_22-53-11_627748_6907999/sockets/plasma_store")


def _short_temp_dir() -> dict:
    import tempfile

    if len(tempfile.gettempdir()) + _RAY_SESSION_SUFFIX <= 107:
        return {}
    return {"_temp_dir": f"/tmp/ray-{os.getuid()}" if hasattr(os, "getuid") else "/tmp/ray"}


def _init_failed(address: str | None, exc: Exception, notes: list[bytes]) -> str:
    if address in (None, "local"):
        return f"cannot start a local Ray instance: {_first_line(exc)}"
    if any(b"InvalidAuthToken" in note or b"Unauthenticated" in note for note in notes) or \
            "auth" in str(exc).lower():
        return (f"the Ray cluster at {address} refused this driver's token: it uses token "
                f"authentication (Ray's default), so set RAY_AUTH_MODE=token and give the "
                f"cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
                f"(`ray get-auth-token` on the head prints it)")
    return f"cannot join the Ray cluster at {address}: {_first_line(exc)}"


# Ray's C++ core prints its notes on the driver's stderr ("[2026-12-02 21:47:33,289 E 14879
# 14879] core_worker.cc:2465: Actor … has constructor arguments in the object store", on
# every actor Ray Data starts); they are not the user's business, so unless `--verbose` they
# are dropped and every other line (the progress bar, warnings) passes through.
_RAY_NOTE = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\] [\w./-]+\.(cc|h):\d+: ")


@contextlib.contextmanager
def _without_ray_notes(dropped: list[bytes]) -> Iterator[None]:
    """fd 2 through a filter that drops Ray's C++ notes (the first 200 kept in `dropped`)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded, pytest capture)
        yield
        return

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                notes = [line for line in lines if _RAY_NOTE.match(line)]
                dropped.extend(notes[:max(0, 200 - len(dropped))])
                out = b"".join(line + b"\n" for line in lines if not _RAY_NOTE.match(line))
                if out:
                    os.write(saved, out)
                if pending and not _RAY_NOTE.match(pending) and b"\r" in pending:
                    os.write(saved, pending)  # a progress bar redraws a line with \r
                    pending = b""
            if pending and not _RAY_NOTE.match(pending):
                os.write(saved, pending)

    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(target=pump, name="clipdex-ray-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer here closes: the pump reads to its end
        thread.join(timeout=5)
        os.close(saved)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# --- the workers --------------------------------------------------------------------------

def _load_embedder(spec: str, precision: str, gpus: float, cpus: float, env: dict):
    # the driver's CLIPDEX_* (plugins, fault hooks) and model-cache variables: handed to each
    # worker as an argument, not a Ray runtime_env (that costs ~1.6 s more per worker here)
    os.environ.update(env)
    from .embedder import get_embedder

    device = "cuda" if gpus > 0 else "cpu"
    return get_embedder(spec, device=device, precision=precision,
                        threads=max(1, int(cpus)) if device == "cpu" else None)


class _Decoder:
    """Decodes and prepares files one after another, each given DECODE_TIMEOUT_S (a file on a
    hung mount is recorded as a failure; its thread is left behind, the worker goes on)."""

    def __init__(self, embedder, threads: int) -> None:
        self.embedder = embedder
        self.min_side = 2 * embedder.image_size
        self.threads = max(1, threads)
        self.pool = self._new_pool()

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.threads, thread_name_prefix="clipdex-ray-decode")

    def decode(self, paths) -> list[tuple[str, str, bytes, object]]:
        """(status, reason, pickled Decoded without pixels, prepared) per path."""
        from .ingest import DECODE_TIMEOUT_S, _decode_and_preprocess_now
        from .scan import DecodeFailure, FileVanished

        def submit(path):
            return self.pool.submit(_decode_and_preprocess_now, str(path), self.min_side,
                                    self.embedder)

        futures = [submit(p) for p in paths]
        out = []
        for i, future in enumerate(futures):
            try:
                result = future.result(timeout=DECODE_TIMEOUT_S)
            except FutureTimeout:
                # its thread stays stuck: a new pool for the rest, the files queued behind
                # it submitted again (those running on other threads finish where they are)
                stuck, self.pool = self.pool, self._new_pool()
                stuck.shutdown(wait=False, cancel_futures=True)
                for j in range(i + 1, len(futures)):
                    if futures[j].cancelled():
                        futures[j] = submit(paths[j])
                out.append(("failed", f"decoding took longer than {DECODE_TIMEOUT_S:.0f} s "
                            f"(a hung file system or a pathological image); skipped", b"", None))
                continue
            if isinstance(result, FileVanished):
                out.append(("vanished", "", b"", None))
            elif isinstance(result, DecodeFailure):
                out.append(("failed", str(result), b"", None))
            else:
                decoded, prepared = result
                out.append(("ok", "", pickle.dumps(decoded, protocol=5), prepared))
        return out


class _DecodeWorker:
    """The "actors" layout's decoders: files in, prepared pixels out (pickled)."""

    def __init__(self, spec: str, precision: str, threads: int, env: dict) -> None:
        self.decoder = _Decoder(_load_embedder(spec, precision, 0.0, 1.0, env), threads)

    def __call__(self, batch: dict) -> dict:
        faults.pause_test_hook("ray-decode")
        rows = self.decoder.decode(batch["path"])
        return {"path": batch["path"],
                "status": np.array([r[0] for r in rows], dtype=object),
                "reason": np.array([r[1] for r in rows], dtype=object),
                "info": np.array([r[2] for r in rows], dtype=object),
                "pixels": np.array([pickle.dumps(r[3], protocol=5) if r[0] == "ok" else b""
                                    for r in rows], dtype=object)}


class _EmbedWorker:
    """A model actor: embeds a batch (decoding it first in the "actor" layout)."""

    def __init__(self, spec: str, precision: str, gpus: float, cpus: float,
                 decode_here: bool, env: dict) -> None:
        started = time.perf_counter()
        self.embedder = _load_embedder(spec, precision, gpus, cpus, env)
        self.decoder = _Decoder(self.embedder, max(1, int(cpus))) if decode_here else None
        self.load_seconds = time.perf_counter() - started  # sent once, with the first batch

    def __call__(self, batch: dict) -> dict:
        faults.pause_test_hook("ray-batch")
        if self.decoder is not None:
            rows = self.decoder.decode(batch["path"])
            status = [r[0] for r in rows]
            reason = [r[1] for r in rows]
            info = [r[2] for r in rows]
            prepared = [r[3] for r in rows]
        else:
            status, reason, info = list(batch["status"]), list(batch["reason"]), \
                list(batch["info"])
            prepared = [pickle.loads(p) if s == "ok" else None
                        for s, p in zip(status, batch["pixels"])]
        dim = self.embedder.dim
        vectors = np.zeros((len(status), dim), dtype=np.float32)
        ok = [i for i, s in enumerate(status) if s == "ok"]
        if ok:
            encoded = self.embedder.encode_image_tensors(
                self.embedder.collate([prepared[i] for i in ok]))
            vectors[ok] = np.asarray(encoded, dtype=np.float32)
        load = np.zeros(len(status), dtype=np.float64)
        if len(status):
            load[0], self.load_seconds = self.load_seconds, 0.0
        return {"path": batch["path"], "status": np.array(status, dtype=object),
                "reason": np.array(reason, dtype=object), "info": np.array(info, dtype=object),
                "vector": vectors, "load_s": load}


# --- the driver ---------------------------------------------------------------------------

@dataclass
class RayRun:
    """What the driver learnt of the cluster for the report."""

    address: str
    workers: int
    layout: str
    decoders: int
    start_seconds: float  # starting or joining the cluster
    model_load_seconds: float = 0.0  # the slowest worker's model load (nothing embeds meanwhile)

    def as_dict(self) -> dict:
        return {"address": self.address, "workers": self.workers, "decode": self.layout,
                "decoders": self.decoders, "start_seconds": round(self.start_seconds, 3),
                "model_load_seconds": round(self.model_load_seconds, 3)}


def _sizes(ray, options: RayOptions) -> tuple[int, int]:
    """(model actors, decoder actors) for the cluster's resources."""
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0))
    if options.gpus > 0 and gpus < options.gpus:
        raise RayUnavailable(f"--ray-gpus {options.gpus:g} per worker, but the Ray cluster "
                             f"has {gpus:g} GPUs")
    if options.workers:
        workers = options.workers
    elif options.gpus > 0:
        workers = max(1, int(gpus // options.gpus))
    else:
        workers = max(1, int(cpus // options.cpus))
    decoders = 0
    if options.layout == "actors":
        left = cpus - workers * options.cpus
        decoders = options.decoders or max(1, int(left))
    return workers, decoders


def embed_on_ray(ray, paths: list[str], spec: str, precision: str, options: RayOptions,
                 batch_size: int, run: RayRun) -> Iterator[dict]:
    """The workers' results for `paths`, in order, one dict of columns per input block."""
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # ids as a single-process run gives them
    ctx.enable_progress_bars = False  # the CLI has its own bar
    ctx.print_on_execution_start = False
    workers, decoders = _sizes(ray, options)
    run.workers, run.decoders, run.layout = workers, decoders, options.layout
    # one input block per worker call: blocks of at most `batch_size` rows (fewer, larger
    # ones past MAX_BLOCKS), mapped whole (`batch_size=None`; a map batch size would bundle
    # blocks up to it), and read back whole (iter_batches re-batching held every result
    # back until the last one here); the driver cuts the commits
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(paths) / batch_size)))
    env = _worker_env()
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    if options.layout == "actors":
        ds = ds.map_batches(_DecodeWorker, fn_constructor_args=(spec, precision, 1, env),
                            batch_size=None, num_cpus=1,
                            compute=ActorPoolStrategy(size=decoders), batch_format="numpy")
    ds = ds.map_batches(_EmbedWorker,
                        fn_constructor_args=(spec, precision, options.gpus, options.cpus,
                                             options.layout == "actor", env),
                        batch_size=None, num_cpus=options.cpus,
                        num_gpus=options.gpus or None,
                        compute=ActorPoolStrategy(size=workers), batch_format="numpy")
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    except ClipdexError:
        raise
    except Exception as exc:
        raise RayFailed(f"the Ray job failed: {_ray_cause(exc)} (the batches committed "
                        f"before are kept; run the command again to continue)") from None


# the last line of a worker's traceback, as Ray puts it in its errors' text
_RAISED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<name>[A-Za-z_]\w*(?:Error|Exception|"
                     r"Unavailable|Mismatch|Failed|Problem|Extra))(?::\s?(?P<message>.*))?$")


def _ray_cause(exc: BaseException) -> str:
    """The error behind Ray's wrappers (a worker's ClipdexError, say): the last exception line
    of the innermost traceback in the chain of `exc`'s causes and contexts, in one line."""
    chain, seen = [], exc
    while seen is not None and seen not in chain and len(chain) < 20:
        chain.append(seen)
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    for error in chain:
        raised = [m for m in map(_RAISED.match, str(error).splitlines()) if m]
        if raised:
            last = raised[-1]
            return f"{last['name']}: {last['message'] or ''}".rstrip(": ")
    return next((_first_line(e) for e in chain if str(e).strip()), _first_line(exc))
