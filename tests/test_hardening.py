"""Hostile files and faults on the write path: odd names, special files, huge files, permission
fixes, files that vanish or change without a new mtime, stuck decodes, stale temp files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL
from clipdex_test_embedder import SUBPROCESS_ENV
from PIL import Image

import cli
import index.ingest
import index.scan
from index import Library
from index.captions import add_captions
from index.scan import DecodeFailure
from index.synthetic.scenes import generate, render

MODEL = TEST_MODEL  # the `test` embedder: these tests look at storage, not meaning
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_model_load")


def scene(seed: int, size: int = 64) -> Image.Image:
    return render(next(iter(generate(1, seed=seed))), size)


def run(home: Path, *args: str):
    result = CliRunner().invoke(cli.main, ["--home", str(home), *args], catch_exceptions=False)
    return result


def index_json(home: Path, root: Path, *options: str):
    result = run(home, "index", str(root), "--model", MODEL, "--json", *options)
    return result, json.loads(result.stdout)


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A fresh interpreter (for a hang or a memory peak that must not touch this process)."""
    env = {**os.environ, **SUBPROCESS_ENV}  # the `test` embedder loads there too
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


# --- names and special files ----------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_indexed_and_printed_safely(tmp_path: Path) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    scene(0).save(root / "good.png")
    raw_name = os.fsencode(root) + b"/bad_\xff.png"
    with open(raw_name, "wb") as fh:
        scene(1).save(fh, format="PNG")
    result, report = index_json(home, root)
    assert result.exit_code == 0, result.output
    assert (report["new"], report["failed"]) == (2, 0)
    with Library.open(home) as library:
        stored = {os.fsencode(p) for p in _paths(library)}
    assert raw_name in stored  # the name round-trips, byte for byte

    again, report = index_json(home, root)
    assert (again.exit_code, report["unchanged"], report["new"]) == (0, 2, 0)

    paths = run(home, "search", "a shape", "--paths", "--top", "2")
    assert paths.exit_code == 0
    assert raw_name in paths.stdout_bytes.split(b"\n")
    table = run(home, "search", "a shape", "--top", "2")
    assert table.exit_code == 0 and "bad_\\xff.png" in table.stdout
    as_json = run(home, "search", "a shape", "--top", "2", "--json")
    hits = json.loads(as_json.stdout)["hits"]
    assert raw_name in {os.fsencode(h["path"]) for h in hits}


def _paths(library: Library) -> list[str]:
    from sqlalchemy import select

    from index.store import ImageRow

    with library.store.session() as s:
        return list(s.scalars(select(ImageRow.path)))


def test_a_fifo_named_jpg_is_a_failure_not_a_hang(tmp_path: Path) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    scene(0).save(root / "good.jpg")
    os.mkfifo(root / "pipe.jpg")
    code = (f"import cli, sys; sys.argv = ['clipdex', '--home', {str(home)!r}, 'index', "
            f"{str(root)!r}, '--model', {MODEL!r}, '--json']; cli.main()")
    result = run_python(code, timeout=120)  # before the fix: blocked in open() for ever
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["new"] == 1
    assert report["failures"] == [{"path": str(root / "pipe.jpg"),
                                   "reason": "not a regular file (a named pipe)"}]


def test_decode_file_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    # a FIFO swapped in after the scan: decode_file itself must refuse it without blocking
    os.mkfifo(tmp_path / "pipe.jpg")
    code = ("from index.scan import decode_file, DecodeFailure\n"
            f"try:\n    decode_file({str(tmp_path / 'pipe.jpg')!r}, min_side=64)\n"
            "except DecodeFailure as exc:\n    print(exc)\n")
    result = run_python(code, timeout=60)
    assert result.stdout.strip() == "not a regular file (a named pipe)", result.stderr


def test_a_huge_non_image_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "huge.jpg"
    with open(big, "wb") as fh:
        fh.truncate(2 * 2**30)  # 2 GB, sparse: costs no disk
    code = ("from index.scan import decode_file, DecodeFailure\n"
            "def peak():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n"
            "            return int(line.split()[1]) // 1024\n"
            "import PIL.Image, PIL.JpegImagePlugin\n"
            "before = peak()\n"
            f"try:\n    decode_file({str(big)!r}, min_side=64)\n"
            "except DecodeFailure as exc:\n    print(exc)\n"
            "print(peak() - before)\n")
    result = run_python(code)
    reason, grown_mb = result.stdout.strip().splitlines()
    assert "not an image" in reason
    assert int(grown_mb) < 100, f"peak RSS grew {grown_mb} MB for a 2 GB file"


def test_peak_memory_of_indexing_does_not_grow_with_photo_size(tmp_path: Path) -> None:
    """16 photos of 4000×4000 (48 MB each decoded) in one batch: the batch keeps model-sized
    arrays only. Before: every decoded photo was kept until the commit (+0.8 GB)."""
    root = tmp_path / "big"
    root.mkdir()
    for number in range(16):
        Image.new("RGB", (4000, 4000), (number * 15, 80, 255 - number * 15)).save(
            root / f"big_{number:02d}.png", compress_level=1)
    code = ("from index import Library\n"
            "def peak():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n"
            "            return int(line.split()[1]) // 1024\n"
            f"library = Library.open({str(tmp_path / 'home')!r})\n"
            f"embedder = library.embedder({MODEL!r})\n"
            "embedder.encode_images([__import__('PIL.Image').Image.new('RGB', (64, 64))])\n"
            "before = peak()\n"
            f"report = library.index([{str(root)!r}], model={MODEL!r}, workers=2)\n"
            "print(report.new, peak() - before)\n")
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr
    new, grown_mb = result.stdout.split()
    assert int(new) == 16
    # two decoders hold at most two full-size photos (plus their RGB conversion) at a time
    assert int(grown_mb) < 450, f"peak RSS grew {grown_mb} MB"


# --- retrying, vanishing, rehashing, exit status ----------------------------------------------
def test_a_permission_error_is_retried_once_fixed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    scene(0).save(root / "open.jpg")
    scene(1).save(root / "locked.jpg")
    locked = str(root / "locked.jpg")
    real_open = os.open

    def refuse(path, flags, *rest, **kw):  # root reads anything: simulate chmod 000
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(path, flags, *rest, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(index.scan.os, "open", refuse)
        result, report = index_json(home, root)
    assert result.exit_code == 3
    assert "permission denied" in report["failures"][0]["reason"]

    # permissions fixed: size and mtime are the same, and the file is retried all the same
    result, report = index_json(home, root)
    assert (result.exit_code, report["new"], report["skipped_failed"]) == (0, 1, 0)


def test_unchanged_failures_keep_exit_3_and_retry_failed_retries_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    scene(0).save(root / "a.jpg")
    scene(1).save(root / "flaky.jpg")
    real_decode = index.ingest.decode_file

    def fail_once(path: str, **options):
        if path.endswith("flaky.jpg"):
            raise DecodeFailure("simulated decoder failure")
        return real_decode(path, **options)

    with monkeypatch.context() as mp:
        mp.setattr(index.ingest, "decode_file", fail_once)
        first, report = index_json(home, root)
    assert (first.exit_code, report["failed"]) == (3, 1)

    again, report = index_json(home, root)  # the failure is still listed: still exit 3
    assert (again.exit_code, report["failed"], report["skipped_failed"]) == (3, 0, 1)
    assert report["failures_remain"] is True

    retried, report = index_json(home, root, "--retry-failed")
    assert (retried.exit_code, report["new"], report["skipped_failed"]) == (0, 1, 0)
    assert run(home, "failures").stdout.strip() == "no failures"


def test_files_that_vanish_mid_run_are_removals_not_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    for number in range(4):
        scene(number).save(root / f"scene_{number}.jpg")
    assert index_json(home, root)[1]["new"] == 4
    scene(10).save(root / "scene_0.jpg")  # changed, then deleted before it is read
    os.utime(root / "scene_0.jpg", ns=(0, 10**18))
    scene(11).save(root / "late.jpg")  # new, then deleted before it is read
    real_decode = index.ingest.decode_file

    def delete_first(path: str, **options):
        if path.endswith(("scene_0.jpg", "late.jpg")):
            os.remove(path)
        return real_decode(path, **options)

    with monkeypatch.context() as mp:
        mp.setattr(index.ingest, "decode_file", delete_first)
        result, report = index_json(home, root)
    assert result.exit_code == 0, report["failures"]
    assert (report["failed"], report["removed"], report["new"]) == (0, 1, 0)
    with Library.open(home) as library:
        assert library.failures() == []
        assert sorted(os.path.basename(p) for p in _paths(library)) == \
            ["scene_1.jpg", "scene_2.jpg", "scene_3.jpg"]


def test_rehash_finds_a_change_that_kept_size_and_mtime(tmp_path: Path) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    scene(0).save(root / "a.bmp")  # BMP: the size depends on the dimensions only
    scene(1).save(root / "b.bmp")
    assert index_json(home, root)[1]["new"] == 2
    before = os.stat(root / "a.bmp")
    scene(2).save(root / "a.bmp")
    os.utime(root / "a.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(root / "a.bmp").st_size == before.st_size

    _, report = index_json(home, root)  # the documented rule: size + mtime
    assert (report["unchanged"], report["changed"]) == (2, 0)
    _, report = index_json(home, root, "--rehash")
    assert (report["unchanged"], report["changed"], report["rehashed"]) == (1, 1, 2)
    _, report = index_json(home, root, "--rehash")
    assert (report["unchanged"], report["changed"]) == (2, 0)


def test_a_decode_that_never_returns_does_not_stall_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    for number in range(3):
        scene(number).save(root / f"scene_{number}.jpg")
    release = threading.Event()
    real_decode = index.ingest.decode_file

    def hang(path: str, **options):
        if path.endswith("scene_1.jpg"):
            release.wait(60)  # a hung network mount, say
        return real_decode(path, **options)

    monkeypatch.setattr(index.ingest, "decode_file", hang)
    monkeypatch.setattr(index.ingest, "DECODE_TIMEOUT_S", 1.0)
    outcome: dict = {}

    def index_it() -> None:
        with Library.open(home) as library:
            outcome["report"] = library.index([root], model=MODEL, workers=2)

    worker = threading.Thread(target=index_it, daemon=True)
    try:
        worker.start()
        worker.join(45)
        assert not worker.is_alive(), "the run waited for the stuck decode"
    finally:
        release.set()
    report = outcome["report"]
    assert (report.new, report.failed) == (2, 1)
    assert "longer than 1 s" in report.failures[0][1]


# --- derived files: readers save the caught-up index; stale temp files go ---------------------
def test_a_reader_saves_the_index_it_caught_up(tmp_path: Path) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    scene(0).save(root / "a.jpg")
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"path": "photos/a.jpg", "caption": "a shape"}\n')
    assert run(home, "index", str(root), "--model", MODEL).exit_code == 0
    assert run(home, "captions", "add", str(captions)).exit_code == 0
    # what an interrupted `captions add` leaves: rows committed, the index file not saved
    more = tmp_path / "more.jsonl"
    more.write_text('{"caption": "two red circles"}\n{"caption": "a blue square"}\n')
    with Library.open(home) as library:
        add_captions(library.store, library.embedder(), more)
        generation = library.store.generation("caption")
    assert _saved_generation(home, "caption") < generation

    assert run(home, "search", "circles", "--target", "captions").exit_code == 0
    assert _saved_generation(home, "caption") == generation  # the next query need not


def _saved_generation(home: Path, kind: str) -> int:
    files = list((home / "vectors").glob(f"{kind}-*.faiss"))
    assert len(files) == 1, files
    return int(files[0].stem.split("-")[1])


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Library.open(home).close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = home / f".prior.safetensors.{dead.pid}.tmp"
        busy = home / f".prior.safetensors.{alive.pid}.tmp"
        legacy = home / "tmpab12cd34.tmp"  # a kill in the old prior save (tempfile.mkstemp)
        for path in (stale, busy, legacy):
            path.write_bytes(b"x" * 1000)
        os.utime(legacy, (0, 0))
        Library.open(home).close()
        assert not stale.exists() and not legacy.exists()
        assert busy.exists()  # its writer is still running
    finally:
        alive.kill()
        alive.wait()
