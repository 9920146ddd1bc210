"""Settings precedence (flag > CLIPDEX_* > default) and one-line errors for a library that
cannot be opened: no traceback, the right exit status, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from index import Settings, UsageProblem
from index.settings import DECODE_NICE, DEFAULT_MODEL


def test_defaults_without_flags_or_environment(tmp_path: Path) -> None:
    settings = Settings.resolve(environ={})
    assert settings.home.name == "clipdex" and settings.home.is_absolute()
    assert (settings.db_url, settings.model, settings.precision, settings.workers) == \
        (None, None, "auto", None)
    assert (settings.decode_gate, settings.decode_nice) == (True, DECODE_NICE)
    assert settings.database_url == f"sqlite:///{settings.home / 'library.db'}"


def test_environment_overrides_defaults_and_flags_override_both(tmp_path: Path) -> None:
    env = {"CLIPDEX_HOME": str(tmp_path / "env-home"), "CLIPDEX_DB": "sqlite:///env.db",
           "CLIPDEX_MODEL": "tiny", "CLIPDEX_PRECISION": "fp32", "CLIPDEX_WORKERS": "3",
           "CLIPDEX_DECODE_GATE": "0", "CLIPDEX_DECODE_NICE": "0"}
    from_env = Settings.resolve(environ=env)
    assert from_env == Settings(tmp_path / "env-home", "sqlite:///env.db", "tiny", "fp32", 3,
                                False, 0)
    flags = Settings.resolve(tmp_path / "flag-home", "sqlite:///flag.db", model=DEFAULT_MODEL,
                             precision="int8", workers=1, environ=env)
    assert (flags.home, flags.db_url, flags.model, flags.precision, flags.workers) == \
        (tmp_path / "flag-home", "sqlite:///flag.db", DEFAULT_MODEL, "int8", 1)


@pytest.mark.parametrize("name, value, words", [
    ("CLIPDEX_WORKERS", "many", "CLIPDEX_WORKERS must be an integer >= 1"),
    ("CLIPDEX_WORKERS", "0", "CLIPDEX_WORKERS must be an integer >= 1"),
    ("CLIPDEX_DECODE_NICE", "-1", "CLIPDEX_DECODE_NICE must be an integer >= 0"),
    ("CLIPDEX_DECODE_GATE", "maybe", "CLIPDEX_DECODE_GATE must be 0 or 1"),
    ("CLIPDEX_PRECISION", "fp8", "(from CLIPDEX_PRECISION)"),
])
def test_malformed_environment_is_a_usage_problem_naming_it(name: str, value: str,
                                                            words: str) -> None:
    with pytest.raises(UsageProblem) as caught:
        Settings.resolve(environ={name: value})
    assert words in str(caught.value)


def test_cli_precision_and_workers_from_the_environment(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    import index.library

    def fake_index(self, paths, **options):
        seen.update(settings=self.settings, options=options)
        raise UsageProblem("stop here")

    monkeypatch.setattr(index.library.Library, "index", fake_index)
    monkeypatch.setenv("CLIPDEX_WORKERS", "2")
    result = CliRunner().invoke(cli.main, ["--home", str(tmp_path / "h"), "index", str(tmp_path)])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["settings"].workers == 2 and seen["settings"].precision == "auto"


# --- a library that cannot be opened ----------------------------------------------------------
def run(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def test_a_missing_library_is_one_line_and_nothing_is_created(tmp_path: Path) -> None:
    home = tmp_path / "no" / "such" / "dir"
    for command in (["search", "x"], ["caption", str(tmp_path / "x.jpg")], ["stats"],
                    ["failures"], ["prior", "train"]):
        result = run("--home", str(home), *command)
        assert result.exit_code == 1, (command, result.output)
        assert result.output.strip() == \
            f"Error: no library at {home}: run `clipdex index PATH` first"
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "no").exists()


def test_a_home_that_is_a_file_or_cannot_be_made(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = run("--home", str(a_file), "index", str(tmp_path))
    assert result.exit_code == 2 and "is a file" in result.output
    inside_file = a_file / "home"
    result = run("--home", str(inside_file), "index", str(tmp_path))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot create the library home {inside_file}")
    assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_home(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run("--home", str(locked), "index", str(tmp_path))
    assert result.exit_code == 1 and "is not writable" in result.output


@pytest.mark.parametrize("url, words", [
    ("not a url", "not a database URL"),
    ("nosuchdb://x/y", "unknown database kind"),
    ("mysql://user@localhost/db", "driver for mysql://user@localhost/db is not installed"),
    ("sqlite:////no/such/folder/x.db", "cannot open the database"),
])
def test_a_bad_database_url_is_one_line(tmp_path: Path, url: str, words: str) -> None:
    for command in (["stats"], ["index", str(tmp_path)]):
        result = run("--home", str(tmp_path / "h"), "--db", url, *command)
        assert result.exit_code == 1, (url, command, result.output)
        assert words in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
