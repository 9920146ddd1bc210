"""The store on a real PostgreSQL server: the same library as on SQLite, row for row; two
writers at once; runs killed, cut off by a server restart, or pointed at no server at all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from clipdex_test_embedder import NAME as TEST_MODEL
from clipdex_test_embedder import SUBPROCESS_ENV
from conftest import free_port
from test_crash import COUNT, KILLS, QUERIES, assert_consistent, clipdex, image_rows

import cli
from index.ingest import BATCH_SIZE
from index.synthetic.scenes import write_scenes

REPO = Path(__file__).resolve().parents[1]

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


# --- many writers, kills, faults ------------------------------------------------------------

PER_WRITER = 150  # three batches each (64, 64, 22)
WAIT_S = 30.0  # the longest a handshake may take on a busy machine before the test fails
# `clipdex` with a pause at a named point of index.faults' hook (the kill hook still works):
# the Nth time CLIPDEX_TEST_PAUSE_AT's point is reached it touches CLIPDEX_TEST_SIGNAL (when
# set), then waits for the file CLIPDEX_TEST_UNTIL
PAUSING_CLI = """
import os, time
from pathlib import Path
from index import faults

kill = faults.crash_test_hook
point, _, nth = os.environ["CLIPDEX_TEST_PAUSE_AT"].partition(":")
seen = []

def pause(name):
    kill(name)
    if name != point:
        return
    seen.append(name)
    if len(seen) != int(nth or 1):
        return
    if os.environ.get("CLIPDEX_TEST_SIGNAL"):
        Path(os.environ["CLIPDEX_TEST_SIGNAL"]).touch()
    until, deadline = Path(os.environ["CLIPDEX_TEST_UNTIL"]), time.monotonic() + 60
    while not until.exists() and time.monotonic() < deadline:
        time.sleep(0.01)

faults.crash_test_hook = pause
import cli
cli.main(prog_name="clipdex")
"""


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test's environment for a `clipdex` subprocess: no library of the user's, the
    `test` embedder loadable (as tests/test_crash.py starts it)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLIPDEX_HOME", "CLIPDEX_DB", "CLIPDEX_MODEL")}
    env.update(HF_HUB_OFFLINE="1", **SUBPROCESS_ENV, **extra)
    return env


def clipdex_code(code: str, *args: str, **env: str) -> subprocess.Popen:
    """`python -c code ARGS` (code ends by running the CLI) from the repository root."""
    return subprocess.Popen([sys.executable, "-c", code, "--quiet", *args], cwd=REPO,
                            env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, running: list[subprocess.Popen]) -> None:
    """Poll `condition` until it holds; fail at once when a process it depends on exits."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        for proc in running:
            if proc.poll() is not None:
                pytest.fail(f"a writer exited ({proc.returncode}) before {what}: "
                            f"{proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def writer(home: Path, db: str, folder: Path, **pause: str) -> subprocess.Popen:
    """`clipdex index FOLDER --json` on the library, pausing as PAUSING_CLI is told."""
    return clipdex_code(PAUSING_CLI, "--home", str(home), "--db", db, "index", str(folder),
                        "--model", MODEL, "--json", **pause)


def lock_waiters(db: str) -> int:
    """How many sessions of `db` wait on a lock (a row, a key) another transaction holds."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar())
    finally:
        engine.dispose()


@pytest.mark.parametrize("library", ["new", "existing"])
def test_two_writers_on_one_postgres_library_lose_nothing(tmp_path: Path, postgres_db: str,
                                                         library: str) -> None:
    # Two `clipdex index` runs on two folders of one library, started together. Writer A
    # pauses inside its first batch's transaction (generations bumped, not committed) until
    # writer B, whose first batch waits for that pause, is seen blocked on A's locks: the
    # interleaving in which a read-then-write generation bump loses an increment (existing
    # library) or both writers insert the first generation row (new library).
    home, folders = tmp_path / "home", [tmp_path / "a", tmp_path / "b"]
    for seed, folder in enumerate(folders):
        write_scenes(folder, PER_WRITER, seed=30 + seed, size=48)
    earlier = 0  # batches committed before the two writers start
    if library == "existing":
        write_scenes(tmp_path / "c", 1, seed=29, size=48)
        assert run(home, postgres_db, "index", str(tmp_path / "c"), "--model", MODEL
                   ).exit_code == 0
        folders.append(tmp_path / "c")
        earlier = 1
    paused, go = tmp_path / "a-paused", tmp_path / "a-go"
    writers = [writer(home, postgres_db, folders[0], CLIPDEX_TEST_PAUSE_AT="commit:1",
                      CLIPDEX_TEST_SIGNAL=str(paused), CLIPDEX_TEST_UNTIL=str(go)),
               writer(home, postgres_db, folders[1], CLIPDEX_TEST_PAUSE_AT="embed:1",
                      CLIPDEX_TEST_UNTIL=str(paused))]
    wait_for(paused.exists, "writer A paused in its transaction", writers)
    wait_for(lambda: lock_waiters(postgres_db) > 0, "writer B waits on writer A", writers[1:])
    go.touch()
    outcomes = [proc.communicate(timeout=120) for proc in writers]
    for proc, (stdout, stderr) in zip(writers, outcomes):
        assert proc.returncode == 0, stderr[-3000:]
        report = json.loads(stdout)
        assert (report["new"], report["failed"]) == (PER_WRITER, 0), report

    batches = earlier + 2 * -(-PER_WRITER // BATCH_SIZE)
    generations = assert_consistent(home, postgres_db)
    # every batch bumped both counters once, in its own transaction: none lost
    assert (generations["image"], generations["meta"]) == (batches, batches)
    expected = {str(p) for folder in folders for p in folder.iterdir()
                if p.suffix in (".png", ".jpg")}
    assert {r.path for r in image_rows(home, postgres_db)} == expected
    found = run(home, postgres_db, "search", "a red circle", "--json", "--top", "1000")
    assert found.exit_code == 0, found.output
    assert {h["path"] for h in json.loads(found.stdout)["hits"]} == expected
    again = json.loads(run(home, postgres_db, "index", *map(str, folders), "--json").stdout)
    assert (again["new"], again["unchanged"], again["removed"]) == (0, len(expected), 0)


def waits_for_a_file_lock(proc: subprocess.Popen) -> bool:
    """Whether the process is blocked in flock() (Linux lists waiters with "->")."""
    return any(line.split()[1:2] == ["->"] and line.split()[5] == str(proc.pid)
               for line in Path("/proc/locks").read_text().splitlines())


def test_two_writers_write_the_index_files_one_at_a_time(tmp_path: Path,
                                                        postgres_db: str) -> None:
    # Writer A pauses while saving its image index (file written, not yet renamed) at the
    # generation it caught up to; writer B then commits more batches and comes to save its
    # own. Unserialised, B saves and drops older files, then A's older file lands beside it.
    home, small, large = tmp_path / "home", tmp_path / "small", tmp_path / "large"
    write_scenes(small, 3, seed=40, size=48)
    write_scenes(large, BATCH_SIZE + 3, seed=41, size=48)
    paused, go = tmp_path / "a-paused", tmp_path / "a-go"
    writers = [writer(home, postgres_db, small, CLIPDEX_TEST_PAUSE_AT="save:1",
                      CLIPDEX_TEST_SIGNAL=str(paused), CLIPDEX_TEST_UNTIL=str(go)),
               writer(home, postgres_db, large, CLIPDEX_TEST_PAUSE_AT="embed:1",
                      CLIPDEX_TEST_UNTIL=str(paused))]
    wait_for(paused.exists, "writer A paused in its save", writers)
    wait_for(lambda: writers[1].poll() is not None or waits_for_a_file_lock(writers[1]),
             "writer B saved, or waits to", writers[:1])
    go.touch()
    for proc in writers:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
    generations = assert_consistent(home, postgres_db)  # one file per kind, the newest
    assert generations["image"] == 3  # A's batch, B's two


@pytest.fixture(scope="module")
def killed_on_postgres(tmp_path_factory: pytest.TempPathFactory,
                       postgres_server) -> tuple:
    """tests/test_crash.py's trials on PostgreSQL: one `clipdex index` SIGKILLed at each of
    its kill points (in parallel, each on a database of its own), and the reference library
    an uninterrupted run builds."""
    from index import Library

    base = tmp_path_factory.mktemp("pg-crash")
    photos = base / "photos"
    write_scenes(photos, COUNT, seed=11, size=64)
    urls = {point: postgres_server.create_database("kill_" + point.replace(":", "_"))
            for point in [*KILLS, "reference"]}
    runs = {point: clipdex("--home", str(base / point.replace(":", "-")), "--db", urls[point],
                           "index", str(photos), "--model", MODEL, kill_at=point)
            for point in KILLS}
    with Library.open(base / "reference", db=urls["reference"]) as library:
        library.index([photos], model=MODEL)  # while the killed runs start up
    for proc in runs.values():  # generous: shared CI machines can be very busy
        proc.stderr_text = proc.communicate(timeout=900)[1]  # for a failed assertion's message
    return base, photos, urls, runs


def top_hits(home: Path, db: str) -> list[list[str]]:
    from index import Library
    from retrieval import Searcher

    searcher = Searcher(Library.open(home, db=db))
    try:
        return [[h.path for h in searcher.search(q, k=10).hits] for q in QUERIES]
    finally:
        searcher.close()


@pytest.mark.parametrize("point", list(KILLS))
def test_killed_run_on_postgres_recovers_to_the_uninterrupted_library(killed_on_postgres,
                                                                      point: str) -> None:
    from index import Library

    base, photos, urls, runs = killed_on_postgres
    home, db = base / point.replace(":", "-"), urls[point]
    assert runs[point].returncode == -signal.SIGKILL, runs[point].stderr_text[-2000:]
    reference = {r.path: bytes(r.vector) for r in image_rows(base / "reference",
                                                             urls["reference"])}
    rows = image_rows(home, db)  # the server rolled the dead client's transaction back
    assert len(rows) == KILLS[point]
    assert {r.path: bytes(r.vector) for r in rows}.items() <= reference.items()

    with Library.open(home, db=db) as library:
        report = library.index([photos], model=MODEL)
    assert (report.new, report.unchanged, report.failed) == (COUNT - KILLS[point],
                                                             KILLS[point], 0)
    # ids may differ from the reference's (a sequence never hands out a rolled-back id
    # again); the rows, their vectors, the hits and the generations may not
    generations = assert_consistent(home, db)
    assert generations == assert_consistent(base / "reference", urls["reference"])
    assert {r.path: bytes(r.vector) for r in image_rows(home, db)} == reference
    assert top_hits(home, db) == top_hits(base / "reference", urls["reference"])


def one_line_error(stderr: str) -> str:
    """The one line a failing command printed (no traceback, nothing else)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


@pytest.mark.parametrize("where", ["tcp", "socket"])
def test_an_unreachable_server_is_one_line_naming_the_url(tmp_path: Path, where: str) -> None:
    pytest.importorskip("psycopg")
    from sqlalchemy.engine import make_url

    port = free_port()  # nothing listens there
    url = {"tcp": f"postgresql+psycopg://clipdex:s3cret@127.0.0.1:{port}/photos",
           "socket": f"postgresql+psycopg://clipdex:s3cret@/photos?host={tmp_path}/none"
                     f"&port=5432"}[where]
    photos, fresh, existing = tmp_path / "photos", tmp_path / "fresh", tmp_path / "existing"
    write_scenes(photos, 2, seed=5, size=32)
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    runs = [clipdex_code("import cli; cli.main()", "--home", str(home), "--db", url, *command)
            for home, command in ((fresh, ("index", str(photos), "--model", MODEL)),
                                  (existing, ("index", str(photos))),
                                  (existing, ("search", "a red circle")),
                                  (fresh, ("stats",)))]
    shown = make_url(url).render_as_string(hide_password=True)
    for proc in runs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1 and stdout == "", stderr
        line = one_line_error(stderr)
        assert f"cannot open the database {shown}: " in line and "s3cret" not in line
        assert "refused" in line if where == "tcp" else "No such file" in line
    assert not fresh.exists()  # a library that cannot be opened is not begun
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


def test_a_server_that_never_answers_times_out(tmp_path: Path, monkeypatch) -> None:
    # a listener that accepts and then says nothing (as a firewalled or hung host): without a
    # connect timeout libpq waits as long as TCP does
    pytest.importorskip("psycopg")
    from index import store

    monkeypatch.setattr(store, "PG_CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql+psycopg://clipdex@127.0.0.1:{silent.getsockname()[1]}/photos"
        started = time.monotonic()
        result = CliRunner().invoke(cli.main, ["--home", str(tmp_path / "home"), "--db", url,
                                               "stats"])
        waited = time.monotonic() - started
    assert result.exit_code == 1 and "cannot open the database" in result.output
    assert "timeout" in result.output.lower() and waited < 8, (waited, result.output)
    assert not (tmp_path / "home").exists()


def test_a_missing_psycopg_names_the_extra_to_install(tmp_path: Path) -> None:
    # psycopg is installed here: the subprocess hides it as an uninstalled package would be
    hidden = "import sys; sys.modules['psycopg'] = None\nimport cli; cli.main()"
    photos, home = tmp_path / "photos", tmp_path / "home"
    write_scenes(photos, 2, seed=5, size=32)
    url = "postgresql+psycopg://clipdex:s3cret@db.example/photos"
    for command in (("index", str(photos), "--model", MODEL), ("stats",)):
        proc = clipdex_code(hidden, "--home", str(home), "--db", url, *command)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr
        line = one_line_error(stderr)
        assert "no module 'psycopg'" in line and "pip install 'clipdex[postgres]'" in line
        assert "s3cret" not in line
    assert not home.exists()


RESTART_COUNT = BATCH_SIZE + 10  # two batches: the first commits, the second meets a restart


@pytest.mark.parametrize(("point", "mode"), [("embed:2", "fast"), ("commit:2", "immediate")])
def test_a_server_restarted_mid_run_fails_cleanly_and_the_rerun_completes(
        tmp_path: Path, private_postgres, monkeypatch: pytest.MonkeyPatch, point: str,
        mode: str) -> None:
    # restarted between two batches (fast: sessions told to end) or inside the second
    # batch's open transaction (immediate: connections cut, crash recovery on start)
    from sqlalchemy.engine import make_url

    from index import faults

    photos, home = tmp_path / "photos", tmp_path / "home"
    write_scenes(photos, RESTART_COUNT, seed=8, size=48)
    db = private_postgres.create_database("restart_" + point.replace(":", "_"))
    name, nth = point.split(":")
    reached: list[str] = []

    def restart_at(where: str) -> None:
        if where == name:
            reached.append(where)
            if len(reached) == int(nth):
                private_postgres.restart(mode)

    with monkeypatch.context() as mp:
        mp.setattr(faults, "crash_test_hook", restart_at)
        result = run(home, db, "index", str(photos), "--model", MODEL)
    assert result.exit_code == 1 and len(reached) == int(nth), result.output
    line = one_line_error(result.stderr)
    shown = make_url(db).render_as_string(hide_password=True)
    assert f"lost the connection to the database {shown} (" in line and "try again" in line
    assert len(image_rows(home, db)) == BATCH_SIZE  # the first batch; none of the second

    rerun = run(home, db, "index", str(photos), "--json")
    assert rerun.exit_code == 0, rerun.output
    report = json.loads(rerun.stdout)
    assert (report["new"], report["unchanged"]) == (RESTART_COUNT - BATCH_SIZE, BATCH_SIZE)
    assert assert_consistent(home, db)["image"] == 2  # one generation per committed batch
    reference = tmp_path / "reference"
    assert run(reference, None, "index", str(photos), "--model", MODEL).exit_code == 0
    assert {r.path: bytes(r.vector) for r in image_rows(home, db)} == \
        {r.path: bytes(r.vector) for r in image_rows(reference, None)}


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_writer_that_loses_the_race_for_the_same_files_says_so_and_the_rerun_completes(
        tmp_path: Path, store: str, request, monkeypatch) -> None:
    # a second writer (a `watch`, another `clipdex index`) indexes the same folder while this
    # run is embedding its first batch: this run's insert meets the other's paths
    from index import Library, faults

    db = request.getfixturevalue("postgres_db") if store == "postgres" else None
    home, photos = tmp_path / "home", tmp_path / "photos"
    write_scenes(photos, 70, seed=9, size=32)
    real_hook, raced = faults.crash_test_hook, []

    def other_writer(name: str) -> None:
        real_hook(name)
        if name == "embed" and not raced:
            raced.append(name)
            with Library.open(home, db=db) as library:
                assert library.index([photos], model=MODEL).new == 70

    monkeypatch.setattr(faults, "crash_test_hook", other_writer)
    lost = run(home, db, "index", str(photos), "--model", MODEL)
    assert raced and lost.exit_code == 1 and "Traceback" not in lost.output
    assert "another clipdex writer indexed" in lost.output and "run the command again" in \
        lost.output
    monkeypatch.setattr(faults, "crash_test_hook", real_hook)
    rerun = run(home, db, "index", str(photos), "--json")
    assert rerun.exit_code == 0, rerun.output
    assert (json.loads(rerun.stdout)["new"], json.loads(rerun.stdout)["unchanged"]) == (0, 70)
    assert_consistent(home, db)
