"""The package layout's dependency rules (README, "How it works"): imports point one way.

Every import statement counts, also one inside a function: a lazy import still makes the
importing code depend on the imported package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = (
    "rag.model",
    "rag.engine",
    "rag.index",
    "rag.server",
    "rag.service",
    "rag.conversation",
    "rag.cli",
    "rag.config",
    "cache",
    "ingest",
    "eval",
)
BELOW_SERVICE = {
    "rag.config",
    "rag.model",
    "rag.index",
    "rag.engine",
    "cache",
    "rag.conversation",
}
# What each unit may import besides itself.
ALLOWED = {
    "rag.config": set(),
    "cache": set(),
    "rag.conversation": set(),
    "rag.model": {"rag.config"},
    "rag.index": {"rag.config"},
    "rag.engine": {"rag.config", "rag.model", "cache"},
    "ingest": {"rag.config", "rag.model", "rag.index"},
    "rag.service": BELOW_SERVICE,
    "rag.server": BELOW_SERVICE | {"rag.service", "ingest"},
    "eval": BELOW_SERVICE | {"rag.service", "rag.server", "ingest"},
    "rag.cli": set(UNITS) - {"rag.cli"},
}


def unit_of(module: str) -> str | None:
    """The unit a dotted module name belongs to; None for third-party modules."""
    if module == "rag":
        return "rag.config"  # the package's __init__: environment defaults only
    for unit in UNITS:
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, only_in: set[str] | None = None) -> set[str]:
    """The absolute modules a file imports: all of them, or with `only_in` the module-level
    ones plus those inside the named functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = list(ast.walk(tree))
    if only_in is not None:
        nodes = [
            n
            for stmt in tree.body
            for n in (
                ast.walk(stmt)
                if isinstance(stmt, ast.FunctionDef) and stmt.name in only_in
                else []
                if isinstance(stmt, ast.FunctionDef | ast.ClassDef)
                else ast.walk(stmt)
            )
        ]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def sources() -> dict[str, Path]:
    files = [p for top in ("rag", "cache", "ingest", "eval") for p in (REPO / top).rglob("*.py")]
    return {module_name(p): p for p in files}


def test_every_import_points_down_the_layers():
    wrong = []
    for module, path in sorted(sources().items()):
        unit = unit_of(module)
        for imported in imports(path):
            target = unit_of(imported)
            if target is not None and target != unit and target not in ALLOWED[unit]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_allowed_imports_have_no_cycle():
    seen: dict[str, int] = {}

    def visit(unit: str, path: tuple[str, ...]) -> None:
        assert unit not in path, " -> ".join((*path, unit))
        if seen.get(unit):
            return
        for below in ALLOWED[unit]:
            visit(below, (*path, unit))
        seen[unit] = 1

    for unit in ALLOWED:
        visit(unit, ())


@pytest.mark.parametrize("command", ["cmd_ask", "cmd_serve"])
def test_ask_and_serve_import_no_evaluation_code(command):
    """Everything `kvrag ask` / `kvrag serve` can import, followed through every module, holds
    no eval module (benchmarks load only when `kvrag bench` or `kvrag eval` runs)."""
    files = sources()
    todo = list(imports(files["rag.cli"], only_in={command, "main", "_settings"}))
    reached: set[str] = set()
    while todo:
        module = todo.pop()
        if module in reached or module not in files:
            continue
        reached.add(module)
        todo.extend(imports(files[module]))
    assert "rag.service" in reached or "rag.server.run" in reached
    assert not {m for m in reached if unit_of(m) == "eval"}


def test_building_the_cli_and_importing_the_server_loads_no_evaluation_code():
    code = (
        "import sys, rag.cli as cli; cli.build_parser().parse_args(['serve']); "
        "import rag.server.run, rag.service; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('eval', 'ingest')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    loaded = eval(out)  # noqa: S307 - our own printed list
    assert not [m for m in loaded if m.startswith("eval")], loaded
