"""Shared fixtures: a library home in tmp_path, the shipped tiny model, the `test` embedder
(tests/clipdex_test_embedder.py), a throwaway PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import clipdex_test_embedder  # noqa: F401  (registers the `test` embedder)
import pytest

REPO = Path(__file__).resolve().parents[1]
# huggingface_hub reads this once, at import (which may happen while tests are collected)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The per-user cache (platformdirs honours XDG_CACHE_HOME), shared by the whole session and
# its subprocesses and never the user's own: libraries of one model share one ONNX export.
SESSION_CACHE = tempfile.mkdtemp(prefix="clipdex-test-cache-")
os.environ["XDG_CACHE_HOME"] = SESSION_CACHE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never touch the user's real library; never reach for a hub."""
    monkeypatch.setenv("CLIPDEX_HOME", str(tmp_path / "default-home"))
    monkeypatch.delenv("CLIPDEX_DB", raising=False)
    monkeypatch.delenv("CLIPDEX_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CLIPDEX_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs a network; set CLIPDEX_NETWORK_TESTS=1")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def searcher(library_dirs):
    """A Searcher over the module's `library_dirs` (scenes folder, library home)."""
    from retrieval import Searcher

    s = Searcher.open(library_dirs[1])
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(searcher):
    """The HTTP app over `searcher`, through FastAPI's client on a name the Host rule allows."""
    from fastapi.testclient import TestClient

    from retrieval.server import create_app

    return TestClient(create_app(searcher), base_url="http://127.0.0.1",
                      raise_server_exceptions=False)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (until someone binds it): for a server a
    test starts, or for a connection that must be refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_embedder():
    from index.embedder import get_embedder

    return get_embedder("tiny")


@pytest.fixture(scope="module")
def one_model_load():
    """Load each model once per module: every Library and CLI call in it shares the real one."""
    from index.clip import ClipEmbedder

    cache: dict = {}
    original = ClipEmbedder.load.__func__

    def load(cls, spec, **options):
        key = (spec, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = original(cls, spec, **options)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClipEmbedder, "load", classmethod(load))
        yield


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class PostgresServer:
    """A throwaway PostgreSQL server (Debian's `postgresql` package) on a Unix socket in its
    own folder; tests may restart it under a running library."""

    def __init__(self, settings: str = "-c fsync=off") -> None:
        """`settings`: the server's own options (tests need no durability; a benchmark
        comparing stores passes "" for a server as it runs in production)."""
        import getpass
        import socket

        bin_dir = _postgres_bin()
        if bin_dir is None:
            pytest.skip("no PostgreSQL server here (apt-get install postgresql; .ci/run does)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("psycopg is not installed (pip install -e '.[dev]')")
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="clipdex-pg-"))
        self.as_user: list[str] = []
        self.user = getpass.getuser()
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.folder, "postgres", "postgres")
            self.as_user, self.user = ["runuser", "-u", "postgres", "--"], "postgres"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        init = self._pg("initdb", "-D", str(self.folder / "db"), "-A", "trust", "-U", self.user,
                        "-E", "UTF8")
        if init.returncode:
            shutil.rmtree(self.folder, ignore_errors=True)
            pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
        start = self._ctl("start", "-o", f"-k {self.folder} -p {self.port} "
                                         f"-c listen_addresses='' {settings}")
        if start.returncode:
            shutil.rmtree(self.folder, ignore_errors=True)
            pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]}")

    def _pg(self, tool: str, *args: str):
        import subprocess

        return subprocess.run([*self.as_user, str(self.bin_dir / tool), *args],
                              capture_output=True, text=True, timeout=120)

    def _ctl(self, action: str, *args: str):
        # -l: the server's output goes to a file, never to the pipes run() waits on
        return self._pg("pg_ctl", "-D", str(self.folder / "db"), "-w", "-l",
                        str(self.folder / "log"), *args, action)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` on this server."""
        return f"postgresql+psycopg://{self.user}@/{database}?host={self.folder}&port={self.port}"

    def create_database(self, name: str) -> str:
        """A fresh (empty) database of that name; its URL."""
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.url(name)

    def restart(self, mode: str = "fast") -> None:
        """Stop the server (`mode`: pg_ctl's fast or immediate) and start it again; every
        client connection is cut."""
        done = self._ctl("restart", "-m", mode)
        assert done.returncode == 0, done.stderr

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server; skipped, saying why, where none can be started."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The session server's URL template: `.format(database=NAME)`."""
    return postgres_server.url("{database}")


@pytest.fixture(scope="module")
def private_postgres():
    """A server of the module's own, for tests that restart it under a running library."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's server; its SQLAlchemy URL."""
    import re

    return postgres_server.create_database(
        "t_" + re.sub(r"\W", "_", request.node.name.lower())[:50])


# test file -> what its skips mean, and how to run it
SKIP_NOTES = {
    "test_web.py": "browser test(s) of the web page (needs /usr/bin/chromium): "
                   "apt-get install chromium",
    "test_postgres.py": "PostgreSQL store test(s) (needs a PostgreSQL server binary): "
                        "apt-get install postgresql",
}


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Say plainly which kinds of test did not run for a missing system package, and how to
    run them (`.ci/run` installs both)."""
    for name, what in SKIP_NOTES.items():
        skipped = [r for r in terminalreporter.stats.get("skipped", [])
                   if name in str(getattr(r, "nodeid", ""))
                   or name in str(getattr(r, "location", ("",))[0])]
        if skipped:
            terminalreporter.write_line(f"NOTE: SKIPPED {len(skipped)} {what}, then make test",
                                        yellow=True, bold=True)
