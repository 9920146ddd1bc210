"""A file reached both through a symlink and without one is indexed under its real path, so
`--under` and `--exclude` name the folder it is really in; a symlink to a folder outside the
tree still brings that folder in, under the link's name. Also: `--under` must name a folder,
`--json` and `--paths` do not mix, and the table's score column keeps its width."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL
from sqlalchemy import select

import cli
from index import Library
from index.errors import UsageProblem
from index.scan import scan
from index.store import ImageRow
from index.synthetic.scenes import write_scenes
from retrieval import Hit, Query, Searcher, SearchResult, Term

# the `test` embedder: these tests look at stored paths and filters, never at what a query means


def tree(tmp_path: Path) -> Path:
    """photos/real (3 images), photos/link → real (sorts first), photos/link2 → elsewhere (2)."""
    photos = tmp_path / "photos"
    write_scenes(photos / "real", 3, size=64)
    write_scenes(tmp_path / "elsewhere", 2, seed=3, size=64)
    (photos / "link").symlink_to(photos / "real", target_is_directory=True)
    (photos / "link2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    return photos


def index(home: Path, *paths: Path, **options):
    with Library.open(home) as library:
        return library.index(list(paths), model=TEST_MODEL, **options)


def stored(home: Path) -> list[str]:
    with Library.open(home) as library, library.store.session() as s:
        return sorted(s.scalars(select(ImageRow.path)))


def below(paths: list[str], folder: Path) -> list[str]:
    return [p for p in paths if p.startswith(str(folder) + os.sep)]


def cli_run(home: Path, *args: str):
    return CliRunner().invoke(cli.main, ["--home", str(home), *args])


def search_paths(home: Path, *args: str) -> list[str]:
    result = cli_run(home, "search", "a photo", "--top", "50", "--paths", *args)
    assert result.exit_code == 0, result.output
    return sorted(result.stdout.splitlines())


def unchanged_rerun(home: Path, *paths: Path, **options) -> None:
    again = index(home, *paths, **options)
    assert (again.new, again.changed, again.moved, again.removed, again.failed) == (0,) * 5
    assert again.unchanged == len(stored(home))


# --- which path a file is stored under ------------------------------------------------------

def test_files_reached_twice_are_stored_under_the_real_folder(tmp_path: Path) -> None:
    photos = tree(tmp_path)
    home = tmp_path / "home"
    report = index(home, photos)
    assert (report.new, report.failed) == (5, 0)
    paths = stored(home)
    assert len(below(paths, photos / "real")) == 3
    assert len(below(paths, photos / "link2")) == 2  # only reachable through the link
    assert not below(paths, photos / "link")
    assert len(paths) == 5
    unchanged_rerun(home, photos)
    assert stored(home) == paths


def test_a_link_met_deeper_or_earlier_still_loses_to_the_real_path(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_scenes(photos / "zzz" / "real", 2, size=64)
    (photos / "aaa").mkdir()
    (photos / "aaa" / "deep").symlink_to(photos / "zzz" / "real", target_is_directory=True)
    (photos / "a_first.jpg").symlink_to(photos / "zzz" / "real" / "scene_00000.jpg")
    (photos / "zzz" / "real" / "up").symlink_to("../..", target_is_directory=True)  # a loop
    home = tmp_path / "home"
    assert index(home, photos).new == 2
    assert stored(home) == sorted(str(p) for p in (photos / "zzz" / "real").glob("*.jpg"))
    unchanged_rerun(home, photos)


def test_a_library_indexed_under_the_link_moves_to_the_real_path(tmp_path: Path) -> None:
    """What an older clipdex stored under the link name keeps its rows and vectors."""
    photos = tree(tmp_path)
    home = tmp_path / "home"
    index(home, photos / "link")  # as the old scan stored them: under the link's name
    assert len(below(stored(home), photos / "link")) == 3
    report = index(home, photos)
    assert (report.new, report.moved, report.removed) == (2, 3, 0)
    assert len(below(stored(home), photos / "real")) == 3
    unchanged_rerun(home, photos)


def test_scan_yields_real_paths_first_then_links_in_the_order_met(tmp_path: Path) -> None:
    photos = tree(tmp_path)
    found = [Path(f.path).relative_to(photos).parts[0] for f in scan([photos])]
    assert found == ["real"] * 3 + ["link2"] * 2


# --- --exclude ------------------------------------------------------------------------------

def test_excluding_the_real_folder_excludes_it_through_the_link_too(tmp_path: Path) -> None:
    photos = tree(tmp_path)
    home = tmp_path / "home"
    report = index(home, photos, exclude=["real"])
    assert report.new == 2
    assert stored(home) == below(stored(home), photos / "link2")
    unchanged_rerun(home, photos, exclude=["real"])


def test_excluding_a_link_excludes_that_way_in_not_its_target(tmp_path: Path) -> None:
    photos = tree(tmp_path)
    assert len(below(stored_after(tmp_path, "a", photos, ["link"]), photos / "real")) == 3
    only_real = stored_after(tmp_path, "b", photos, ["link2"])
    assert only_real == below(only_real, photos / "real") and len(only_real) == 3


def test_a_file_excluded_by_name_stays_excluded_through_a_file_link(tmp_path: Path) -> None:
    photos = tree(tmp_path)
    (photos / "a_copy.jpg").symlink_to(photos / "real" / "scene_00000.jpg")
    paths = stored_after(tmp_path, "a", photos, ["real/scene_00000.jpg"])
    assert not [p for p in paths if p.endswith(("real/scene_00000.jpg", "a_copy.jpg"))]
    assert len(paths) == 4  # the other two of real/ and the two of link2/


def stored_after(tmp_path: Path, name: str, photos: Path, exclude: list[str]) -> list[str]:
    home = tmp_path / f"home-{name}"
    index(home, photos, exclude=exclude)
    return stored(home)


def test_cli_exclude_real(tmp_path: Path) -> None:
    photos = tree(tmp_path)
    home = tmp_path / "home"
    result = cli_run(home, "index", str(photos), "--model", TEST_MODEL, "--exclude", "real",
                     "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new"] == 2
    assert search_paths(home) == below(stored(home), photos / "link2")


# --- --under --------------------------------------------------------------------------------

@pytest.fixture
def indexed(tmp_path: Path) -> tuple[Path, Path]:
    photos = tree(tmp_path)
    index(tmp_path / "home", photos)
    return tmp_path / "home", photos


def test_under_the_real_folder_finds_what_the_link_also_reaches(indexed) -> None:
    home, photos = indexed
    real = below(stored(home), photos / "real")
    assert len(real) == 3
    assert search_paths(home, "--under", str(photos / "real")) == real
    assert search_paths(home, "--under", str(photos / "link")) == real  # resolved as well
    assert len(search_paths(home, "--under", str(photos / "link2"))) == 2
    assert len(search_paths(home, "--under", str(photos))) == 5


def test_under_in_the_python_api(indexed) -> None:
    home, photos = indexed
    searcher = Searcher.open(home)
    try:
        hits = searcher.search("a photo", under=photos / "link", k=50).hits
        assert sorted(h.path for h in hits) == below(stored(home), photos / "real")
        with pytest.raises(UsageProblem, match="--under: no such folder: /nonexistent"):
            searcher.search("a photo", under="/nonexistent")
        with pytest.raises(UsageProblem, match="--under: not a folder: "):
            searcher.search("a photo", under=photos / "real" / "scene_00000.jpg")
    finally:
        searcher.close()


def test_under_a_missing_folder_is_a_usage_error(indexed) -> None:
    home, _ = indexed
    result = cli_run(home, "search", "a photo", "--under", "/nonexistent")
    assert result.exit_code == 2, result.output
    assert "--under: no such folder: /nonexistent" in result.output
    assert "no results" not in result.output and "Traceback" not in result.output


# --- output ---------------------------------------------------------------------------------

def test_json_and_paths_together_are_a_usage_error(indexed) -> None:
    home, _ = indexed
    result = cli_run(home, "search", "a photo", "--json", "--paths")
    assert result.exit_code == 2, result.output
    assert "--json and --paths cannot be used together" in result.output
    assert not result.stdout.startswith("{")


def test_the_score_column_keeps_its_width_for_negative_scores(capsys) -> None:
    scores = [1.0, 0.25, -0.0312, -1.0, 0.0]
    hits = tuple(Hit(i, s, "image", f"/p/img{i}.jpg", None, i) for i, s in enumerate(scores))
    cli._print_hits(SearchResult(Query((Term.text("x"),)), hits), as_json=False,
                    paths_only=False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert len({line.index("/p/") for line in lines}) == 1, lines  # paths start in one column
    assert [float(line.split()[1]) for line in lines] == scores
    captions = tuple(Hit(i, s, "caption", None, f"caption {i}", None)
                     for i, s in enumerate(scores))
    cli._print_hits(SearchResult(Query((Term.text("x"),)), captions), as_json=False,
                    paths_only=False)
    lines = capsys.readouterr().out.splitlines()
    assert len({line.index("caption") for line in lines}) == 1, lines


def test_the_score_column_lines_up_in_a_real_search(indexed) -> None:
    home, _ = indexed
    result = cli_run(home, "search", "a photo", "--top", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    scores = [float(line.split()[1]) for line in lines]
    assert max(scores) > 0 > min(scores), scores  # the test embedder's scores have both signs
    assert len(lines) == 5 and len({line.index(os.sep) for line in lines}) == 1, lines
