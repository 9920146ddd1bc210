"""A library through its public doors: where the store lives (--db, CLIPDEX_DB), refusing a
newer schema, `clipdex demo`, and exact re-scoring when an index keeps approximate codes."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
import index.vectors as vectors_module
from index import ClipdexError, Library
from index.synthetic.scenes import caption_for, generate, render, write_scenes
from retrieval import Searcher, Term
from retrieval.demo import EXAMPLE_TEXTS

COUNT = 8
LOSSY = "IDMap2,SQ4"  # 4-bit scalar codes: FAISS's scores are approximate

pytestmark = pytest.mark.usefixtures("one_model_load")


def invoke(*args: object):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("library") / "photos"
    write_scenes(folder, COUNT, seed=4, size=64)
    return folder


def photo_paths(photos: Path) -> set[str]:
    return {str(p) for p in photos.iterdir() if p.suffix in (".jpg", ".png")}


def stored_paths(db_file: Path) -> set[str]:
    """The image paths in an SQLite store, read with sqlite3 (not through clipdex)."""
    with closing(sqlite3.connect(db_file)) as connection:
        return {path for (path,) in connection.execute("SELECT path FROM images")}


# --- where the store lives ----------------------------------------------------------------------

def test_db_flag_puts_the_store_at_another_url(photos: Path, tmp_path: Path) -> None:
    home, other = tmp_path / "home", tmp_path / "other"
    other.mkdir()
    url = f"sqlite:///{other / 'lib.db'}"
    result = invoke("--home", home, "--db", url, "index", photos, "--model", "tiny", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new"] == COUNT
    assert stored_paths(other / "lib.db") == photo_paths(photos)
    assert not (home / "library.db").exists()

    stats = invoke("--home", home, "--db", url, "stats", "--json")
    assert stats.exit_code == 0, stats.output
    data = json.loads(stats.stdout)
    assert (data["images"], data["model"], data["database"]) == (COUNT, "tiny", url)
    found = invoke("--home", home, "--db", url, "search", "a red circle", "--top", "3",
                   "--json")
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)["hits"]
    assert len(hits) == 3 and {h["path"] for h in hits} <= photo_paths(photos)
    assert not (home / "library.db").exists()  # the readers used the same URL


def test_clipdex_db_environment_variable_and_the_flag_beating_it(
        photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, by_env, by_flag = tmp_path / "home", tmp_path / "env", tmp_path / "flag"
    by_env.mkdir()
    by_flag.mkdir()
    env_url = f"sqlite:///{by_env / 'lib.db'}"
    monkeypatch.setenv("CLIPDEX_DB", env_url)
    result = invoke("--home", home, "index", photos, "--model", "tiny", "--json")
    assert result.exit_code == 0, result.output
    assert stored_paths(by_env / "lib.db") == photo_paths(photos)
    assert not (home / "library.db").exists()
    data = json.loads(invoke("--home", home, "stats", "--json").stdout)
    assert (data["images"], data["database"]) == (COUNT, env_url)
    found = invoke("--home", home, "search", "a blue square", "--top", "2", "--paths")
    assert found.exit_code == 0 and len(found.output.splitlines()) == 2, found.output
    with Library.open(home) as library:  # the Python API reads the variable too
        assert library.store.url == env_url and library.stats()["images"] == COUNT

    flag_url = f"sqlite:///{by_flag / 'lib.db'}"  # a flag beats the environment
    some = sorted(photo_paths(photos))[0]
    result = invoke("--home", tmp_path / "home2", "--db", flag_url, "index", some, "--model",
                    "tiny", "--json")
    assert result.exit_code == 0, result.output
    assert stored_paths(by_flag / "lib.db") == {some}
    assert stored_paths(by_env / "lib.db") == photo_paths(photos)


# --- a library written by a newer clipdex ---------------------------------------------------------

@pytest.fixture(scope="module")
def newer_library(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("newer") / "home"
    assert invoke("--home", home, "index", photos, "--model", "tiny").exit_code == 0
    with closing(sqlite3.connect(home / "library.db")) as connection, connection:
        (version,) = connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        newer = str(int(version) + 1)
        connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (newer,))
    return home, newer


@pytest.mark.parametrize("args", [
    ["index", "PHOTOS"],
    ["index", "PHOTOS", "--json"],
    ["search", "a red circle"],
    ["search", "--image", "IMAGE", "--target", "captions", "--json"],
    ["caption", "IMAGE"],
    ["stats"],
    ["stats", "--json"],
    ["failures"],
    ["captions", "add", "CAPTIONS"],
    ["prior", "train"],
], ids=lambda args: " ".join(args))
def test_a_newer_schema_is_refused_by_every_command(newer_library, photos: Path,
                                                    args: list[str]) -> None:
    home, newer = newer_library
    named = {"PHOTOS": photos, "IMAGE": sorted(photo_paths(photos))[0],
             "CAPTIONS": photos / "captions.jsonl"}
    result = invoke("--home", home, *[named.get(a, a) for a in args])
    assert "newer clipdex" in one_line_error(result)
    with closing(sqlite3.connect(home / "library.db")) as connection:  # nothing was written
        assert connection.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                  ).fetchone() == (newer,)
        assert connection.execute("SELECT count(*) FROM captions").fetchone() == (0,)
    assert stored_paths(home / "library.db") == photo_paths(photos)


def test_a_newer_schema_is_refused_by_the_python_api(newer_library) -> None:
    home, newer = newer_library
    with pytest.raises(ClipdexError, match=f"newer clipdex \\(schema {newer}\\b"):
        Library.open(home)
    with pytest.raises(ClipdexError, match="newer clipdex"):
        Searcher.open(home)


# --- clipdex demo -------------------------------------------------------------------------------

DEMO_SECTIONS = [  # title prefix, number of hits shown
    (f'text → image: "{EXAMPLE_TEXTS["image"]}"', 5),
    ("image → image: ", 5),
    ("image → caption: ", 3),
    (f'text → caption: "{EXAMPLE_TEXTS["caption"]}"', 3),
    ('mixture: "{}" not "{}"'.format(*EXAMPLE_TEXTS["mixture"]), 5),
]


def demo_sections(output: str) -> list[tuple[str, list[str]]]:
    """(title, hit lines) for each block of ranked hits in the demo's output."""
    sections: list[tuple[str, list[str]]] = []
    for line in output.splitlines():
        if re.match(r"^  \d+\. -?\d\.\d{3}  \S", line):
            assert sections, line
            sections[-1][1].append(line)
        elif line.startswith(tuple(title for title, _ in DEMO_SECTIONS)):
            sections.append((line, []))
    return sections


def test_demo_queries_every_direction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPDEX_HOME")  # no --home: the library goes inside DIRECTORY
    directory = tmp_path / "demo"
    too_few = invoke("demo", directory, "--count", "9")
    assert too_few.exit_code == 2 and "--count" in too_few.output
    result = invoke("--quiet", "demo", directory, "--count", "10")
    assert result.exit_code == 0, result.output
    assert f"{10} new, 0 unchanged, 0 failed" in result.output
    assert "10 captions added (10 linked to their images)" in result.output
    sections = demo_sections(result.output)
    assert [(title.split(":")[0], len(hits)) for title, hits in sections] == \
        [(title.split(":")[0], n) for title, n in DEMO_SECTIONS]
    example = sections[1][0].split(": ", 1)[1]
    assert re.fullmatch(r"scene_\d{5}\.jpg", example)
    assert not any(line.endswith(f"  {example}") for line in sections[1][1])  # not itself
    for title, hits in sections:  # each list is best first
        scores = [float(line.split()[1]) for line in hits]
        assert scores == sorted(scores, reverse=True), title
    home = directory / "library"
    assert f" --home {home} stats" in result.output  # `clipdex`, or the path that runs it
    with Library.open(home) as library:
        stats = library.stats()
    assert (stats["images"], stats["captions"], stats["model"]) == (10, 10, "tiny")
    assert len(list((directory / "scenes").glob("scene_*"))) == 10

    again = invoke("--quiet", "demo", directory, "--count", "10")  # incremental: nothing new
    assert again.exit_code == 0 and "0 new, 10 unchanged, 0 failed" in again.output
    assert "0 captions added" in again.output


# --- exact re-scoring of approximate codes ------------------------------------------------------

@pytest.fixture(scope="module")
def near_copies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A library of 6 scenes plus 10 renderings of the first at other sizes: their scores to
    that scene's caption lie closer together than 4-bit codes can tell apart. Returns its home
    and that caption."""
    root = tmp_path_factory.mktemp("near-copies")
    (root / "photos").mkdir()
    drawn = generate(6, seed=4)
    for i, scene in enumerate(drawn):
        render(scene, 64).save(root / "photos" / f"scene{i}.png")
    for size in range(56, 76, 2):
        render(drawn[0], size).save(root / "photos" / f"variant{size}.png")
    with Library.open(root / "home") as library:
        library.index([root / "photos"], model="tiny")
    return root / "home", caption_for(drawn[0], 0)


def _lossy_above_zero(count: int, dim: int) -> str:
    # an empty index cannot train a quantiser: lossy codes only once there are vectors
    return LOSSY if count else "IDMap2,SQfp16"


def _assert_scores_are_exact(searcher: Searcher, text: str, k: int) -> list:
    """Every hit's score is q·v with v read from the store, and hits are best first by it."""
    vector, _ = searcher.query_vector([Term("text", text, 1.0)])
    hits = searcher.search(text, k=k).hits
    assert len(hits) == k
    stored = searcher.library.store.vectors_for("image", [h.id for h in hits])
    exact = [float(stored[h.id] @ vector) for h in hits]
    assert [h.score for h in hits] == pytest.approx(exact, abs=1e-5)
    assert exact == sorted(exact, reverse=True)
    return list(hits)


def test_lossy_index_scores_are_rescored_exactly(near_copies, monkeypatch) -> None:
    home, text = near_copies
    monkeypatch.setattr(vectors_module, "index_type_for", _lossy_above_zero)
    searcher = Searcher.open(home)
    try:
        vi = searcher.index_for("images")
        vi.rebuild(searcher.library.store)  # the type the (patched) size rule asks for
        assert vi.factory == LOSSY and not vi.exact_scores
        vector, _ = searcher.query_vector([Term("text", text, 1.0)])
        raw_scores, raw_ids = vi.search(vector[None, :], vi.size)
        stored = searcher.library.store.vectors_for("image", raw_ids[0].tolist())
        exact = {i: float(stored[i] @ vector) for i in raw_ids[0].tolist()}
        exact_order = sorted(exact, key=lambda i: -exact[i])
        # the codes really are approximate: FAISS's own scores and order are not the exact ones
        assert max(abs(s - exact[i]) for s, i in zip(raw_scores[0], raw_ids[0])) > 1e-3
        assert raw_ids[0].tolist() != exact_order
        hits = _assert_scores_are_exact(searcher, text, vi.size)
        # every image is a candidate here, so the order is the exact order over the library
        assert [h.id for h in hits] == exact_order
        _assert_scores_are_exact(searcher, "a red circle", 3)
    finally:
        searcher.close()


def test_a_saved_lossy_index_is_rescored_after_reopening(near_copies, tmp_path: Path,
                                                         monkeypatch) -> None:
    home = tmp_path / "home"
    shutil.copytree(near_copies[0], home)
    monkeypatch.setattr(vectors_module, "index_type_for", _lossy_above_zero)
    with Library.open(home) as library:
        vi = library.vector_index("image")
        vi.rebuild(library.store)
        vi.save()
    searcher = Searcher.open(home)  # the file must say what it holds: lossy codes
    try:
        reopened = searcher.index_for("images")
        assert not reopened.exact_scores, reopened.factory
        _assert_scores_are_exact(searcher, near_copies[1], reopened.size)
    finally:
        searcher.close()


def test_the_compressed_tier_answers_with_exact_scores_filtered_or_not(near_copies, tmp_path,
                                                                       monkeypatch) -> None:
    # the size rule itself (not a patched factory): thresholds lowered so 16 images get
    # IVF + 4-bit fast-scan PQ codes, re-ranked from the store
    home = tmp_path / "home"
    shutil.copytree(near_copies[0], home)
    monkeypatch.setattr(vectors_module, "FLAT_MAX_COMPONENTS", 10)
    monkeypatch.setattr(vectors_module, "COMPRESSED_MIN_BYTES", 10)
    monkeypatch.setattr(vectors_module, "PQ_MAX_CODES", 16)  # coarse: FAISS's order is off
    with Library.open(home) as library:
        vi = library.vector_index("image")
        vi.rebuild(library.store)
        vi.save()
        assert "x4fs" in vi.factory and not vi.exact_scores
    searcher = Searcher.open(home)
    try:
        reopened = searcher.index_for("images")
        assert reopened.factory.endswith("x4fs") and reopened.size == 16
        raw_scores, raw_ids = reopened.search(
            searcher.query_vector([Term("text", near_copies[1], 1.0)])[0][None, :], 16)
        hits = _assert_scores_are_exact(searcher, near_copies[1], 16)
        assert [h.id for h in hits] != raw_ids[0].tolist()  # the codes alone: another order
        _assert_scores_are_exact(searcher, "a red circle", 3)
        # the one-shot CLI memory-maps the file: the same hits, the same exact scores
        result = CliRunner().invoke(cli.main, ["--home", str(home), "search", near_copies[1],
                                               "--top", "16", "--json"])
        assert result.exit_code == 0, result.output
        cli_hits = json.loads(result.stdout)["hits"]
        assert [h["id"] for h in cli_hits] == [h.id for h in hits]
        assert [h["score"] for h in cli_hits] == pytest.approx([h.score for h in hits],
                                                               abs=1e-5)
    finally:
        searcher.close()


def test_a_writer_drops_the_redundant_path_index_and_a_reader_leaves_it(
        photos: Path, tmp_path: Path) -> None:
    # libraries written before 2026-12-02 indexed `images.path` twice (its UNIQUE constraint
    # and ix_images_path_prefix); a writer's open drops the second, a reader writes nothing
    home = tmp_path / "home"
    with Library.open(home) as library:
        library.index([photos], model="tiny")
    db = home / "library.db"

    def indexes() -> set[str]:
        with closing(sqlite3.connect(db)) as conn:
            return {name for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'images'")}

    assert "ix_images_path_prefix" not in indexes()
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE INDEX ix_images_path_prefix ON images (path)")  # as before
    with Library.open(home, create=False) as reader:
        assert reader.store.count("image") == COUNT
    assert "ix_images_path_prefix" in indexes()
    with Library.open(home) as writer:
        report = writer.index([photos])
        assert (report.unchanged, report.new) == (COUNT, 0)
    assert "ix_images_path_prefix" not in indexes()
    assert any(name.startswith("sqlite_autoindex_images") for name in indexes())  # UNIQUE


def test_float16_codes_are_rescored_to_the_exact_scores(near_copies) -> None:
    """The default index keeps the store's float16 values unscaled: FAISS's own scores are
    off in the fifth or sixth decimal, the hits' scores are q·v over the store's vectors."""
    home, text = near_copies
    searcher = Searcher.open(home)
    try:
        vi = searcher.index_for("images")
        assert vi.factory == "IDMap2,SQfp16" and vi.exact and not vi.exact_scores
        vector, _ = searcher.query_vector([Term("text", text, 1.0)])
        raw_scores, raw_ids = vi.search(vector[None, :], vi.size)
        stored = searcher.library.store.vectors_for("image", raw_ids[0].tolist())
        exact = {i: float(stored[i] @ vector) for i in raw_ids[0].tolist()}
        errors = [abs(s - exact[i]) for s, i in zip(raw_scores[0], raw_ids[0])]
        assert 1e-7 < max(errors) < 1e-3  # approximate, and only just
        hits = searcher.search(text, k=vi.size).hits
        assert [h.score for h in hits] == pytest.approx([exact[h.id] for h in hits], abs=1e-6)
        assert [h.id for h in hits] == sorted(exact, key=lambda i: -exact[i])
        # what the index gives back is the store's vector, bit for bit
        ids = np.array(sorted(exact), np.int64)
        assert np.array_equal(vi.vectors(ids), np.stack([stored[int(i)] for i in ids]))
    finally:
        searcher.close()
