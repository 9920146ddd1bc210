"""Every code block in README.md runs as written, offline, in a scratch folder, or says why not.

A fenced block right after `<!-- not run: REASON -->` is not run (downloads, installs, the
benchmarks); a ```text block is a listing, not commands. Every other block runs: ```python
with this interpreter, shell blocks (```shell, ```sh, ```bash or bare) in bash with `set -e`,
`clipdex` being this checkout's command. CLIPDEX_HOME and TMPDIR point into the test's
temporary folder (so `mktemp -d` and `tempfile.mkdtemp()` do too) and HF_HUB_OFFLINE=1, so no
block can reach a hub.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELLS = {"", "shell", "sh", "bash"}
LISTINGS = {"text"}
BLOCK_TIMEOUT = 300
FENCE = re.compile(r"^(?:<!-- not run: (?P<reason>[^\n]*?) -->\n)?```(?P<lang>[\w-]*)\n"
                   r"(?P<code>.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    not_run: str | None  # the reason given, when marked

    @property
    def runs(self) -> bool:
        return self.not_run is None and self.lang not in LISTINGS


def readme_blocks(text: str) -> list[Block]:
    return [Block(text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["code"], m["reason"])
            for m in FENCE.finditer(text)]


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
RUN = [b for b in BLOCKS if b.runs]


def test_every_block_is_run_or_says_why_not() -> None:
    fences = README.read_text(encoding="utf-8").count("\n```")
    assert fences == 2 * len(BLOCKS), "a fence the pattern missed (unbalanced or indented?)"
    for block in BLOCKS:
        assert block.lang in SHELLS | LISTINGS | {"python"}, (
            f"README.md:{block.line}: a ```{block.lang} block: mark it "
            f"`<!-- not run: REASON -->` or use python, shell or text")
        assert block.not_run is None or block.not_run.strip(), f"README.md:{block.line}"
    assert {b.lang for b in RUN} >= {"python", "shell"}
    assert sum("clipdex " in b.code for b in RUN if b.lang in SHELLS) >= 2


def test_blocks_that_run_need_nothing_from_elsewhere() -> None:
    """No placeholders and no paths outside the block's own scratch folder."""
    for block in RUN:
        for needle in ("~/", "/tmp/", "ref.jpg", "photo.jpg", "<", "…"):
            assert needle not in block.code, f"README.md:{block.line}: {needle!r}"
    assert "(soon)" not in README.read_text(encoding="utf-8")


def _clipdex_on_path(bin_dir: Path) -> None:
    """`clipdex` for the blocks: this venv's command, else `python -m cli` of this checkout."""
    beside = Path(sys.executable).with_name("clipdex")
    target = (shlex.quote(str(beside)) if beside.is_file()
              else f"{shlex.quote(sys.executable)} -m cli")
    bin_dir.mkdir()
    wrapper = bin_dir / "clipdex"
    wrapper.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    wrapper.chmod(0o755)


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLIPDEX_", "HF_")) and k != "PYTHONPATH"}
    _clipdex_on_path(tmp_path / "bin")
    return {**env, "PATH": os.pathsep.join([str(tmp_path / "bin"), env.get("PATH", "")]),
            "CLIPDEX_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path),
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run in a session of its own, and end whatever it left running (a server)."""
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n(timed out after {BLOCK_TIMEOUT}s)"
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, process.returncode, output)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[f"line{b.line}-{b.lang or 'shell'}" for b in RUN])
def test_readme_block_runs(block: Block, tmp_path: Path) -> None:
    env, work = _environment(tmp_path), tmp_path / "work"
    work.mkdir()
    if block.lang == "python":
        script = tmp_path / "block.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
    else:
        if "curl " in block.code and shutil.which("curl") is None:
            pytest.skip("this block needs curl")
        if "clipdex serve" in block.code:
            assert _port_free(8765), "port 8765 is in use: the README's server block needs it"
        # stop at the first failing line, say which, and stop what the block started
        prologue = ("set -e\ntrap 'echo \"README block failed at: $BASH_COMMAND\" >&2' ERR\n"
                    "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n")
        argv = ["bash", "-c", prologue + block.code]
    result = _run(argv, work, env)
    assert result.returncode == 0, f"README.md:{block.line}:\n{result.stdout[-4000:]}"
    assert "Traceback" not in result.stdout, f"README.md:{block.line}:\n{result.stdout[-4000:]}"
