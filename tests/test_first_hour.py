"""The first hour of a newcomer following README.md from a fresh clone: what they see is right.

The demo's closing commands run as printed; the default model fails fast and in one line when
the hub cannot be reached, and keeps the hub's logs off the terminal; `serve` on a busy port
says so and exits 1; `index` reports its whole time with the model load apart, and Ctrl-C
stops it with 130 and a rerun continues; `prior train` on a library without pairs draws no
bar; the demo's examples are ones the tiny model gets right. Nothing here reaches a network:
the hub is either offline (HF_HUB_OFFLINE=1), a closed port on 127.0.0.1, or a probe patched
to "unreachable".
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL
from clipdex_test_embedder import SUBPROCESS_ENV, StubEmbedder
from conftest import free_port

import cli
from index import Library
from index.embedder import register_embedder, unregister_embedder
from index.synthetic.scenes import Scene, caption_for, generate, short_caption, write_scenes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
VENV_CLIPDEX = Path(sys.executable).with_name("clipdex")
HUB_NOISE = ("huggingface_hub", "Retrying", "WARNING", "Traceback")


def _invoke(*args: object):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _clipdex(*args: object, env: dict | None = None, timeout: float = 120,
             **options) -> subprocess.CompletedProcess:
    command = [str(VENV_CLIPDEX)] if VENV_CLIPDEX.is_file() else [sys.executable, "-m", "cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ.copy(), **options)


def _offline_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


# --- the default model without a hub ---------------------------------------------------------

def test_a_long_reason_is_cut_at_a_word_with_an_ellipsis() -> None:
    from index.clip import shorten

    text = "An error happened while trying to locate the file on the Hub and we cannot " \
           "find the requested files in the local cache. Please check your connection " * 4
    cut = shorten(text, 120)
    assert cut.endswith("…") and len(cut) <= 121
    assert text.startswith(cut[:-1]) and text[len(cut) - 1] in " .", cut  # a whole word
    assert shorten("first line\nsecond line") == "first line"
    assert shorten("short enough") == "short enough"


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch):
    """As if HF_HUB_OFFLINE were not set, with a guard that fails on any connection."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts: list = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("the tests reach no network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return attempts


def test_an_unreachable_hub_fails_the_load_at_once_in_one_line(
        hub_online: list, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    import index.clip as clip
    from index import ModelUnavailable

    probed: list = []
    monkeypatch.setattr(clip, "hub_reachable", lambda *a, **k: probed.append(1) or False)
    started = time.perf_counter()
    with pytest.raises(ModelUnavailable) as failure:
        clip.ClipEmbedder.load(DEFAULT_MODEL, device="cpu", precision="fp32")
    assert time.perf_counter() - started < 20  # not the hub's ~50 s of retries (busy CI: generous)
    message = str(failure.value)
    assert probed == [1] and hub_online == []  # one probe, and no connection at all
    assert "\n" not in message and "huggingface.co cannot be reached" in message, message
    assert "--model tiny" in message
    # the offline mode was for that load only
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


def test_the_probe_says_unreachable_for_a_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from index.clip import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    started = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - started < 2.5
    with socket.socket() as server:  # and reachable when something answers there
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable() is True


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: could not load model"), lines
    assert not any(noise in result.stderr for noise in HUB_NOISE), result.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_default_model_offline_is_one_clear_line(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 2, size=32)
    offline = _clipdex("--home", tmp_path / "a", "index", photos,
                       env=_offline_env(HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE is set" in _one_error_line(offline)
    # a hub that refuses connections (a closed local port): the probe finds out, no retries
    started = time.perf_counter()
    refused = _clipdex("--home", tmp_path / "b", "index", photos,
                       env=_offline_env(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}"))
    line = _one_error_line(refused)
    assert "127.0.0.1 cannot be reached" in line and "--model tiny" in line
    assert time.perf_counter() - started < 40  # imports included; the retries alone were ~50 s
    # --verbose shows what the hub and open_clip logged, then the same one line
    verbose = _clipdex("--verbose", "--home", tmp_path / "c", "index", photos,
                       env=_offline_env(HF_HUB_OFFLINE="1"))
    assert verbose.returncode == 1
    assert "INFO" in verbose.stderr and len(verbose.stderr.strip().splitlines()) > 1
    assert verbose.stderr.strip().splitlines()[-1] == _one_error_line(offline)


# --- index: the time it took, and Ctrl-C -----------------------------------------------------

SLOW_LOAD = "slowload"


@pytest.fixture
def slow_loading_model():
    def load(spec: str, **_: object) -> StubEmbedder:
        time.sleep(0.4)  # as a real model's weights take a while to load
        return StubEmbedder(spec)

    register_embedder(SLOW_LOAD, load)
    yield SLOW_LOAD
    unregister_embedder(SLOW_LOAD)


def test_index_reports_its_whole_time_with_the_model_load_apart(
        tmp_path: Path, slow_loading_model: str) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 5, size=32)
    home = tmp_path / "home"
    text = _invoke("--home", home, "index", photos, "--model", slow_loading_model)
    assert text.exit_code == 0, text.output
    found = re.search(r" in (\d+\.\d)s \(model load (\d+\.\d)s\)$", text.stdout.strip())
    assert found, text.stdout
    total, load = map(float, found.groups())
    assert load >= 0.4 and total >= load
    # a changed file makes the next run load the model too (lazily): still counted apart
    write_scenes(photos / "more", 2, size=32)
    again = _invoke("--home", home, "index", photos, "--json")
    report = json.loads(again.stdout)
    assert report["new"] == 2 and report["model_load_seconds"] >= 0.4
    assert report["total_seconds"] >= report["model_load_seconds"] + report["seconds"] - 0.01
    assert report["seconds"] < report["total_seconds"] - 0.4  # the scan/embed time alone
    # an unchanged tree never loads the model
    unchanged = json.loads(_invoke("--home", home, "index", photos, "--json").stdout)
    assert unchanged["unchanged"] == 7 and unchanged["model_load_seconds"] == 0


SLOW_PLUGIN = '''
import time

from clipdex_test_embedder import StubEmbedder
from index.embedder import register_embedder


class SlowStub(StubEmbedder):
    def encode_image_tensors(self, batch):
        time.sleep(0.25)  # a batch takes a while, as a real model's does
        return super().encode_image_tensors(batch)


register_embedder("slowtest", SlowStub.load)
'''


def _rows(home: Path) -> int:
    try:
        with sqlite3.connect(f"file:{home / 'library.db'}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.Error:  # not made yet
        return 0


@pytest.mark.slow
def test_ctrl_c_during_index_says_what_was_saved_and_a_rerun_continues(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 640, size=32)  # 10 batches of 64, a quarter second each
    (tmp_path / "slow_embedder.py").write_text(SLOW_PLUGIN)
    env = {**os.environ, **SUBPROCESS_ENV,
           "CLIPDEX_PLUGINS": f"{SUBPROCESS_ENV['CLIPDEX_PLUGINS']},slow_embedder",
           "PYTHONPATH": os.pathsep.join([SUBPROCESS_ENV["PYTHONPATH"], str(tmp_path)])}
    home = tmp_path / "home"
    command = [str(VENV_CLIPDEX)] if VENV_CLIPDEX.is_file() else [sys.executable, "-m", "cli"]
    run = subprocess.Popen([*command, "--home", str(home), "index", str(photos), "--model",
                            "slowtest"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _rows(home) == 0 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # until the first batch is committed
        assert run.poll() is None, run.communicate()
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, stderr
    assert "Aborted" not in stderr and "Traceback" not in stderr, stderr
    said = re.search(r"interrupted: (\d+) photos? embedded and saved in this run; run the same "
                     r"command again to continue", stderr)
    assert said, stderr
    saved, rows = int(said.group(1)), _rows(home)
    assert 0 < saved <= rows < 640, (saved, rows)
    rerun = subprocess.run([*command, "--home", str(home), "index", str(photos)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.startswith(f"{640 - rows} new, 0 changed, {rows} unchanged"), rerun.stdout


# --- prior train -----------------------------------------------------------------------------

def test_prior_train_without_pairs_fails_before_drawing_a_bar(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 3, size=32)
    home = tmp_path / "home"
    assert _invoke("--home", home, "index", photos, "--model", TEST_MODEL).exit_code == 0
    monkeypatch.setattr(cli, "_progress_enabled", lambda ctx: True)  # as on a terminal
    result = _invoke("--home", home, "prior", "train")
    assert result.exit_code == 1
    assert "no captions linked to indexed images" in result.stderr
    assert "step" not in result.stderr and "training prior" not in result.stderr, result.stderr


def test_small_libraries_train_few_steps() -> None:
    from retrieval.expansion.contrastive import ContrastiveConfig
    from retrieval.expansion.prior import TrainConfig

    assert [TrainConfig().total_steps(n) for n in (10, 300, 10_000, 100_000)] == \
        [150, 150, 1563, 6000]
    assert [ContrastiveConfig().total_steps(n) for n in (10, 300, 640, 7214)] == \
        [300, 300, 640, 1000]
    assert ContrastiveConfig(steps=1000).total_steps(10) == 1000
    help_text = _invoke("prior", "train", "--help").output
    assert "150-6000" in help_text and "300 pairs train in" in help_text


# --- serve -----------------------------------------------------------------------------------

def test_serve_on_a_busy_port_says_so_and_exits_1(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 3, size=32)
    home = tmp_path / "home"
    assert _invoke("--home", home, "index", photos, "--model", TEST_MODEL).exit_code == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _invoke("--home", home, "serve", "--port", port)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (f"Error: port {port} is already in use on 127.0.0.1: "
                                     f"choose another with --port")
    assert "serving" not in result.output


def test_serve_without_the_extra_gives_an_install_line_that_works_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = _invoke("serve")
    assert result.exit_code == 1
    # the line, as a shell reads it: this interpreter's pip, installing this clone's extra
    line = result.stderr.strip().rpartition("): ")[2]
    assert shlex.split(line) == [sys.executable, "-m", "pip", "install", "-e",
                                 f"{REPO}[server]"], result.stderr


def test_make_demo_installs_the_server_extra() -> None:
    recipe = re.search(r"^install:.*\n\t(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert recipe and "-e '.[server]'" in recipe.group(1)


# --- the demo --------------------------------------------------------------------------------

def test_captions_say_crosses() -> None:
    two = Scene(shape="cross", colour="red", count=2, size="small", position="",
                background="plain", background_colour="white", seed=1)
    assert all("red crosses" in caption_for(two, variant) for variant in range(5))
    assert short_caption(two, 1) == "two red crosses"
    assert not any("crosss" in caption_for(s, i) for i, s in enumerate(generate(300, seed=7)))


@pytest.fixture(scope="module")
def demo_library(tmp_path_factory: pytest.TempPathFactory, one_model_load):
    """The demo's own scenes (its count and seed), indexed and captioned with tiny."""
    from retrieval.demo import DEMO_COUNT, DEMO_SEED

    root = tmp_path_factory.mktemp("demo")
    write_scenes(root / "scenes", DEMO_COUNT, seed=DEMO_SEED)
    with Library.open(root / "home") as library:
        library.index([root / "scenes"], model="tiny")
        library.add_captions(root / "scenes" / "captions.jsonl")
    from retrieval import Searcher

    searcher = Searcher.open(root / "home")
    scenes = generate(DEMO_COUNT, seed=DEMO_SEED)
    yield searcher, root / "scenes", lambda path: scenes[int(Path(path).stem.split("_")[1])]
    searcher.close()


def test_the_demo_examples_are_right(demo_library) -> None:
    from retrieval.demo import EXAMPLE_IMAGE, EXAMPLE_TEXTS

    searcher, scenes_dir, scene_of = demo_library
    shown = [scene_of(h.path) for h in searcher.search(EXAMPLE_TEXTS["image"], k=5).hits]
    assert [(s.count, s.colour, s.shape) for s in shown] == [(1, "yellow", "triangle")] * 5
    captions = searcher.search(EXAMPLE_TEXTS["caption"], target="captions", k=3).hits
    assert [(s.count, s.colour, s.shape) for s in map(scene_of, (h.path for h in captions))] \
        == [(2, "orange", "star")] * 3
    positive, negative = EXAMPLE_TEXTS["mixture"]
    mixed = [scene_of(h.path) for h in searcher.search(positive, negatives=[negative], k=5).hits]
    assert all(s.shape == "circle" and s.size == "large" and s.colour != "red" for s in mixed)
    example = scenes_dir / EXAMPLE_IMAGE
    own = scene_of(example)
    for hits in (searcher.search(image=example, k=5).hits, searcher.caption(example, k=3).hits):
        assert all((scene_of(h.path).colour, scene_of(h.path).shape) == (own.colour, own.shape)
                   for h in hits), [scene_of(h.path) for h in hits]


def test_the_demo_filter_examples_show_what_they_say(demo_library) -> None:
    from retrieval.demo import EXAMPLE_FILTERS

    searcher, _, scene_of = demo_library
    text, camera, place = (EXAMPLE_FILTERS[k] for k in ("text", "camera", "place"))
    filtered = searcher.search(text, camera=camera, sort="date", k=5).hits
    assert len(filtered) == 5
    assert all(camera in h.meta["camera"].lower() for h in filtered)
    assert [h.meta["taken_at"][:19] for h in filtered] == \
        sorted(h.meta["taken_at"][:19] for h in filtered)
    # relevance still picks them: the best canon photos for the text are yellow triangles
    assert scene_of(min(filtered, key=lambda h: -h.score).path).shape == "triangle"
    listed = searcher.search(place=place, k=5).hits
    assert len(listed) == 5 and all(h.meta["city"] == place for h in listed)
    assert [h.meta["taken_at"] for h in listed] == \
        sorted((h.meta["taken_at"] for h in listed), reverse=True)


def test_a_plural_crosses_query_finds_crosses(demo_library) -> None:
    searcher, _, scene_of = demo_library
    hits = searcher.search("two red crosses", k=3).hits
    assert all(scene_of(h.path).shape == "cross" for h in hits)


@pytest.mark.slow
@pytest.mark.skipif(not VENV_CLIPDEX.is_file(), reason="clipdex is not installed beside python")
def test_the_demo_prints_commands_that_run_as_printed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CLIPDEX_HOME"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != VENV_CLIPDEX.parent.resolve())
    assert shutil.which("clipdex", path=env["PATH"]) is None or \
        not os.path.samefile(shutil.which("clipdex", path=env["PATH"]), VENV_CLIPDEX)
    demo = subprocess.run([str(VENV_CLIPDEX), "-q", "demo", "d", "--count", "10"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    tail = demo.stdout.split("Try your own queries:\n", 1)[1].splitlines()
    commands = [line.strip() for line in tail if line.startswith("  ") and "--home" in line]
    assert len(commands) == 6 and all(c.startswith(f"{VENV_CLIPDEX} --home d/library ")
                                      for c in commands), tail
    assert f"source {VENV_CLIPDEX.parent / 'activate'}" in demo.stdout \
        or not (VENV_CLIPDEX.parent / "activate").is_file()
    stats = next(c for c in commands if c.endswith(" stats"))
    ran = subprocess.run(["bash", "-c", stats], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0 and "images:   10" in ran.stdout, ran.stderr
    for command in (c for c in commands if " search " in c):  # the filtered ones too
        ran = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, (command, ran.stderr)
