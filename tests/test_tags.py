"""Zero-shot tags on generated scenes with the tiny model: accuracy, storage, filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from index import Library
from index.errors import UsageProblem
from index.synthetic.scenes import COLOURS, SHAPES, generate, write_scenes
from index.tags import builtin_vocabulary, read_labels
from retrieval import Searcher

SCENES, SEED = 120, 4


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tags")
    photos = root / "photos"
    write_scenes(photos, SCENES, seed=SEED, size=96)
    with Library.open(root / "home") as lib:
        lib.index([photos], model="tiny")
        report = lib.tag()
    searcher = Searcher.open(root / "home")
    scenes = generate(SCENES, seed=SEED)
    yield searcher, photos, report, lambda path: scenes[int(Path(path).stem.split("_")[1])]
    searcher.close()


def _best(tags: list[dict], group: str) -> str:
    return next(t["label"] for t in tags if t["group"] == group)


def test_top_tags_match_the_scenes(library) -> None:
    searcher, _, report, scene_of = library
    assert report["images"] == SCENES and report["source"] == "builtin:scenes"
    hits = searcher.search(sort="date", k=SCENES).hits
    assert len(hits) == SCENES
    shape = sum(_best(h.meta["tags"], "shape") == scene_of(h.path).shape for h in hits)
    colour = sum(_best(h.meta["tags"], "colour") == scene_of(h.path).colour for h in hits)
    assert shape / SCENES >= 0.9 and colour / SCENES >= 0.9, (shape, colour)
    for hit in hits:  # scores are a softmax within each group, the best first
        for group in ("shape", "colour"):
            scores = [t["score"] for t in hit.meta["tags"] if t["group"] == group]
            assert scores and scores[0] == max(scores) and sum(scores) <= 1.0 + 1e-6


def test_tag_filter_equals_the_stored_tags(library) -> None:
    searcher, _, _, _ = library
    store = searcher.library.store
    tagged = store.image_tags(store.ids("image").tolist())
    expected = sorted(i for i, tags in tagged.items()
                      if any(label == "circle" for _, label, _ in tags)
                      and any(label == "red" for _, label, _ in tags))
    assert expected
    found = searcher.search(tags=["Circle", "red"], k=SCENES).hits
    assert sorted(h.id for h in found) == expected
    queried = searcher.search("a large shape", tags=["circle"], k=5).hits
    assert queried and all(any(t["label"] == "circle" for t in h.meta["tags"]) for h in queried)


def test_an_unknown_tag_names_the_known_ones(library) -> None:
    searcher, _, _, _ = library
    with pytest.raises(UsageProblem, match="no image is tagged 'unicorn'; tags here: "):
        searcher.search("x", tags=["unicorn"])


def test_new_images_are_tagged_at_index_time(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 6, seed=1, size=64)
    with Library.open(tmp_path / "home") as lib:
        first = lib.index([photos], model="tiny")
        assert first.tagged == 0  # no tags until asked for
        lib.tag()
        write_scenes(tmp_path / "more", 3, seed=2, size=64)
        for p in (tmp_path / "more").glob("scene_*"):
            p.rename(photos / f"more_{p.name}")
        second = lib.index([photos])
        assert (second.new, second.tagged) == (3, 3)
        assert lib.store.untagged_image_ids() == []


def test_label_files(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("# animals\ndog\ncat\n\n[place]\nbeach\nmountain  # a comment\nBeach\n")
    vocabulary = read_labels(labels)
    assert vocabulary.groups == {"tag": ("dog", "cat"), "place": ("beach", "mountain")}
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(UsageProblem, match="lists no labels"):
        read_labels(tmp_path / "empty.txt")
    (tmp_path / "one.txt").write_text("dog\n[x]\ncat\nbird\n")
    with pytest.raises(UsageProblem, match="group 'tag' has one label"):
        read_labels(tmp_path / "one.txt")
    with pytest.raises(UsageProblem, match="cannot read"):
        read_labels(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UsageProblem, match="cannot read"):
        read_labels(tmp_path / "bad.txt")
    assert builtin_vocabulary("tiny").groups == {"shape": SHAPES, "colour": tuple(COLOURS)}
    assert builtin_vocabulary("ViT-B-32:laion2b_s34b_b79k").source == "builtin:general"


def run(home: Path, *args: str):
    return CliRunner().invoke(cli.main, ["--home", str(home), *args])


def test_cli_tag_with_labels_stats_and_search(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos, 12, seed=3, size=64)
    home = tmp_path / "home"
    assert run(home, "index", str(photos), "--model", "tiny").exit_code == 0
    labels = tmp_path / "labels.txt"
    labels.write_text("[shape]\ncircle\nsquare\nstar\n")
    result = run(home, "tag", "--labels", str(labels), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 12 and set(report["tags"]) <= {"circle", "square", "star"}
    assert sum(report["tags"].values()) >= 12  # every image has its best label at least
    label = next(iter(report["tags"]))
    found = run(home, "search", "--tag", label, "--json")
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)["hits"]
    assert len(hits) == min(10, report["tags"][label])
    assert all(any(t["label"] == label for t in h["meta"]["tags"]) for h in hits)
    assert "tags:     " in run(home, "stats").output
    assert run(home, "search", "--tag", "unicorn").exit_code == 2
    assert run(home, "tag", "--labels", str(tmp_path / "missing.txt")).exit_code == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    bad = run(home, "tag", "--labels", str(empty))
    assert bad.exit_code == 2 and "lists no labels" in bad.output
