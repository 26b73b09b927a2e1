"""The package's layering: no import cycle between eqprop modules, no private name imported
from another eqprop module, and no leftover marker text in the repository."""
from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

import eqprop

SRC = Path(eqprop.__file__).resolve().parent  # src/eqprop
PACKAGE = "eqprop"
REPO = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.AST):
    """Every Import/ImportFrom of the module (at any depth), except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported eqprop module, name imported from it or None, line) for every import."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    out = []
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
            continue
        target = resolve(module, node)
        if target.split(".")[0] != PACKAGE:
            continue
        for a in node.names:
            sub = f"{target}.{a.name}"
            if sub in MODULES:  # `from . import rules`: the submodule itself
                out.append((sub, None, node.lineno))
            else:
                out.append((target, a.name, node.lineno))
    return out


def test_module_walk_finds_the_package():
    assert {"eqprop", "eqprop.blocks", "eqprop.estimators", "eqprop.hamiltonian.rhel"} <= set(MODULES)
    assert ("eqprop.blocks", "EnergyBlock") in {(m, n) for m, n, _ in imports("eqprop.estimators")}
    assert ("eqprop.estimators", "RHEL") in {(m, n) for m, n, _ in imports("eqprop.hamiltonian.rhel")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles_between_eqprop_modules():
    """Importing a module also imports its parent packages, but a package's __init__ that
    re-exports its submodules does not make a cycle with them; edges are the modules named
    by import statements (lazy imports inside functions included)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = set()
        for target, _, _ in imports(module):
            assert target in MODULES, f"{module} imports {target}, which is not a module of the package"
            if target != module:
                targets.add(target)
        graph[module] = targets
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_from_other_eqprop_modules():
    bad = [f"{MODULES[module].relative_to(SRC.parent)}:{line}: from {target} import {name}"
           for module in MODULES for target, name, line in imports(module)
           if name is not None and name.startswith("_") and not name.startswith("__") and target != module]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / p for p in out.decode().split("\0") if p]


def test_no_tracked_file_contains_the_marker():
    marker = "SP" + "EC"  # spelled in two parts so that this file does not contain it
    files = tracked_files()
    assert any(p.name == "pyproject.toml" for p in files)
    hits = []
    for path in files:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if marker.encode() in data:
            for i, line in enumerate(data.decode(errors="replace").splitlines(), 1):
                if marker in line:
                    hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
