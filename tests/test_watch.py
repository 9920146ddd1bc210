"""Watch mode end to end with real files: create, modify, move, delete, a burst, a file still
being written, polling, and `clipdex watch` killed with SIGKILL then restarted.

Waits poll the store with a generous deadline (the machine may be busy); nothing here
asserts a time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL
from clipdex_test_embedder import SUBPROCESS_ENV

import cli
from index import Library
from index.synthetic.scenes import write_scenes
from index.watch import watch

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 240.0  # generous: the first batch loads the model, on a busy machine too

pytestmark = pytest.mark.usefixtures("one_model_load")


def wait_for(condition, what, deadline: float = DEADLINE_S):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what() if callable(what) else what}")


class Watcher:
    """`index.watch.watch` in a thread, over its own library, recording each batch."""

    def __init__(self, home: Path, folder: Path, *, poll: bool = False) -> None:
        self.home, self.folder = home, folder
        self.batches: list = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.library = Library.open(home)
        self.thread = threading.Thread(target=self._run, args=(poll,), daemon=True)
        self.thread.start()
        wait_for(lambda: self.batches or self.error, "the start-up catch-up")

    def _run(self, poll: bool) -> None:
        try:
            watch(self.library, [self.folder], model=TEST_MODEL, poll=poll,
                  on_batch=self.batches.append, stop=self.stop)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.library.close()
        assert self.error is None, self.error


def _batches(watcher: Watcher) -> list:
    return [(b.paths, {k: v for k, v in b.report.as_dict().items() if v and k in (
        "new", "changed", "moved", "removed", "failed")}) for b in watcher.batches]


def paths_in(home: Path) -> set[str]:
    with Library.open(home) as library:
        ids = library.store.ids("image").tolist()
        return set(library.store.image_paths(ids).values())


def names_in(home: Path) -> set[str]:
    return {Path(p).name for p in paths_in(home)}


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    write_scenes(source, 60, seed=8, size=64)
    return source


@pytest.mark.parametrize("poll", [False, True], ids=["events", "polling"])
def test_create_modify_move_delete(tmp_path: Path, scenes: Path, poll: bool) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(scenes / "scene_00000.jpg", photos)
    watcher = Watcher(tmp_path / "home", photos, poll=poll)
    try:
        assert watcher.batches[0].startup and watcher.batches[0].report.new == 1
        shutil.copy(scenes / "scene_00001.jpg", photos / "new.jpg")
        wait_for(lambda: "new.jpg" in names_in(tmp_path / "home"), "a new photo")
        with Library.open(tmp_path / "home") as library:
            before = {p: i for i, p in library.store.image_paths(
                library.store.ids("image").tolist()).items()}
        if poll:  # polling sees a change by mtime, which may count whole seconds
            time.sleep(1.1)
        shutil.copy(scenes / "scene_00003.jpg", photos / "new.jpg")  # same name, new bytes
        wait_for(lambda: any(b.report.changed for b in watcher.batches),
                 lambda: f"a changed photo: {_batches(watcher)}")
        (photos / "new.jpg").rename(photos / "moved.jpg")
        wait_for(lambda: names_in(tmp_path / "home") == {"scene_00000.jpg", "moved.jpg"},
                 "a moved photo")
        if not poll:  # polling may see the two halves of a rename in batches apart
            # (a batch's rows are committed just before it is reported)
            wait_for(lambda: any(b.report.moved for b in watcher.batches),
                     lambda: f"the move reported: {_batches(watcher)}")
        (photos / "scene_00000.jpg").unlink()
        wait_for(lambda: names_in(tmp_path / "home") == {"moved.jpg"}, "a deleted photo")
        sub = photos / "sub"
        sub.mkdir()
        shutil.copy(scenes / "scene_00004.jpg", sub)
        wait_for(lambda: "scene_00004.jpg" in names_in(tmp_path / "home"), "a subfolder")
        shutil.rmtree(sub)
        wait_for(lambda: names_in(tmp_path / "home") == {"moved.jpg"}, "a vanished subfolder")
        assert str(photos / "new.jpg") in before
    finally:
        watcher.close()


def test_a_burst_is_a_few_batches(tmp_path: Path, scenes: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    watcher = Watcher(tmp_path / "home", photos)
    try:
        for path in sorted(scenes.glob("scene_*")):
            shutil.copy(path, photos)
        count = len(list(scenes.glob("scene_*")))
        # the batches' own reports (a batch's rows are committed before it is reported)
        wait_for(lambda: sum(b.report.new for b in watcher.batches if not b.startup) >= count,
                 lambda: f"the whole burst: {_batches(watcher)}")
        assert len(paths_in(tmp_path / "home")) == count
        batches = [b for b in watcher.batches if not b.startup]
        assert sum(b.report.new for b in batches) == count
        assert len(batches) <= count // 5, [b.report.new for b in batches]
    finally:
        watcher.close()


def test_a_file_being_written_waits_until_it_holds_still(tmp_path: Path,
                                                          scenes: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    watcher = Watcher(tmp_path / "home", photos)
    data = (scenes / "scene_00006.jpg").read_bytes()
    try:
        with open(photos / "slow.jpg", "wb") as fh:  # ~1.5 s of small writes
            for start in range(0, len(data), max(1, len(data) // 30)):
                fh.write(data[start:start + max(1, len(data) // 30)])
                fh.flush()
                time.sleep(0.05)
        wait_for(lambda: "slow.jpg" in names_in(tmp_path / "home"), "the slow photo")
        with Library.open(tmp_path / "home") as library:
            assert library.failures() == []  # never indexed half-written
    finally:
        watcher.close()


def test_a_photo_landing_just_after_the_startup_scan_is_not_missed(tmp_path: Path,
                                                                    scenes: Path) -> None:
    # inotify reports nothing from before a watch began: the watch must begin before the
    # start-up scan, or a photo landing between the two waits for the next start
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(scenes / "scene_00000.jpg", photos)
    library = Library.open(tmp_path / "home")
    real_index, calls = library.index, []

    def index_then_a_photo_lands(*args, **kwargs):
        report = real_index(*args, **kwargs)
        if not calls:  # the start-up scan is done: a photo lands before any batch
            shutil.copy(scenes / "scene_00001.jpg", photos / "late.jpg")
        calls.append(args)
        return report

    library.index = index_then_a_photo_lands
    batches, stop, errors = [], threading.Event(), []

    def run() -> None:
        try:
            watch(library, [photos], model=TEST_MODEL, on_batch=batches.append, stop=stop)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: "late.jpg" in names_in(tmp_path / "home") or errors,
                 lambda: f"the late photo: {[b.paths for b in batches]}")
        assert not errors, errors
        assert batches[0].startup and batches[0].report.new == 1
    finally:
        stop.set()
        thread.join(timeout=30)
        library.close()


def test_serve_watch_indexes_a_new_photo_and_answers_for_it(tmp_path: Path,
                                                            scenes: Path) -> None:
    import httpx

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(scenes / "scene_00000.jpg", photos)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLIPDEX_HOME", "CLIPDEX_DB", "CLIPDEX_MODEL")}
    env.update(HF_HUB_OFFLINE="1", **SUBPROCESS_ENV)
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "--quiet", "--home", str(tmp_path / "home"), "serve",
         "--port", str(port), "--watch", str(photos), "--model", TEST_MODEL],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/api/search?sort=-date&top=100"

    def listed() -> set[str] | None:
        if server.poll() is not None:
            raise AssertionError(server.stderr.read())
        try:
            response = httpx.get(url, timeout=10)
        except httpx.TransportError:
            return None
        assert response.status_code == 200, response.text
        return {Path(h["path"]).name for h in response.json()["hits"]}

    try:
        assert wait_for(listed, "the server") == {"scene_00000.jpg"}
        shutil.copy(scenes / "scene_00001.jpg", photos / "new.jpg")
        wait_for(lambda: "new.jpg" in (listed() or ()), "the new photo in a search")
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert "watch: 1 new" in err, err  # the catch-up line


def test_watch_needs_existing_folders(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.main, ["--home", str(tmp_path / "h"), "watch",
                                           str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such folder" in result.output
    (tmp_path / "file.jpg").write_bytes(b"x")
    result = CliRunner().invoke(cli.main, ["--home", str(tmp_path / "h"), "watch",
                                           str(tmp_path / "file.jpg")])
    assert result.exit_code == 2 and "not a folder" in result.output


def _clipdex_watch(home: Path, folder: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLIPDEX_HOME", "CLIPDEX_DB", "CLIPDEX_MODEL")}
    env.update(HF_HUB_OFFLINE="1", **SUBPROCESS_ENV)
    return subprocess.Popen([sys.executable, "-m", "cli", "--quiet", "--home", str(home),
                             "watch", str(folder), "--model", TEST_MODEL, "--json"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_burst_then_restart_completes(tmp_path: Path, scenes: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    home = tmp_path / "home"
    process = _clipdex_watch(home, photos)
    try:
        first = json.loads(process.stdout.readline())  # the start-up line
        assert first["startup"] is True
        names = sorted(p.name for p in scenes.glob("scene_*"))
        for name in names:
            shutil.copy(scenes / name, photos)
        wait_for(lambda: len(paths_in(home)) > 0, "the first batch")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    restarted = _clipdex_watch(home, photos)
    try:
        line = json.loads(restarted.stdout.readline())
        assert line["startup"] is True and line["failed"] == 0
        wait_for(lambda: names_in(home) == set(names), "every photo after the restart")
    finally:
        restarted.send_signal(signal.SIGINT)
        out, err = restarted.communicate(timeout=60)
    assert restarted.returncode == 130, err
    with Library.open(home) as library:
        vi = library.vector_index("image")
        assert sorted(library.store.ids("image").tolist()) == \
            sorted(int(i) for i in _ids(vi))  # the index holds exactly the store's rows


def _ids(vi) -> list[int]:
    from index.vectors import _index_ids

    return _index_ids(vi.index).tolist()


def test_batches_hold_the_index_in_memory_until_saved(tmp_path: Path, scenes: Path) -> None:
    # watch batches call index(save_index=False): the file is not rewritten per batch, a
    # reader still finds every photo (it catches the file up from the store), and
    # save_indexes writes the held index once
    from index.vectors import VectorIndex

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(scenes / "scene_00000.jpg", photos)
    home = tmp_path / "home"
    with Library.open(home) as library:
        library.index([photos], model=TEST_MODEL)
        directory = library.settings.index_dir
        saved = VectorIndex.newest_file(directory, "image")[1]
        assert saved == library.store.generation("image") and library.unsaved_indexes() == []
        for name in ("scene_00001.jpg", "scene_00003.jpg"):
            shutil.copy(scenes / name, photos)
            report = library.index([photos / name], model=TEST_MODEL, save_index=False)
            assert report.new == 1
        assert VectorIndex.newest_file(directory, "image")[1] == saved  # not rewritten
        held = library.unsaved_indexes()
        assert held == ["image"]
        with Library.open(home, create=False) as reader:  # a reader sees all three
            assert reader.vector_index("image").size == 3
        (photos / "scene_00000.jpg").unlink()
        library.index([photos], model=TEST_MODEL, save_index=False)  # a removal, held too
        assert library.save_indexes() == ["image"]
        assert library.save_indexes() == [] and library.unsaved_indexes() == []
        generation = library.store.generation("image")
        assert VectorIndex.newest_file(directory, "image")[1] == generation
        assert sorted(_ids(library.vector_index("image"))) == \
            sorted(library.store.ids("image").tolist())
    assert names_in(home) == {"scene_00001.jpg", "scene_00003.jpg"}


def test_the_watcher_saves_its_index_when_it_stops(tmp_path: Path, scenes: Path) -> None:
    from index.vectors import VectorIndex

    photos = tmp_path / "photos"
    photos.mkdir()
    watcher = Watcher(tmp_path / "home", photos)
    try:
        for name in ("scene_00001.jpg", "scene_00003.jpg"):
            shutil.copy(scenes / name, photos)
        wait_for(lambda: len(paths_in(tmp_path / "home")) == 2, "two photos")
    finally:
        watcher.close()
    with Library.open(tmp_path / "home") as library:
        assert VectorIndex.newest_file(library.settings.index_dir, "image")[1] == \
            library.store.generation("image")
