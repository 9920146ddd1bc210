"""Crash safety as a test: `clipdex index` is SIGKILLed at chosen points, then rerun.

The kill points come from the test hook in index/ingest.py (`CLIPDEX_TEST_KILL_AT`): "scan"
(per file found), "embed" (per batch, before the model), "commit" (inside a batch's open
transaction) and "save" (between a FAISS temp file and its rename). After each kill the store
must open, hold no half-written batch, and a rerun must reach exactly the library an
uninterrupted run builds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from clipdex_test_embedder import NAME as TEST_MODEL
from clipdex_test_embedder import SUBPROCESS_ENV
from sqlalchemy import select
from test_ingest import stored_bits

from index import Library, faults
from index.ingest import BATCH_SIZE
from index.store import ImageRow, ImageVectorRow
from index.synthetic.scenes import generate, render, write_scenes
from retrieval import Searcher

REPO = Path(__file__).resolve().parents[1]
COUNT = 150  # two full batches of 64 and one of 22
QUERIES = ("a red circle", "two blue squares on a striped background", "a small yellow star")
# kill point -> image rows the store must hold right after the kill
KILLS = {
    "scan:100": 0,
    "embed:2": BATCH_SIZE,  # the first batch is committed, the second never reaches the model
    "commit:2": BATCH_SIZE,  # the second batch's transaction dies open: rolled back
    "save": COUNT,  # every batch is committed; the index file is not
}


pytestmark = pytest.mark.usefixtures("one_model_load")


def clipdex(*args: str, kill_at: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLIPDEX_HOME", "CLIPDEX_DB", "CLIPDEX_MODEL")}
    env.update(CLIPDEX_TEST_KILL_AT=kill_at, HF_HUB_OFFLINE="1", **SUBPROCESS_ENV)
    return subprocess.Popen([sys.executable, "-m", "cli", "--quiet", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def index(home: Path, root: Path, model: str):
    with Library.open(home) as library:
        return library.index([root], model=model)


def top_hits(home: Path) -> list[list[tuple[int, str]]]:
    searcher = Searcher(Library.open(home))
    try:
        return [[(h.id, h.path) for h in searcher.search(q, k=10).hits] for q in QUERIES]
    finally:
        searcher.close()


def image_rows(home: Path, db: str | None = None) -> list:
    with Library.open(home, db=db) as library, library.store.session() as s:
        return s.execute(select(ImageRow.id, ImageRow.path, ImageVectorRow.vector)
                         .join(ImageVectorRow, ImageVectorRow.id == ImageRow.id)).all()


def assert_consistent(home: Path, db: str | None = None) -> dict[str, int]:
    """Store and FAISS agree: every row has a whole vector, one index file per kind at the
    store's generation (stale temps gone) holding exactly the store's ids and vectors.
    Returns the generations (tests/test_postgres.py runs it on PostgreSQL too)."""
    with Library.open(home, db=db) as library:
        dim = library.store.model_fingerprint()[1]
        generations = {k: library.store.generation(k) for k in ("image", "caption", "meta")}
    rows = image_rows(home, db)
    assert len({r.path for r in rows}) == len(rows)
    assert all(len(r.vector) == 2 * dim for r in rows)  # float16
    files = sorted(p.name for p in (home / "vectors").iterdir())  # stale temps are gone
    assert files == [f"caption-{generations['caption']}.faiss",
                     f"image-{generations['image']}.faiss"]
    saved = faiss.read_index(str(home / "vectors" / f"image-{generations['image']}.faiss"))
    assert sorted(faiss.vector_to_array(saved.id_map).tolist()) == sorted(r.id for r in rows)
    for r in rows:  # float16 codes: the stored bits themselves
        np.testing.assert_array_equal(saved.reconstruct(r.id), stored_bits(r.vector))
    return generations


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory):
    """One killed run per kill point (in parallel), and the uninterrupted reference library."""
    base = tmp_path_factory.mktemp("crash")
    model = TEST_MODEL  # torch-free: the killed runs start in a fraction of a second
    photos = base / "photos"
    write_scenes(photos, COUNT, seed=11, size=64)
    runs = {point: clipdex("--home", str(base / point.replace(":", "-")), "index", str(photos),
                           "--model", model, kill_at=point) for point in KILLS}
    index(base / "reference", photos, model)  # while the killed runs start up
    reference = {"rows": {r.path: (r.id, r.vector) for r in image_rows(base / "reference")},
                 "hits": top_hits(base / "reference")}
    for proc in runs.values():
        proc.communicate(timeout=900)  # generous: shared CI machines can be very busy
    return base, model, photos, reference, runs


@pytest.mark.parametrize("point", list(KILLS))
def test_killed_run_recovers_to_the_uninterrupted_library(crashed, point: str) -> None:
    base, model, photos, reference, runs = crashed
    home = base / point.replace(":", "-")
    assert runs[point].returncode == -signal.SIGKILL, runs[point].stderr[-2000:]

    rows = image_rows(home)  # the store opens, holding only whole batches
    assert len(rows) == KILLS[point]
    assert {r.path: (r.id, r.vector) for r in rows}.items() <= reference["rows"].items()
    if point == "save":
        leftovers = [p.name for p in (home / "vectors").iterdir()]
        assert len(leftovers) == 1 and leftovers[0].endswith(".tmp"), leftovers

    report = index(home, photos, model)
    assert (report.new, report.unchanged, report.failed) == (COUNT - KILLS[point], KILLS[point], 0)
    assert_consistent(home)
    assert {r.path: (r.id, r.vector) for r in image_rows(home)} == reference["rows"]
    assert top_hits(home) == reference["hits"]


class _Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing catches it, nothing cleans up."""


def test_id_of_a_removed_image_is_never_reused_after_a_crash(crashed) -> None:
    """A run dies after committing a removal, before saving: the old index file has that id."""
    base, model, *_ = crashed
    churn, home = base / "churn", base / "churn-home"
    write_scenes(churn, 6, seed=12, size=64)
    index(home, churn, model)
    newest = max(image_rows(home), key=lambda r: r.id)
    os.remove(newest.path)

    def crash_at_save(point: str) -> None:
        if point == "save":
            raise _Killed

    with pytest.MonkeyPatch.context() as mp, pytest.raises(_Killed):
        mp.setattr(faults, "crash_test_hook", crash_at_save)
        index(home, churn, model)
    stale = sorted((home / "vectors").glob("image-*.faiss"))
    assert len(stale) == 1 and faiss.read_index(str(stale[0])).ntotal == 6
    assert len(image_rows(home)) == 5

    render(next(iter(generate(1, seed=13))), 64).save(churn / "fresh.png")
    report = index(home, churn, model)
    assert (report.new, report.unchanged, report.removed) == (1, 5, 0)
    assert_consistent(home)  # the fresh image's id maps to its own vector, not the removed one


def test_a_killed_run_with_the_real_tiny_model_recovers(tmp_path: Path) -> None:
    """The same claim end to end on the shipped CLIP (the trials above use the `test`
    embedder): killed inside the second batch's transaction, then rerun."""
    photos = tmp_path / "photos"
    write_scenes(photos, BATCH_SIZE + 10, seed=21, size=64)
    home, reference = tmp_path / "killed", tmp_path / "reference"
    proc = clipdex("--home", str(home), "index", str(photos), "--model", "tiny",
                   kill_at="commit:2")
    index(reference, photos, "tiny")  # while the killed run works
    proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(image_rows(home)) == BATCH_SIZE
    report = index(home, photos, "tiny")
    assert (report.new, report.unchanged) == (10, BATCH_SIZE)
    assert_consistent(home)
    expected = {r.path: (r.id, r.vector) for r in image_rows(reference)}
    assert {r.path: (r.id, r.vector) for r in image_rows(home)} == expected
    assert top_hits(home) == top_hits(reference)
