"""`clipdex index --ray` on a real Ray cluster (`ray start --head` on this machine, 2 CPUs) and
on a local Ray instance: the same library as a single-process run, row for row, vector for
vector (real open_clip, the tiny model); a worker killed mid-run; an unreachable address, a
bad one and a missing extra, each one line that writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from clipdex_test_embedder import NAME as TEST_MODEL
from clipdex_test_embedder import SUBPROCESS_ENV
from conftest import free_port
from sqlalchemy import select
from test_crash import assert_consistent

from index.library import Library
from index.store import FailureRow, ImageMetaRow, ImageRow
from index.synthetic.scenes import write_scenes

pytest.importorskip("ray.data", reason="the `ray` extra is not installed (pip install "
                                       "'clipdex[ray]'; make install-dev does)")

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
COUNT = 150  # three batches: 64, 64, 22


# the cluster's token (Ray's default token authentication), given to it and to every driver
TOKEN = uuid.uuid4().hex


def _env(**extra: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLIPDEX_HOME", "CLIPDEX_DB", "CLIPDEX_MODEL") and
           not k.startswith("RAY_")}
    env.update({"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
                **SUBPROCESS_ENV, **extra})
    return {k: v for k, v in env.items() if v is not None}


def clipdex(*args: str, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "--quiet", *args], cwd=REPO,
                          env=_env(**env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster as an operator starts one: `ray start --head`, 2 CPUs."""
    port = free_port()
    process = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, cwd=REPO)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"`ray start --head` did not come up: {process.stderr.read()}")
            time.sleep(0.3)
    yield address
    os.killpg(process.pid, signal.SIGTERM)  # --block: the head stops what it started
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-photos")
    write_scenes(folder, COUNT, seed=3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    return folder


def snapshot(home: Path) -> dict:
    """Everything a run leaves in the store, by path (ids may differ between libraries)."""
    with Library.open(home) as library, library.store.session() as s:
        rows = s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                                ImageRow.content_hash, ImageRow.width, ImageRow.height)).all()
        by_id = {r.id: r.path for r in rows}
        meta = {by_id[m.image_id]: {c.name: getattr(m, c.name)
                                    for c in ImageMetaRow.__table__.columns
                                    if c.name != "image_id"}
                for m in s.scalars(select(ImageMetaRow))}
        failures = {f.path: f.reason for f in s.scalars(select(FailureRow))}
        vectors = {by_id[int(i)]: v for ids, chunk in library.store.iter_vectors("image")
                   for i, v in zip(ids, chunk)}
        generation = library.store.generation("image")
    return {"rows": {r.path: (r.size, r.mtime_ns, r.content_hash, r.width, r.height)
                     for r in rows},
            "meta": meta, "failures": failures, "vectors": vectors, "generation": generation}


def assert_same_library(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    assert a["failures"] == b["failures"]
    assert a["meta"] == b["meta"]
    assert a["vectors"].keys() == b["vectors"].keys() == a["rows"].keys()
    paths = sorted(a["vectors"])
    va = np.stack([np.asarray(a["vectors"][p], dtype=np.float32) for p in paths])
    vb = np.stack([np.asarray(b["vectors"][p], dtype=np.float32) for p in paths])
    va /= np.linalg.norm(va, axis=1, keepdims=True)
    vb /= np.linalg.norm(vb, axis=1, keepdims=True)
    assert (va * vb).sum(axis=1).min() >= 0.9999
    assert a["generation"] == b["generation"]


def report(done: subprocess.CompletedProcess) -> dict:
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout)


COUNTS = ("new", "changed", "unchanged", "moved", "removed", "failed", "skipped_failed")


def test_ray_cluster_gives_the_single_process_library(ray_head, photos, tmp_path):
    """Same rows, metadata, failures and generations, vectors to cosine >= 0.9999, on a first
    run and on a rerun after files changed, moved, vanished and arrived."""
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    single, on_ray = tmp_path / "single", tmp_path / "ray"

    def both() -> tuple[dict, dict]:
        one = clipdex("--home", str(single), "index", str(folder), "--model", "tiny", "--json")
        two = clipdex("--home", str(on_ray), "index", str(folder), "--model", "tiny",
                      "--ray", ray_head, "--json")
        assert one.returncode == two.returncode == 3  # the two broken files remain
        return report(one), report(two)

    first, first_ray = both()
    assert first_ray["ray"]["address"] == ray_head
    assert first_ray["ray"]["workers"] == 2  # the cluster's 2 CPUs, one per model worker
    assert {k: first_ray[k] for k in COUNTS} == {k: first[k] for k in COUNTS}
    assert first_ray["new"] == COUNT and first_ray["failed"] == 2
    assert_same_library(snapshot(single), snapshot(on_ray))
    assert_consistent(on_ray)

    scenes = sorted(p for p in folder.glob("scene_*") if p.suffix in (".jpg", ".png"))
    scenes[0].rename(folder / "moved.jpg" if scenes[0].suffix == ".jpg"
                     else folder / "moved.png")
    scenes[1].unlink()
    shutil.copy(scenes[2], folder / "copy_of_2.jpg")  # new file, same bytes as a kept one
    scenes[3].write_bytes(scenes[4].read_bytes())  # changed content
    (folder / "broken.jpg").write_bytes(scenes[5].read_bytes())  # a failure fixed
    second, second_ray = both()
    assert {k: second_ray[k] for k in COUNTS} == {k: second[k] for k in COUNTS}
    assert (second["moved"], second["removed"], second["changed"]) == (1, 1, 1)
    assert_same_library(snapshot(single), snapshot(on_ray))
    assert_consistent(on_ray)

    third = report(clipdex("--home", str(on_ray), "index", str(folder), "--model", "tiny",
                           "--ray", ray_head, "--json"))
    assert third["unchanged"] == second["new"] + second["unchanged"] + second["changed"] + \
        second["moved"] and third["new"] == 0
    assert "ray" not in third  # nothing to embed: no Ray job was started


def _map_workers() -> list[int]:
    """PIDs of Ray Data's model actors on this machine (process title ray::MapWorker…)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::MapWorker") and b"_EmbedWorker" in cmdline:
            pids.append(int(proc.name))
    return pids


def _image_count(home: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{home / 'library.db'}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_worker_is_restarted_and_the_library_ends_complete(ray_head, tmp_path):
    many = 640  # ten worker calls of 64 on two workers, 1.5 s each: a kill lands mid-run
    folder = tmp_path / "photos"
    write_scenes(folder, many, seed=5, size=64)
    home = tmp_path / "home"
    env = _env(CLIPDEX_TEST_PAUSE_AT="ray-batch:1.5")  # each worker call takes 1.5 s more
    run = subprocess.Popen([sys.executable, "-m", "cli", "--quiet", "--home", str(home),
                            "index", str(folder), "--model", TEST_MODEL, "--ray", ray_head,
                            "--json"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        workers = _map_workers()
        if workers and 0 < _image_count(home) < many - 2 * 64:  # batches in, more to come
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    out, err = run.communicate(timeout=180)
    assert killed is not None, f"no worker was running mid-run: {err}"
    assert run.returncode == 0, err
    assert "Traceback" not in err
    assert not Path(f"/proc/{killed}").exists()  # it did die; Ray started another
    done = json.loads(out)
    assert done["new"] == many and done["failed"] == 0
    assert _image_count(home) == many
    assert_consistent(home)


def test_local_instance_with_separate_decoders(photos, tmp_path):
    """`--ray` with no address (and written before the folder: click takes the folder for
    the address; it is put back) starts a local instance; decoders apart from the model."""
    home, reference = tmp_path / "ray", tmp_path / "single"
    done = clipdex("--home", str(home), "index", "--ray", str(photos), "--model", TEST_MODEL,
                   "--ray-workers", "1", "--ray-decoders", "1", "--json")
    assert done.returncode == 3, done.stderr
    got = report(done)
    assert got["ray"]["address"] == "local"
    assert (got["ray"]["decode"], got["ray"]["workers"], got["ray"]["decoders"]) == \
        ("actors", 1, 1)
    assert clipdex("--home", str(reference), "index", str(photos), "--model",
                   TEST_MODEL).returncode == 3
    assert_same_library(snapshot(reference), snapshot(home))


def test_a_worker_that_cannot_load_the_model_fails_the_run_in_one_line(photos, tmp_path):
    """As when a node lacks the model's weights: exit 1, the worker's own error, no
    traceback; the library keeps its model, with nothing indexed."""
    plugins = SUBPROCESS_ENV["CLIPDEX_PLUGINS"] + ",clipdex_ray_worker_failure"
    done = clipdex("--home", str(tmp_path / "home"), "index", str(photos), "--model", "nodisk",
                   "--ray", "--ray-workers", "1", CLIPDEX_PLUGINS=plugins)
    assert done.returncode == 1
    error = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert error == ["Error: the Ray job failed: ModelUnavailable: cannot load model 'nodisk': "
                     "its weights are not on this node (the batches committed before are "
                     "kept; run the command again to continue)"], done.stderr
    assert "Traceback" not in done.stderr
    assert _image_count(tmp_path / "home") == 0


def test_unreachable_address_is_one_line_and_writes_nothing(tmp_path):
    home = tmp_path / "home"
    port = free_port()  # nobody listens there
    started = time.monotonic()
    done = clipdex("--home", str(home), "index", str(tmp_path), "--ray", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"Error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused (start "
        f"one with `ray start --head`, or leave out the address to run on a local Ray "
        f"instance)")
    assert time.monotonic() - started < 60
    assert not home.exists()


def test_a_cluster_refusing_the_token_is_one_line_and_writes_nothing(ray_head, tmp_path):
    home = tmp_path / "home"
    done = clipdex("--home", str(home), "index", str(tmp_path), "--ray", ray_head,
                   RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None)  # Ray sends no token then
    assert done.returncode == 1
    assert done.stderr.strip().startswith(
        f"Error: the Ray cluster at {ray_head} refused this driver's token: it uses token "
        f"authentication (Ray's default), so set RAY_AUTH_MODE=token")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not home.exists()


def test_bad_ray_options_are_usage_errors(tmp_path):
    done = clipdex("--home", str(tmp_path / "h"), "index", str(tmp_path), "--ray",
                   "no-such-place")
    assert done.returncode == 2 and "is not HOST:PORT" in done.stderr
    done = clipdex("--home", str(tmp_path / "h"), "index", str(tmp_path), "--ray-workers", "2")
    assert done.returncode == 2 and "go with --ray" in done.stderr
    assert not (tmp_path / "h").exists()


def test_missing_ray_extra_names_it(tmp_path):
    hide = "import sys; sys.modules['ray'] = None; import cli; cli.main()"
    done = subprocess.run([sys.executable, "-c", hide, "--home", str(tmp_path / "h"), "index",
                           str(tmp_path), "--ray"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == ("Error: --ray needs Ray Data (ray is not installed): "
                                   "pip install 'clipdex[ray]'")
    assert not (tmp_path / "h").exists()


def test_a_hung_decode_in_a_worker_is_a_failure_and_the_batch_goes_on(monkeypatch, photos):
    """A worker's decoder (no Ray needed to test it): the file stuck past the timeout is
    recorded, the files queued behind it are decoded all the same."""
    import threading

    from clipdex_test_embedder import StubEmbedder

    import index.ingest as ingest
    from index.distributed import _Decoder

    paths = sorted(str(p) for p in photos.glob("scene_*.jpg"))[:4]
    release = threading.Event()
    real = ingest._decode_and_preprocess_now

    def decode(path, min_side, embedder):
        if path == paths[1]:
            release.wait(10)  # a file on a hung mount
        return real(path, min_side, embedder)

    monkeypatch.setattr(ingest, "DECODE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(ingest, "_decode_and_preprocess_now", decode)
    try:
        rows = _Decoder(StubEmbedder.load(TEST_MODEL), threads=1).decode(paths)
    finally:
        release.set()
    assert [r[0] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert rows[1][1].startswith("decoding took longer than 0 s")
