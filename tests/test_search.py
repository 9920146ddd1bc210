"""Every query direction on a generated library, through the Python API and the CLI."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from index import Library
from index.synthetic.scenes import Scene, caption_for, render, sample_scene
from retrieval import Hit, Searcher, parse_weighted

COLOURS = ("red", "blue", "yellow", "white")
SHAPES = ("circle", "square", "star", "ring")


def _gallery(directory: Path) -> dict[str, Scene]:
    """4 colours × 4 shapes × 4 scenes, half of them in a subfolder, with captions.jsonl."""
    rng = random.Random(11)
    by_path: dict[str, Scene] = {}
    lines = []
    number = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(4):
                scene = sample_scene(rng, shape=shape, colour=colour)
                sub = "sub" if number % 2 else "top"
                rel = f"{sub}/img_{number:03d}.jpg"
                (directory / sub).mkdir(parents=True, exist_ok=True)
                render(scene, 128).save(directory / rel, quality=92)
                by_path[str(directory / rel)] = scene
                lines.append(json.dumps({"path": rel, "caption": caption_for(scene, number)}))
                number += 1
    (directory / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return by_path


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("search")
    scenes = _gallery(root / "photos")
    home = root / "home"
    with Library.open(home) as lib:
        lib.index([root / "photos"], model="tiny")
        lib.add_captions(root / "photos" / "captions.jsonl")
    searcher = Searcher.open(home)
    yield searcher, scenes, root
    searcher.close()


def _attrs(hits: list[Hit], scenes: dict[str, Scene]) -> list[tuple[str, str]]:
    return [(scenes[h.path].colour, scenes[h.path].shape) for h in hits]


def test_text_to_image_finds_colour_and_shape(library) -> None:
    searcher, scenes, _ = library
    for colour, shape in (("red", "circle"), ("blue", "star"), ("yellow", "square")):
        hits = searcher.search(f"a photo of a {colour} {shape}", k=4).hits
        assert len(hits) == 4 and all(h.kind == "image" for h in hits)
        matches = sum(a == (colour, shape) for a in _attrs(list(hits), scenes))
        assert matches >= 3, (colour, shape, _attrs(list(hits), scenes))
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)


def test_image_to_image_excludes_the_query_image(library) -> None:
    searcher, scenes, _ = library
    query = next(iter(scenes))
    hits = searcher.search(image=query, k=5).hits
    assert query not in [h.path for h in hits] and len(hits) == 5
    colour, shape = scenes[query].colour, scenes[query].shape
    assert sum(a == (colour, shape) for a in _attrs(list(hits), scenes)) >= 2


def test_image_to_caption_ranks_own_caption_high(library) -> None:
    searcher, scenes, root = library
    captions = {json.loads(line)["path"]: json.loads(line)["caption"]
                for line in (root / "photos" / "captions.jsonl").open()}
    ranks = []
    for rel, text in list(captions.items())[:20]:
        hits = searcher.caption(root / "photos" / rel, k=10).hits
        texts = [h.text for h in hits]
        ranks.append(texts.index(text) if text in texts else 10)
        assert all(h.kind == "caption" for h in hits)
    assert np.mean(np.array(ranks) == 0) >= 0.5, ranks
    assert np.mean(np.array(ranks) < 5) >= 0.8, ranks


def test_caption_hits_carry_their_linked_image(library) -> None:
    searcher, _, root = library
    hits = searcher.search("a red circle", target="captions", k=3).hits
    assert all(h.text and h.image_id and h.path.startswith(str(root)) for h in hits)


def test_caption_of_an_image_outside_the_library(library, tmp_path: Path) -> None:
    searcher, _, _ = library
    outside = tmp_path / "new.png"
    render(sample_scene(random.Random(3), shape="star", colour="yellow"), 128).save(outside)
    hits = searcher.caption(outside, k=5).hits
    assert len(hits) == 5 and any("yellow" in h.text for h in hits)


def test_negative_terms_move_results(library) -> None:
    searcher, scenes, _ = library
    plain = _attrs(list(searcher.search("a circle", k=12).hits), scenes)
    steered = _attrs(list(searcher.search("a circle", negatives=["1:red"], k=12).hits), scenes)
    assert sum(c == "red" for c, _ in steered) < sum(c == "red" for c, _ in plain)


def test_weights_and_mixtures(library) -> None:
    searcher, scenes, _ = library
    assert parse_weighted("2:a beach") == (2.0, "a beach")
    assert parse_weighted("a: b") == (1.0, "a: b")
    assert parse_weighted("0.5:x") == (0.5, "x")
    query_image = next(p for p, s in scenes.items() if s.colour == "white")
    mixed = searcher.search(["3:a red square"], image=query_image, k=8).hits
    assert sum(a[0] == "red" for a in _attrs(list(mixed), scenes)) >= 4


def test_under_threshold_offset(library) -> None:
    searcher, _, root = library
    sub = root / "photos" / "sub"
    hits = searcher.search("a square", under=str(sub), k=10).hits
    assert len(hits) == 10 and all(h.path.startswith(str(sub) + "/") for h in hits)
    full = searcher.search("a square", k=10).hits
    page = searcher.search("a square", k=5, offset=5).hits
    assert [h.id for h in page] == [h.id for h in full[5:10]]
    cut = full[3].score
    kept = searcher.search("a square", k=50, threshold=cut).hits
    assert all(h.score >= cut for h in kept) and 4 <= len(kept) < 50


def test_under_a_small_folder_is_pushed_to_the_store_and_agrees(library,
                                                                  monkeypatch) -> None:
    # a folder of few images is looked up through the store's path index and restricts the
    # search up front; a big one filters the hits. Both give the same answer; a prefix of a
    # folder's name ("su") is not that folder.
    import retrieval.search as search_module

    searcher, _, root = library
    sub = root / "photos" / "sub"
    ids = searcher.library.store.image_ids_under([str(sub)], 1000)
    assert ids is not None and len(ids) == 32
    assert searcher.library.store.image_ids_under([str(sub)], 31) is None  # too many
    assert len(searcher.library.store.image_ids_under([str(root / "photos" / "su")], 99)) == 0
    answers = {}
    for name, cap in (("pushed down", 1000), ("on the hits", 0)):
        monkeypatch.setattr(search_module, "UNDER_IDS_MAX", cap)
        answers[name] = (
            [(h.id, round(h.score, 5)) for h in searcher.search("a square", under=str(sub),
                                                                  k=40).hits],
            [h.id for h in searcher.search(under=str(sub), sort="-date", k=40).hits])
    assert answers["pushed down"] == answers["on the hits"]
    assert len(answers["pushed down"][0]) == 32 and len(answers["pushed down"][1]) == 32


def test_dedup_collapses_copies(tmp_path: Path) -> None:
    photos = tmp_path / "p"
    photos.mkdir()
    rng = random.Random(5)
    drawn = [sample_scene(rng) for _ in range(12)]
    for i, scene in enumerate(drawn):
        render(scene, 96).save(photos / f"a{i}.png")
    original, copy = str(photos / "a0.png"), str(photos / "copy_of_a0.png")
    shutil.copy(original, copy)
    # the query is a0's scene drawn at another size: other bytes (a query image is excluded by
    # its content hash), nearly the same vector, so a0 and its copy are the two best hits
    query = str(tmp_path / "query.png")
    render(drawn[0], 90).save(query)
    with Library.open(tmp_path / "h") as lib:
        lib.index([photos], model="tiny")
        searcher = Searcher(lib)
        everything = searcher.search(image=query, k=3).hits
        deeper = searcher.search(image=query, k=6).hits
        deduped = searcher.search(image=query, k=3, dedup=True).hits
    pair = {original, copy}
    assert len(everything) == 3 and {h.path for h in everything[:2]} == pair
    assert [h.id for h in everything] == [h.id for h in deeper[:3]]
    # with dedup one of the two stays and the next distinct images move up into the top 3
    assert len(deduped) == 3 and deduped[0].path in pair
    assert not {h.path for h in deduped[1:]} & pair
    assert [h.id for h in deduped[1:]] == [h.id for h in deeper[2:4]]


def _cli(home: Path, *args: str):
    return CliRunner().invoke(cli.main, ["--home", str(home), *args])


def test_cli_json_matches_table_and_paths(library) -> None:
    searcher, _, _ = library
    home = searcher.library.settings.home
    as_json = _cli(home, "search", "a", "blue", "ring", "--top", "5", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert set(data) == {"query", "hits"} and len(data["hits"]) == 5
    assert set(data["hits"][0]) == {"id", "score", "kind", "path", "text", "image_id", "meta"}
    assert data["query"]["terms"][0]["value"] == "a blue ring"
    table = _cli(home, "search", "a blue ring", "--top", "5").output.splitlines()
    assert [line.split()[2] for line in table] == [h["path"] for h in data["hits"]]
    assert [float(line.split()[1]) for line in table] == \
        pytest.approx([h["score"] for h in data["hits"]], abs=1e-4)
    paths = _cli(home, "search", "a blue ring", "--top", "5", "--paths").output.splitlines()
    assert paths == [h["path"] for h in data["hits"]]


def test_cli_caption_json(library) -> None:
    searcher, scenes, _ = library
    home = searcher.library.settings.home
    result = _cli(home, "caption", next(iter(scenes)), "--json", "--top", "3")
    assert result.exit_code == 0
    hits = json.loads(result.output)["hits"]
    assert len(hits) == 3 and all(h["kind"] == "caption" and h["text"] for h in hits)


@pytest.mark.parametrize("args, code, message", [
    (["search"], 2, "empty query"),
    (["search", "   "], 2, "empty query"),
    (["search", "x", "--top", "0"], 2, "--top must be at least 1"),
    (["search", "x", "--top", "-3"], 2, "--top must be at least 1"),
    (["search", "--image", "/no/such.jpg"], 2, "query image not found"),
    (["search", "x", "--not", "1:x"], 2, "cancel out"),
    (["caption", "/no/such.jpg"], 2, "query image not found"),
])
def test_cli_errors_are_one_clear_line(library, args, code, message) -> None:
    searcher, _, _ = library
    result = _cli(searcher.library.settings.home, *args)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_unreadable_query_image(library, tmp_path: Path) -> None:
    searcher, _, _ = library
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    result = _cli(searcher.library.settings.home, "search", "--image", str(bad))
    assert result.exit_code == 2 and "cannot use" in result.output


def test_empty_library_and_empty_target(tmp_path: Path) -> None:
    result = _cli(tmp_path / "missing", "search", "a dog")  # no library there: none is made
    assert result.exit_code == 1 and "no library at" in result.output
    assert not (tmp_path / "missing").exists()
    Library.open(tmp_path / "empty").close()  # a library, with nothing in it yet
    result = _cli(tmp_path / "empty", "search", "a dog")
    assert result.exit_code == 1 and "is empty" in result.output
    photos = tmp_path / "p"
    photos.mkdir()
    render(sample_scene(random.Random(1)), 64).save(photos / "one.png")
    assert _cli(tmp_path / "h", "index", str(photos), "--model", "tiny").exit_code == 0
    result = _cli(tmp_path / "h", "search", "x", "--target", "captions")
    assert result.exit_code == 1 and "no captions" in result.output


def test_library_built_with_another_model(library) -> None:
    searcher, _, root = library
    result = _cli(searcher.library.settings.home, "index", str(root / "photos"),
                  "--model", "ViT-B-32:random")
    assert result.exit_code == 1
    assert "built with model 'tiny'" in result.output and "Traceback" not in result.output
