"""The store on a real PostgreSQL server: the same library as on SQLite, row for row."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL

import cli
from index.synthetic.scenes import write_scenes

MODEL = TEST_MODEL  # the `test` embedder: these tests look at storage, not meaning

pytestmark = pytest.mark.usefixtures("one_model_load")


def run(home: Path, db: str | None, *args: str):
    options = ["--home", str(home)] + (["--db", db] if db else [])
    return CliRunner().invoke(cli.main, [*options, *args], catch_exceptions=False)


def test_postgres_library_equals_the_sqlite_one(tmp_path: Path, postgres_db: str) -> None:
    root = tmp_path / "photos"
    write_scenes(root, 12, seed=3, size=64)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    os.utime(root / "broken.jpg", ns=(0, 1_700_000_000_123_456_789))  # > 2**31 ns
    reports = {}
    for name, db in (("sqlite", None), ("postgres", postgres_db)):
        home = tmp_path / name
        result = run(home, db, "index", str(root), "--model", MODEL, "--json")
        assert result.exit_code == 3, result.output  # broken.jpg is recorded as failed
        reports[name] = json.loads(result.stdout)
        added = run(home, db, "captions", "add", str(root / "captions.jsonl"), "--json")
        assert added.exit_code == 0, added.output
        assert json.loads(added.stdout)["linked"] == 12
    for key in ("new", "failed", "removed"):
        assert reports["postgres"][key] == reports["sqlite"][key]
    assert reports["postgres"]["new"] == 12

    def hits(name: str, db: str | None, *query: str) -> list[tuple]:
        result = run(tmp_path / name, db, "search", *query, "--json", "--top", "5")
        assert result.exit_code == 0, result.output
        return [(h["path"], h["text"], h["score"] and round(h["score"], 5), h["meta"])
                for h in json.loads(result.stdout)["hits"]]

    for query in (["a red circle"], ["a blue square", "--target", "captions"],
                  ["a red circle", "--camera", "canon"], ["--place", "Lisbon"],
                  ["a blue square", "--after", "2021", "--sort", "date", "--type", "jpeg"],
                  ["--near", "35.68,139.65,20", "--target", "images"]):
        assert hits("postgres", postgres_db, *query) == hits("sqlite", None, *query)
    assert hits("postgres", postgres_db, "--camera", "o", "--after", "2019")  # metadata found
    rerun = run(tmp_path / "postgres", postgres_db, "index", str(root), "--json")
    report = json.loads(rerun.stdout)
    assert (report["unchanged"], report["new"], report["skipped_failed"]) == (12, 0, 1)
    failures = run(tmp_path / "postgres", postgres_db, "failures", "--json")
    assert [f["path"] for f in json.loads(failures.stdout)["failures"]] == \
        [str(root / "broken.jpg")]


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_indexing_one_folder_or_file_finds_exactly_its_rows(tmp_path: Path, store: str,
                                                           request) -> None:
    # the planner asks the database for the rows under the indexed paths (not every row):
    # siblings that share a prefix ("photos2", "photos_x", "photos%"), a name with LIKE's
    # wildcards, and one file of a folder must neither lose rows nor be planned as new
    db = request.getfixturevalue("postgres_db") if store == "postgres" else None
    home = tmp_path / "home"
    folders = [tmp_path / name for name in ("photos", "photos2", "photos_x", "photos%",
                                            "photos/sub_%")]
    for seed, folder in enumerate(folders):
        write_scenes(folder, 2, seed=seed, size=48)
    assert run(home, db, "index", *map(str, folders[:4]), "--model", MODEL).exit_code == 0
    total = json.loads(run(home, db, "stats", "--json").stdout)["images"]
    assert total == 10
    one_file = next((tmp_path / "photos").glob("scene_*"))
    for root in (tmp_path / "photos", tmp_path / "photos" / "sub_%", one_file,
                 tmp_path / "photos%"):
        result = run(home, db, "index", str(root), "--json")
        report = json.loads(result.stdout)
        expected = {tmp_path / "photos": 4, tmp_path / "photos" / "sub_%": 2, one_file: 1,
                    tmp_path / "photos%": 2}[root]
        assert (report["new"], report["removed"], report["unchanged"]) == (0, 0, expected), \
            (root, report)
    shutil.rmtree(tmp_path / "photos" / "sub_%")
    report = json.loads(run(home, db, "index", str(tmp_path / "photos"), "--json").stdout)
    assert (report["removed"], report["unchanged"]) == (2, 2)
    assert json.loads(run(home, db, "stats", "--json").stdout)["images"] == 8


def test_a_schema_3_postgres_library_is_migrated_in_place(tmp_path: Path,
                                                         postgres_db: str) -> None:
    # a schema-3 layout made from today's (float32 vectors back in the rows, no vector
    # tables); the SQLite migration is tested on a file written by the schema-3 code itself
    import numpy as np
    from sqlalchemy import create_engine, text

    from index import Library

    root, home = tmp_path / "photos", tmp_path / "home"
    write_scenes(root, 6, seed=4, size=48)
    assert run(home, postgres_db, "index", str(root), "--model", MODEL).exit_code == 0
    assert run(home, postgres_db, "captions", "add", str(root / "captions.jsonl")).exit_code == 0
    engine = create_engine(postgres_db)
    with engine.begin() as conn:
        before = {t: dict(conn.execute(text(f"SELECT id, vector FROM {t[:-1]}_vectors")).all())
                  for t in ("images", "captions")}
        for table, rows in before.items():
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN vector bytea"))
            for i, blob in rows.items():
                conn.execute(text(f"UPDATE {table} SET vector = :v WHERE id = :i"),
                             {"v": np.frombuffer(blob, "<f2").astype(np.float32).tobytes(),
                              "i": i})
            conn.execute(text(f"DROP TABLE {table[:-1]}_vectors"))
        conn.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    hits = run(home, postgres_db, "search", "a red circle", "--json")  # a reader: old layout
    assert hits.exit_code == 0 and len(json.loads(hits.stdout)["hits"]) == 6, hits.output
    notices: list[str] = []
    with Library.open(home, db=postgres_db, notice=notices.append) as lib:
        assert lib.store.get_meta("schema_version") == "4"
        assert any("moving 6 image vectors" in n for n in notices), notices
    with engine.begin() as conn:
        after = {t: dict(conn.execute(text(f"SELECT id, vector FROM {t[:-1]}_vectors")).all())
                 for t in ("images", "captions")}
        columns = {r[0] for r in conn.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'images'"))}
    engine.dispose()
    assert {t: {i: bytes(b) for i, b in rows.items()} for t, rows in after.items()} == \
        {t: {i: bytes(b) for i, b in rows.items()} for t, rows in before.items()}
    assert "vector" not in columns
    again = run(home, postgres_db, "search", "a red circle", "--json")
    assert [h["path"] for h in json.loads(again.stdout)["hits"]] == \
        [h["path"] for h in json.loads(hits.stdout)["hits"]]
