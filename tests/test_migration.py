"""A library written before schema 4 (float32 vectors inside the image and caption rows) is
migrated in place by a writer's open, read as it is by readers, and survives an interrupted
migration.

tests/data/library-schema3.db was written by clipdex at commit a505edd (schema 3): 10 scenes
(`clipdex scenes DIR --count 10 --seed 5`) indexed with `--model tiny`, then their captions
added. It is the real file, not one made by downgrading today's.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from index import Library, store
from index.store import SCHEMA_VERSION, SQLITE_PAGE_SIZE

FIXTURE = Path(__file__).parent / "data" / "library-schema3.db"


@pytest.fixture()
def old_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(FIXTURE, home / "library.db")
    return home


def _raw(db: Path, table: str) -> dict[int, np.ndarray]:
    """id -> float32 vector as the schema-3 row holds it."""
    with closing(sqlite3.connect(db)) as connection:
        rows = connection.execute(f"SELECT id, vector FROM {table} ORDER BY id").fetchall()
    return {i: np.frombuffer(blob, np.float32) for i, blob in rows}


def _columns(db: Path, table: str) -> set[str]:
    with closing(sqlite3.connect(db)) as connection:
        return {r[1] for r in connection.execute(f"PRAGMA table_info({table})")}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_fixture_is_a_schema_3_library() -> None:
    assert "vector" in _columns(FIXTURE, "images") and "vector" in _columns(FIXTURE, "captions")
    assert len(_raw(FIXTURE, "images")) == 10 and len(_raw(FIXTURE, "captions")) == 10
    with closing(sqlite3.connect(FIXTURE)) as connection:
        assert connection.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                  ).fetchone() == ("3",)


def test_a_reader_reads_the_old_library_and_writes_nothing(old_home: Path) -> None:
    db = old_home / "library.db"
    before = _digest(db)
    images = _raw(db, "images")
    with Library.open(old_home, create=False) as lib:
        got = {i: v for ids, vs in lib.store.iter_vectors("image") for i, v in zip(ids, vs)}
        pairs = lib.store.caption_pairs()
    assert got.keys() == images.keys()
    for i, v in images.items():
        np.testing.assert_array_equal(got[i], v)  # the float32 column, read as it is
    assert len(pairs.caption_ids) == 10 and pairs.text_vectors.shape[1] == len(v)
    assert _digest(db) == before
    assert sorted(p.name for p in old_home.iterdir()) == ["library.db"]  # no WAL left behind


def test_a_writer_migrates_vectors_to_float16_in_place(old_home: Path) -> None:
    db = old_home / "library.db"
    images, captions = _raw(db, "images"), _raw(db, "captions")
    notices: list[str] = []
    with Library.open(old_home, notice=notices.append) as lib:
        assert lib.store.get_meta("schema_version") == str(SCHEMA_VERSION)
        got = {i: v for ids, vs in lib.store.iter_vectors("image") for i, v in zip(ids, vs)}
        got_captions = lib.store.vectors_for("caption", captions)
        index = lib.vector_index("image")
        query = images[min(images)]
        _, found = index.search(query[None, :], 3)
        pairs = lib.store.caption_pairs()
    assert any("moving 10 image vectors to float16" in n for n in notices), notices
    assert any("compacting" in n for n in notices), notices
    assert "vector" not in _columns(db, "images") and "vector" not in _columns(db, "captions")
    assert got.keys() == images.keys() and got_captions.keys() == captions.keys()
    for old, new in [(images[i], got[i]) for i in images] + \
            [(captions[i], got_captions[i]) for i in captions]:
        cosine = float(old @ new) / float(np.linalg.norm(old) * np.linalg.norm(new))
        assert cosine >= 0.99999, cosine
    assert found[0][0] == min(images)  # an image is its own nearest neighbour
    assert len(pairs.caption_ids) == 10
    with closing(sqlite3.connect(db)) as connection:
        assert connection.execute("PRAGMA page_size").fetchone()[0] == SQLITE_PAGE_SIZE
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        blob = connection.execute("SELECT vector FROM image_vectors LIMIT 1").fetchone()[0]
    assert len(blob) == 2 * len(query)  # float16
    notices.clear()
    with Library.open(old_home, notice=notices.append):
        pass
    assert notices == []  # once only


def test_an_interrupted_migration_leaves_the_old_library_and_the_next_open_finishes(
        old_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = old_home / "library.db"
    images = _raw(db, "images")
    monkeypatch.setattr(store, "MIGRATE_CHUNK", 3)
    real, calls = store.vector_blob, []

    def failing(vector):
        calls.append(1)
        if len(calls) > 5:  # in the second chunk of images
            raise OSError("disk full (simulated)")
        return real(vector)

    monkeypatch.setattr(store, "vector_blob", failing)
    with pytest.raises(OSError, match="simulated"):
        Library.open(old_home, notice=lambda _: None)
    assert "vector" in _columns(db, "images")  # rolled back: the old layout, whole
    assert _raw(db, "images").keys() == images.keys()
    with closing(sqlite3.connect(db)) as connection:
        assert connection.execute("SELECT count(*) FROM image_vectors").fetchone() == (0,)
        assert connection.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                  ).fetchone() == ("3",)
    with Library.open(old_home, create=False) as lib:  # still readable meanwhile
        assert lib.store.count("image") == 10 and len(lib.store.ids("image")) == 10
        assert sum(len(ids) for ids, _ in lib.store.iter_vectors("image")) == 10

    monkeypatch.setattr(store, "vector_blob", real)
    with Library.open(old_home, notice=lambda _: None) as lib:
        assert lib.store.vectors_for("image", images).keys() == images.keys()
    assert "vector" not in _columns(db, "images")


def test_a_reader_open_while_a_writer_migrates_switches_to_the_new_tables(
        old_home: Path) -> None:
    images = _raw(old_home / "library.db", "images")
    with Library.open(old_home, create=False) as reader:
        assert len(reader.store.vectors_for("image", images)) == 10  # the old column
        with Library.open(old_home, notice=lambda _: None):
            pass
        moved = reader.store.vectors_for("image", images)  # the same reader, new tables
    assert moved.keys() == images.keys()
    assert max(float(np.abs(moved[i] - images[i]).max()) for i in images) < 1e-3
