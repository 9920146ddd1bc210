"""Near-duplicate groups on generated scenes plus transformed copies (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from index import Library
from index.synthetic.scenes import write_scenes
from retrieval import Searcher
from retrieval.duplicates import find_duplicates, group_pairs

COPIED = ("scene_00000.jpg", "scene_00004.jpg", "scene_00002.png", "scene_00009.jpg")


def _copies(photos: Path, name: str) -> list[Path]:
    """Resized to 50%, recompressed at quality 40, cropped 10%, EXIF stripped."""
    im = Image.open(photos / name).convert("RGB")
    w, h = im.size
    stem = Path(name).stem
    out = {
        f"half_{stem}.jpg": (im.resize((w // 2, h // 2)), {"quality": 90}),
        f"q40_{stem}.jpg": (im, {"quality": 40}),
        f"crop_{stem}.jpg": (im.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
                             {"quality": 90}),
        f"noexif_{stem}.jpg": (im, {"quality": 95}),
    }
    copies = photos / "copies"
    copies.mkdir(exist_ok=True)
    for file_name, (image, options) in out.items():
        image.save(copies / file_name, **options)
    return [copies / n for n in out]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dups")
    photos = root / "photos"
    write_scenes(photos, 30, seed=9)
    made = {name: _copies(photos, name) for name in COPIED}
    with Library.open(root / "home") as lib:
        lib.index([photos], model="tiny")
    searcher = Searcher.open(root / "home")
    yield searcher, photos, made
    searcher.close()


def test_every_copy_is_grouped_with_its_original_best_first(library) -> None:
    searcher, photos, made = library
    groups = find_duplicates(searcher)
    by_path = {c.path: g for g in groups for c in g.copies}
    for name, copies in made.items():
        group = by_path.get(str(photos / name))
        assert group is not None, name
        members = {c.path for c in group.copies}
        assert {str(p) for p in copies} <= members, (name, members)
        # the original has the most pixels (with the q40 and EXIF-free copies: the same,
        # then the earliest capture time: the copies are dated by their mtime, today)
        assert group.best.path == str(photos / name), group.best
        assert group.best.cosine == pytest.approx(1.0)
        assert all(0.96 < c.cosine <= 1.0 + 1e-6 for c in group.copies)
        assert [c.width * c.height for c in group.copies] == \
            sorted((c.width * c.height for c in group.copies), reverse=True)


def test_a_stricter_threshold_finds_fewer_pairs(library) -> None:
    searcher, _, _ = library
    loose = sum(len(g.copies) for g in find_duplicates(searcher, threshold=0.9))
    strict = sum(len(g.copies) for g in find_duplicates(searcher, threshold=0.999))
    assert strict < loose


def test_group_pairs_is_union_find() -> None:
    pairs = np.array([[1, 2], [2, 3], [7, 9], [4, 5], [5, 3]])
    assert sorted(group_pairs(pairs)) == [[1, 2, 3, 4, 5], [7, 9]]
    assert group_pairs(np.empty((0, 2), np.int64)) == []


def run(home: Path, *args: str):
    return CliRunner().invoke(cli.main, ["--home", str(home), *args])


def test_cli_paths_json_and_print0(library) -> None:
    searcher, photos, made = library
    home = searcher.library.settings.home
    table = run(home, "duplicates")
    assert table.exit_code == 0, table.output
    assert "group 1:" in table.output and "best" in table.output
    paths = run(home, "duplicates", "--paths").stdout.splitlines()
    originals = {str(photos / n) for n in made}
    assert paths and not originals & set(paths)  # the best copy of each group stays out
    assert {str(p) for copies in made.values() for p in copies} <= set(paths)
    nul = run(home, "duplicates", "--print0").stdout_bytes
    assert nul.endswith(b"\0") and nul.split(b"\0")[:-1] == [p.encode() for p in paths]
    data = json.loads(run(home, "duplicates", "--json").stdout)
    assert data["threshold"] == 0.96
    assert {g["best"]["path"] for g in data["groups"]} >= originals
    under = run(home, "duplicates", "--under", str(photos / "copies"), "--json")
    groups = json.loads(under.stdout)["groups"]
    assert groups and all(c["path"].startswith(str(photos / "copies"))
                          for g in groups for c in [g["best"], *g["others"]])


@pytest.mark.parametrize("args", [["--threshold", "0"], ["--threshold", "1.5"],
                                  ["--json", "--paths"], ["--under", "/nonexistent/x"]])
def test_cli_bad_arguments_exit_2(library, args: list[str]) -> None:
    searcher, _, _ = library
    result = run(searcher.library.settings.home, "duplicates", *args)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output


def test_no_library_is_a_clear_error(tmp_path: Path) -> None:
    result = run(tmp_path / "none", "duplicates")
    assert result.exit_code == 1 and "no library" in result.output


def test_http_duplicates(library) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrieval.server import create_app

    searcher, photos, made = library
    client = TestClient(create_app(searcher), base_url="http://127.0.0.1")
    answer = client.get("/api/duplicates")
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["threshold"] == 0.96
    assert {g["best"]["path"] for g in data["groups"]} >= {str(photos / n) for n in made}
    assert client.get("/api/duplicates", params={"threshold": 0}).status_code == 422
    missing = client.get("/api/duplicates", params={"under": "/nonexistent/x"})
    assert missing.status_code == 400 and "no such folder" in missing.json()["error"]



def test_on_compressed_codes_the_groups_are_those_of_exact_search(library, monkeypatch) -> None:
    # the largest libraries keep 4-bit PQ codes, whose scores are approximate: pairs are
    # searched below the threshold and checked on the stored vectors
    import faiss

    from index import vectors

    shared, _, _ = library
    thresholds = (0.9, 0.96, 0.99)

    def groups(searcher: Searcher, threshold: float) -> list:
        return sorted(sorted(c.id for c in g.copies)
                      for g in find_duplicates(searcher, threshold=threshold))

    exact = {t: groups(shared, t) for t in thresholds}
    assert exact[0.96]  # the planted copies
    monkeypatch.setattr(vectors, "FLAT_MAX_COMPONENTS", 10)
    monkeypatch.setattr(vectors, "COMPRESSED_MIN_BYTES", 10)
    monkeypatch.setattr(vectors, "PQ_MAX_CODES", 32)  # coarse: without the check, groups differ
    searcher = Searcher.open(shared.library.settings.home)  # its own index, rebuilt below
    try:
        vi = searcher.index_for("images")
        vi.rebuild(searcher.library.store)
        assert not vi.exact_scores and "x4fs" in vi.factory, vi.factory
        nlist = faiss.extract_index_ivf(vi.index).nlist
        monkeypatch.setattr("retrieval.duplicates.DUPLICATE_NPROBE", nlist)  # every list
        for threshold in thresholds:
            assert groups(searcher, threshold) == exact[threshold], threshold
    finally:
        searcher.close()
