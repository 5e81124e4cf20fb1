"""The house rules of docs/architecture.md, checked on the source itself (ast, no imports run):

* imports go one way, driver -> coupling -> potentials (potentials.core at the bottom), lazy ones included;
* no import cycles between modules, lazy or not;
* no source file over 600 lines, no function over 80 lines;
* unit-conversion literals live in potentials/core/units.py only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("driver", "coupling", "potentials")
RANK = {"driver": 2, "coupling": 1, "potentials": 0}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 80


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import, path: Path) -> list[str]:
    """Project modules named by one import statement (``from . import x`` resolved; names that are
    submodules count as imports of the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
    if base.split(".")[0] not in PACKAGES:
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _resolve(name, node, path):
                    while t not in MODULES and "." in t:     # `import a.b.c` -> the deepest known module
                        t = t.rsplit(".", 1)[0]
                    if t in MODULES and t != name:
                        targets.add(t)
        graph[name] = targets
    return graph


GRAPH = _import_graph()


def test_imports_go_down_only():
    """driver -> coupling -> potentials: no module imports a higher layer, not even inside a function."""
    up = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
          if RANK[b.split(".")[0]] > RANK[a.split(".")[0]]]
    assert not up, "upward imports:\n" + "\n".join(up)


def test_core_imports_nothing_above_it():
    """potentials.core is the bottom: it imports no other project module."""
    bad = [f"{a} -> {b}" for a, targets in GRAPH.items() if a.startswith("potentials.core")
           for b in targets if not b.startswith("potentials.core")]
    assert not bad, bad


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph (lazy imports included)."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_file_and_function_sizes():
    long_files = [f"{p.relative_to(ROOT)}: {n}" for p in MODULES.values()
                  if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    long_functions = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n}")
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


# conversion factors that must appear in potentials/core/units.py only (as numeric literals)
CONVERSION_LITERALS = (1.8897261, 0.036749326, 3.8087989e-4, 138.935456, 4.184, 96.485, 27.2114, 0.529177,
                       23.0605, 627.5095, 2625.5)


def test_conversion_literals_only_in_units():
    units = ROOT / "potentials" / "core" / "units.py"
    found = []
    for path in MODULES.values():
        if path == units:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and \
                    any(abs(node.value - c) <= 1e-6 * abs(c) for c in CONVERSION_LITERALS):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert not found, f"conversion literals outside units.py: {found}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_says_what_it_owns(module):
    """Each module opens with a docstring (docs/architecture.md relies on them)."""
    path = MODULES[module]
    text = path.read_text()
    if not text.strip():
        return
    assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(ROOT)} has no module docstring"
