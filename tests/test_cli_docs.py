"""README's CLI section documents every command and every option the CLI has."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def commands(group: click.Group = cli.main, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """(path, command) for the group itself and every group, command and subcommand below."""
    yield path, group
    for name, command in sorted(group.commands.items()):
        if command.hidden:
            continue
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def long_options(command: click.Command) -> list[str]:
    return [opt for param in command.params if isinstance(param, click.Option)
            and not param.hidden for opt in (*param.opts, *param.secondary_opts)
            if opt.startswith("--") and opt != "--help"]


def cli_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## CLI\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## CLI' section"
    return match.group(1)


def mentions(text: str, option: str) -> bool:
    """`--expand` must appear by itself, not only inside `--expand-samples`."""
    return re.search(re.escape(option) + r"(?![\w-])", text) is not None


ALL = list(commands())


def test_the_walk_finds_nested_commands_and_their_options() -> None:
    paths = {" ".join(path) for path, _ in ALL}
    assert {"", "index", "search", "captions", "captions add", "prior", "prior train",
            "serve"} <= paths
    found = dict((" ".join(p), c) for p, c in ALL)
    assert "--expand-samples" in long_options(found["search"])
    assert "--help" not in long_options(found["search"])
    assert {"--home", "--db", "--quiet", "--version"} <= set(long_options(found[""]))
    assert mentions("[--expand-samples K]", "--expand-samples")
    assert not mentions("[--expand-samples K]", "--expand")


@pytest.mark.parametrize("path, command", [c for c in ALL if c[0]],
                         ids=[" ".join(p) for p, _ in ALL if p])
def test_every_command_is_in_the_cli_section(path: tuple[str, ...],
                                             command: click.Command) -> None:
    name = " ".join(path)
    # the usage block lists one command per line: `  NAME ...` (or `clipdex NAME` in the text)
    line = re.compile(rf"^\s*(clipdex\s+)?{re.escape(name)}(\s|$)", re.M)
    assert line.search(cli_section()), f"README's CLI section does not list `clipdex {name}`"


@pytest.mark.parametrize("path, command", ALL, ids=[" ".join(p) or "clipdex" for p, _ in ALL])
def test_every_option_is_in_the_cli_section(path: tuple[str, ...],
                                            command: click.Command) -> None:
    section = cli_section()
    missing = [opt for opt in long_options(command) if not mentions(section, opt)]
    assert not missing, f"`clipdex {' '.join(path)}`: README's CLI section lacks {missing}"
