"""The torch-free query runtime: the checked ONNX export, queries that never import torch, and
what happens when an export is missing, damaged, incomplete or does not cover a tower."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index import Library
from index.onnx_runtime import MANIFEST, OnnxEmbedder, export_folder, read_manifest
from index.synthetic.scenes import caption_for, render, sample_scene
from retrieval import Searcher

REPO = Path(__file__).resolve().parents[1]
TORCH_MODULES = ("torch", "torchvision", "open_clip")


def _photos(folder: Path, n: int = 12, seed: int = 4) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"p{i:02d}.jpg"
        render(sample_scene(rng), 96 + 7 * i).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory):
    """A tiny library whose `index` run exported the model (it shares the session's cache)."""
    root = tmp_path_factory.mktemp("onnx")
    photos = _photos(root / "photos")
    captions = root / "captions.csv"
    rng = random.Random(7)
    captions.write_text("path,caption\n" + "".join(
        f"{p},{caption_for(sample_scene(rng), i)}\n" for i, p in enumerate(photos)))
    with Library.open(root / "home") as lib:
        report = lib.index([root / "photos"], model="tiny")
        lib.add_captions(captions)
    return root / "home", photos, report


def _run(args: list[str], home: Path, env: dict | None = None, code: str | None = None):
    """`clipdex --home HOME ARGS` in a fresh interpreter; stdout/stderr plus which of
    torch/torchvision/open_clip it imported (the last stdout line)."""
    script = code or (
        "import sys, cli\n"
        f"sys.argv = ['clipdex', '--home', {str(home)!r}, *{args!r}]\n"
        "code = 0\ntry:\n    cli.main()\nexcept SystemExit as exit:\n    code = exit.code\n"
        f"print(sorted(m for m in sys.modules if m in {TORCH_MODULES!r}))\n"
        "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)
    lines = result.stdout.strip().splitlines()
    return result, lines[:-1], json.loads(lines[-1].replace("'", '"')) if lines else None


def _manifest(home: Path) -> tuple[Path, dict]:
    folder = export_folder(home, "tiny", 128)
    return folder, read_manifest(folder, "tiny", 128)


def test_index_exports_both_towers_checked_against_torch(library) -> None:
    home, _, report = library
    assert report.queries.startswith("exported") or report.queries == "ready"
    folder, manifest = _manifest(home)
    for tower in ("text", "image"):
        info = manifest["towers"][tower]
        assert "error" not in info, info
        assert info["probe_cosine"]["fp32"] >= 0.9999
        assert info["use"] in info["files"] and len(info["files"]) == 1  # only what auto runs
        if info["use"] == "int8":  # kept only when it passed the probe and ran faster
            assert info["probe_cosine"]["int8"] >= 0.999
            assert info["ms"]["int8"] < info["ms"]["fp32"]
        entry = info["files"][info["use"]]
        assert (folder / entry["name"]).stat().st_size == entry["size"]
    assert (folder / manifest["tokenizer"]["vocab"]).is_file()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_photos_are_embedded_on_onnx_runtime_and_an_update_never_imports_torch(
        library, tmp_path) -> None:
    """A new library exports first and embeds on the export; later runs (an update, a watch
    batch) load no torch at all. The stored vectors are what torch fp32 gives, to the
    export's probe rule; CLIPDEX_RUNTIME=torch keeps ingestion on torch."""
    from PIL import Image

    from index.clip import ClipEmbedder

    _, _, report = library
    assert report.runtime == "onnx" and report.new == 12
    home = _copy_library(library, tmp_path)
    new = _photos(tmp_path / "more", n=5, seed=11)
    result, lines, imported = _run(["index", str(tmp_path / "more"), "--json"], home)
    assert result.returncode == 0, result.stderr
    assert imported == [], imported
    ran = json.loads("\n".join(lines))
    assert ran["new"] == 5 and ran["runtime"] == "onnx" and ran["queries"] == "ready"
    _, manifest = _manifest(home)
    limit = 0.9999 if manifest["towers"]["image"]["use"] == "fp32" else 0.999
    torch_fp32 = ClipEmbedder.load("tiny", precision="fp32", device="cpu")
    expected = torch_fp32.encode_images([Image.open(p).convert("RGB") for p in new])
    with Library.open(home) as lib:
        by_path = {path: i for i, path in lib.store.image_paths(range(1, 100)).items()}
        ids = [by_path[str(p)] for p in new]
        stored = dict(zip(*next(lib.store.iter_vectors("image", ids))))
    cosines = (np.stack([stored[i] for i in ids]) * expected).sum(1)
    assert cosines.min() >= limit - 1e-3, cosines  # the store keeps float16
    more = _photos(tmp_path / "again", n=2, seed=12)
    result, lines, imported = _run(["index", str(more[0].parent), "--json"], home,
                                   env={"CLIPDEX_RUNTIME": "torch"})
    assert result.returncode == 0 and "torch" in imported, result.stderr
    assert json.loads("\n".join(lines))["runtime"] == "torch"


def test_a_new_library_of_an_exported_model_is_indexed_without_torch(library, tmp_path) -> None:
    """The per-user cache holds the fixture's export: a second library of `tiny` claims its
    model from that manifest (the same fingerprint torch gives) and embeds on it."""
    home, _, _ = library
    _photos(tmp_path / "photos", n=4, seed=21)
    other = tmp_path / "other"
    result, lines, imported = _run(["index", str(tmp_path / "photos"), "--model", "tiny",
                                    "--json"], other)
    assert result.returncode == 0, result.stderr
    assert imported == [], imported
    assert json.loads("\n".join(lines))["runtime"] == "onnx"
    with Library.open(home) as first, Library.open(other) as second:
        for key in ("model", "dim", "preprocess"):
            assert second.store.get_meta(key) == first.store.get_meta(key), key
        assert len(Searcher(second).search("a red circle", k=2).hits) == 2
    # with nothing exported on this machine, a new library loads torch as before
    result, _, imported = _run(["index", str(tmp_path / "photos"), "--model", "tiny"],
                               tmp_path / "third", env={"XDG_CACHE_HOME": str(tmp_path / "c")})
    assert result.returncode == 0 and "torch" in imported, result.stderr


def test_a_prefetched_session_is_used_only_for_the_same_unchanged_file(library, tmp_path,
                                                                      monkeypatch) -> None:
    from PIL import Image

    from index import onnx_runtime

    home = _copy_library(library, tmp_path)
    folder, manifest = _manifest(home)
    opened: list[str] = []
    real = onnx_runtime._new_session

    def counted(path, threads):
        opened.append(Path(path).name)
        return real(path, threads)

    monkeypatch.setattr(onnx_runtime, "_new_session", counted)
    assert onnx_runtime.prefetch(home, "text")
    assert not onnx_runtime.prefetch(home, "text")  # one thread per file
    text = manifest["towers"]["text"]["files"][manifest["towers"]["text"]["use"]]["name"]
    with Library.open(home) as lib:
        embedder = lib.query_embedder()
        vector = embedder.encode_texts(["a red circle"])
    assert opened == [text]  # the prefetch thread's session, not a second one
    assert str(folder / text) not in onnx_runtime._PREFETCHED
    reference = OnnxEmbedder(folder, manifest).encode_texts(["a red circle"])
    assert np.allclose(vector, reference, atol=1e-6)
    # the file changed after the prefetch began: its session is dropped, the file reopened
    opened.clear()
    tower = manifest["towers"]["image"]
    image = folder / tower["files"][tower["use"]]["name"]
    assert onnx_runtime.prefetch(home, "image")
    onnx_runtime._PREFETCHED[str(image)][0].join()
    os.utime(image, ns=(1, 1))
    _, photos, _ = library
    OnnxEmbedder(folder, manifest).encode_images([Image.open(photos[0])])
    assert opened == [image.name, image.name]
    # a command whose query fails before it encodes leaves no prefetched session behind
    from click.testing import CliRunner

    import cli

    onnx_runtime.discard_prefetched()
    started: list[bool] = []
    real_prefetch = onnx_runtime.prefetch
    monkeypatch.setattr(onnx_runtime, "prefetch",
                        lambda *a, **k: started.append(real_prefetch(*a, **k)) or started[-1])
    failed = CliRunner().invoke(cli.main, ["--home", str(home), "search", "a red circle",
                                           "--after", "not-a-date"])
    assert failed.exit_code == 2, failed.output
    assert started == [True] and onnx_runtime._PREFETCHED == {}
    monkeypatch.setattr(onnx_runtime, "prefetch", real_prefetch)
    # two exports (or none): no guess at which one the library uses
    (home / "onnx" / "other").mkdir()
    (home / "onnx" / "other" / MANIFEST).write_text(json.dumps(manifest))
    assert not onnx_runtime.prefetch(home, "text")
    assert not onnx_runtime.prefetch(tmp_path / "nowhere", "text")


def _without_image_tower(library, tmp_path: Path) -> Path:
    """A copy of the library whose export says its image tower could not be exported."""
    home = _copy_library(library, tmp_path)
    folder, manifest = _manifest(home)
    manifest["towers"]["image"] = {"error": "its image transform cannot be reproduced "
                                            "without torch"}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return home


def test_ingestion_takes_torch_where_the_image_tower_is_not_exported(library, tmp_path) -> None:
    home = _without_image_tower(library, tmp_path)
    _photos(tmp_path / "more", n=3, seed=13)
    with Library.open(home) as lib:
        report = lib.index([tmp_path / "more"])
    assert report.new == 3 and report.failed == 0 and report.runtime == "torch"


def test_onnx_vectors_match_torch_fp32_on_new_texts_and_images(library, tmp_path) -> None:
    from index.clip import ClipEmbedder

    home, photos, _ = library
    folder, manifest = _manifest(home)
    onnx = OnnxEmbedder(folder, manifest, precision="auto")  # what queries run
    torch_fp32 = ClipEmbedder.load("tiny", precision="fp32", device="cpu")
    rng = random.Random(99)
    texts = [caption_for(sample_scene(rng), i) for i in range(40)] + [
        "", "a", "Ünïcödé straße 😀 東京", "x " * 200, "10:00 alarm clock"]
    cosines = (onnx.encode_texts(texts) * torch_fp32.encode_texts(texts)).sum(1)
    limit = 0.9999 if manifest["towers"]["text"]["use"] == "fp32" else 0.999
    assert cosines.min() >= limit, cosines.min()
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in photos] + [
        Image.new("RGB", (3, 500), "red"), Image.new("RGB", (1000, 20), "blue")]
    ours = OnnxEmbedder(folder, manifest, precision="auto").encode_images(images)
    cosines = (ours * torch_fp32.encode_images(images)).sum(1)
    limit = 0.9999 if manifest["towers"]["image"]["use"] == "fp32" else 0.999
    assert cosines.min() >= limit, cosines.min()


def test_text_image_caption_and_python_queries_never_import_torch(library) -> None:
    home, photos, _ = library
    result, lines, imported = _run(["search", "a red circle", "--top", "3"], home)
    assert result.returncode == 0, result.stderr
    assert len(lines) == 3 and imported == [], (imported, result.stderr)
    result, lines, imported = _run(["search", "--image", str(photos[0]), "2:a star",
                                    "--not", "blue", "--top", "2", "--json"], home)
    assert result.returncode == 0 and imported == [], (imported, result.stderr)
    assert len(json.loads("\n".join(lines))["hits"]) == 2
    result, lines, imported = _run(["caption", str(photos[1]), "--top", "2"], home)
    assert result.returncode == 0 and len(lines) == 2 and imported == [], result.stderr
    result, lines, imported = _run(["search", "a red circle", "--target", "captions"], home)
    assert result.returncode == 0 and lines and imported == [], result.stderr
    code = ("import sys\nfrom retrieval import Searcher\n"
            f"s = Searcher.open({str(home)!r})\n"
            "hits = s.search('a square', k=2).hits + s.search(image="
            f"{str(photos[2])!r}, k=2).hits\nprint(len(hits))\n"
            f"print(sorted(m for m in sys.modules if m in {TORCH_MODULES!r}))\n")
    result, lines, imported = _run([], home, code=code)
    assert result.returncode == 0 and lines == ["4"] and imported == [], result.stderr


def test_the_same_hits_as_the_torch_path(library) -> None:
    home, photos, _ = library
    fast, _, _ = _run(["search", "a yellow ring", "--top", "5", "--paths"], home)
    slow, _, imported = _run(["search", "a yellow ring", "--top", "5", "--paths"], home,
                             env={"CLIPDEX_RUNTIME": "torch", "CLIPDEX_PRECISION": "fp32"})
    assert "torch" in imported
    assert fast.stdout.splitlines()[:5] == slow.stdout.splitlines()[:5]


def _copy_library(library, tmp_path: Path) -> Path:
    import shutil

    home, _, _ = library
    shutil.copytree(home, tmp_path / "home")
    return tmp_path / "home"


@pytest.mark.parametrize("damage", ["truncate", "garble", "table"])
def test_a_damaged_export_falls_back_once_then_is_exported_again(library, tmp_path, damage,
                                                                 monkeypatch) -> None:
    home = _copy_library(library, tmp_path)
    folder, manifest = _manifest(home)
    text = folder / manifest["towers"]["text"]["files"][manifest["towers"]["text"]["use"]]["name"]
    if damage == "table":  # the text tower's mapped token-embedding table
        text = folder / manifest["towers"]["text"]["table"]["name"]
    if damage in ("truncate", "table"):
        os.truncate(text, text.stat().st_size // 2)
    else:  # same size, not a model
        size = text.stat().st_size
        text.unlink()  # (a hard link to the shared cache: do not write through it)
        text.write_bytes(b"\0" * size)
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # no shared copy to take
    result, lines, _ = _run(["search", "a red circle", "--top", "2"], home, env=cache)
    assert result.returncode == 0 and len(lines) == 2, result.stderr
    notices = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert len(notices) == 1 and "Traceback" not in result.stderr, result.stderr
    assert text.name in notices[0]
    assert not (folder / MANIFEST).exists()  # the next query exports again (in-process here)
    monkeypatch.setenv("XDG_CACHE_HOME", cache["XDG_CACHE_HOME"])
    searcher = Searcher.open(home)
    assert len(searcher.search("a red circle", k=2).hits) == 2
    assert isinstance(searcher.embedder, OnnxEmbedder) and searcher.embedder.runs_on_onnx("text")
    searcher.close()
    read_manifest(folder, "tiny", 128)


def test_a_missing_export_is_made_by_the_first_query(library, tmp_path) -> None:
    home = _copy_library(library, tmp_path)
    import shutil

    shutil.rmtree(home / "onnx")
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    result, lines, imported = _run(["search", "a red circle", "--top", "2"], home, env=cache)
    assert result.returncode == 0 and len(lines) == 2 and "torch" in imported
    _manifest(home)
    result, lines, imported = _run(["search", "a red circle", "--top", "2"], home, env=cache)
    assert result.returncode == 0 and imported == []
    # a second library of the same model takes the per-user cache's copy: no torch at all
    other = tmp_path / "other"
    shutil.copytree(home, other)
    shutil.rmtree(other / "onnx")
    result, lines, imported = _run(["search", "a red circle", "--top", "2"], other, env=cache)
    assert result.returncode == 0 and imported == [], result.stderr
    assert (export_folder(other, "tiny", 128) / MANIFEST).is_file()


def test_a_tower_the_export_does_not_cover_runs_on_torch_said_once(library, tmp_path) -> None:
    home = _without_image_tower(library, tmp_path)
    _, photos, _ = library
    result, lines, imported = _run(["search", "--image", str(photos[0]), "--image",
                                    str(photos[1]), "--top", "2"], home)
    assert result.returncode == 0 and len(lines) == 2 and "torch" in imported
    notices = [line for line in result.stderr.splitlines() if "use torch" in line]
    assert len(notices) == 1 and "image transform" in notices[0], result.stderr
    result, _, imported = _run(["search", "a red circle"], home)  # text: still torch-free
    assert result.returncode == 0 and imported == [] and not result.stderr.strip()
    result, _, _ = _run(["search", "--image", str(photos[0])], home,
                        env={"CLIPDEX_RUNTIME": "onnx"})
    assert result.returncode == 1 and "CLIPDEX_RUNTIME=onnx" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_export_killed_midway_leaves_nothing_a_reader_uses(library, tmp_path,
                                                              monkeypatch) -> None:
    from index import onnx_export

    home = _copy_library(library, tmp_path)
    import shutil

    shutil.rmtree(home / "onnx")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C between the two towers would

    original = onnx_export._image_plan
    monkeypatch.setattr(onnx_export, "_image_plan", killed)
    with Library.open(home) as lib, pytest.raises(KeyboardInterrupt):
        lib.prepare_queries()
    folder = export_folder(home, "tiny", 128)
    assert not (folder / MANIFEST).exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(onnx_export, "_image_plan", original)
    with Library.open(home) as lib:
        assert lib.prepare_queries().startswith("exported")
    _manifest(home)


def test_a_new_export_format_or_other_weights_export_again(library, tmp_path,
                                                           monkeypatch) -> None:
    from index import onnx_runtime

    home, _, _ = library
    before = export_folder(home, "tiny", 128)
    monkeypatch.setattr(onnx_runtime, "EXPORT_FORMAT", onnx_runtime.EXPORT_FORMAT + 1)
    assert export_folder(home, "tiny", 128) != before
    monkeypatch.undo()
    monkeypatch.setattr(onnx_runtime, "weights_stamp", lambda spec: [["w", 1, 2]])
    assert export_folder(home, "tiny", 128) != before
    monkeypatch.undo()
    _, manifest = _manifest(home)
    manifest["format"] = 0
    with pytest.raises(onnx_runtime.ExportUnusable, match="another"):
        folder = tmp_path / "f"
        folder.mkdir()
        (folder / MANIFEST).write_text(json.dumps(manifest))
        read_manifest(folder, "tiny", 128)


def test_runtime_setting_and_plugin_embedders(library, tmp_path, monkeypatch) -> None:
    from clipdex_test_embedder import NAME, StubEmbedder

    from index.clip import ClipEmbedder
    from index.errors import UsageProblem

    home, photos, _ = library
    searcher = Searcher.open(home)
    assert isinstance(searcher.embedder, OnnxEmbedder)
    searcher.close()
    monkeypatch.setenv("CLIPDEX_RUNTIME", "torch")
    searcher = Searcher.open(home)
    assert isinstance(searcher.embedder, ClipEmbedder)
    searcher.close()
    monkeypatch.setenv("CLIPDEX_RUNTIME", "gpu")
    with pytest.raises(UsageProblem, match="CLIPDEX_RUNTIME must be one of auto, onnx, torch"):
        Searcher.open(home)
    monkeypatch.delenv("CLIPDEX_RUNTIME")
    # a registered embedder is not open_clip's: queries use it as it is, nothing is exported
    with Library.open(tmp_path / "plugin") as lib:
        report = lib.index([photos[0].parent], model=NAME)
        assert report.queries == "not needed"
        assert isinstance(Searcher(lib).embedder, StubEmbedder)
    assert not (tmp_path / "plugin" / "onnx").exists()


@pytest.mark.parametrize("kept, precision, chosen", [
    (["fp32"], "auto", "fp32"), (["fp32"], "int8", "fp32"), (["fp32"], "fp32", "fp32"),
    (["int8"], "auto", "int8"), (["int8"], "int8", "int8"), (["int8"], "fp32", None),
    ([], "auto", None),
])
def test_which_file_a_tower_runs(kept, precision, chosen) -> None:
    """Only the variant `auto` runs is kept: an int8-only tower runs int8 (auto, int8) and
    torch when fp32 is asked for; a tower without files runs on torch."""
    files = {name: {"name": f"image.{name}.onnx", "size": 1} for name in kept}
    manifest = {"spec": "tiny", "dim": 128, "image_size": 64, "towers": {
        "image": {"files": files, "use": kept[0] if kept else "fp32"}, "text": {}}}
    embedder = OnnxEmbedder(Path("/nonexistent"), manifest, precision=precision)
    assert embedder.runs_on_onnx("image") is (chosen is not None)
    assert embedder._choice["image"] == chosen and not embedder.runs_on_onnx("text")


def test_random_weights_are_the_same_in_every_process() -> None:
    """`ARCH:random` is seeded whatever ran before, so an index process, a query process and
    the export agree (they did not: the default generator's state depended on history)."""
    import torch

    from index.clip import ModelSource, _seeded

    state = torch.random.get_rng_state()
    with _seeded(ModelSource("RN50", None)):
        first = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's state is kept
    torch.rand(5)  # history
    with _seeded(ModelSource("RN50", None)):
        second = torch.rand(3)
    assert torch.equal(first, second)
    with _seeded(ModelSource("RN50", "openai")):  # pretrained weights: left alone
        assert not torch.equal(torch.rand(3), first)
