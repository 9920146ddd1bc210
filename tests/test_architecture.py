"""The design's boundaries, checked on the source: the store owns all SQL, the write path never
imports the read path, and no module-level import cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("index", "retrieval")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _module_level_imports(name: str, path: Path) -> set[str]:
    """What a module imports when it is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _module_level_imports(name, path) if m in modules and m != name}
            for name, path in modules.items()}


def test_the_read_path_writes_no_sql() -> None:
    offenders = [f"{path.relative_to(REPO)}:{number}"
                 for path in (REPO / "retrieval").rglob("*.py")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if any(word in line for word in ("ImageRow", "CaptionRow", "from sqlalchemy",
                                                  "import sqlalchemy"))]
    assert offenders == []


def test_the_write_path_never_imports_the_read_path() -> None:
    graph = _graph()
    assert not {(a, b) for a, edges in graph.items() if a.startswith("index")
                for b in edges if b.startswith("retrieval")}


def test_no_module_level_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for edge in sorted(graph[node]):
            # importing a package's submodule runs the package first: that edge is expected
            if node.startswith(edge + "."):
                continue
            if state.get(edge) == 1:
                cycles.append(path[path.index(edge):] + [edge])
            elif edge not in state:
                visit(edge, path + [edge])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_check_sees_a_cycle_when_there_is_one(tmp_path: Path) -> None:
    """The parser behind the cycle check reads relative imports (else it proves nothing)."""
    a = tmp_path / "a.py"
    a.write_text("from .b import thing\nfrom . import c\n")
    assert _module_level_imports("pkg.a", a) >= {"pkg.b", "pkg.b.thing", "pkg", "pkg.c"}
