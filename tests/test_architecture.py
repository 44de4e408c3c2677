"""The package's shape: folders that name the pipeline's stages, imports that point one way (from the
command line down to the blocks), no import cycle, no module over 600 lines, no ``_``-prefixed name
imported from another folder.

Read from the source with :mod:`ast`, every ``import`` counted, also those inside functions (a
function-level import is still a dependency; it only hides it). The order below is the one the
architecture page draws; a new folder has to be placed in it before its first import passes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attnsurgeon"
# bottom first: a folder may import its own modules and those of the folders before it, never after
LAYERS = (
    "core",
    "blocks",
    "loading",
    "graph",
    "planning",
    "rewriting",
    "saving",
    "profiling",
    "pictures",
    "sweeps",
    "cli",
)
TOP = ("attnsurgeon", "attnsurgeon.api")  # the public API composes every layer
MAX_LINES = 450
MAX_FUNCTION_LINES = 80  # from the def to the last line, decorators left out


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _import_statements(name: str, path: Path) -> list[tuple[str | None, list[str]]]:
    """Each import in ``name``'s file, anywhere in it: ``(None, modules)`` for ``import a.b``, and
    ``(absolute source module, names)`` for ``from .x import y, z``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str | None, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.append((None, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found.append((source, [a.name for a in node.names]))
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its file."""
    out: set[str] = set()
    for source, names in _import_statements(name, path):
        targets = (
            names if source is None else [f"{source}.{a}" if f"{source}.{a}" in modules else source for a in names]
        )
        for target in targets:
            while target and target not in modules:  # attnsurgeon.x.y where y is a name in module x
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _layer(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    folder = module.split(".")[1]
    assert folder in LAYERS, f"{module}: the folder '{folder}' is not placed in LAYERS (tests/test_architecture.py)"
    return LAYERS.index(folder)


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


def test_every_module_lives_in_a_layer_folder():
    loose = [m for m in MODULES if m not in TOP and m.count(".") < 1]
    assert not loose
    for m in MODULES:
        _layer(m)


def test_imports_point_down_the_pipeline():
    upward = [
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        for t in sorted(targets)
        if t.startswith("attnsurgeon") and _layer(t) > _layer(m)
    ]
    assert not upward, "imports that run up the pipeline:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert not _cycles(GRAPH)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _folder(module: str) -> str:
    """The top-level folder of ``attnsurgeon/`` a module lives in (the top-level modules are their own)."""
    return module.split(".")[1] if module.count(".") else module


def _private_crossings(name: str, path: Path) -> set[str]:
    """``module -> imported.name`` for each ``_``-prefixed name (or module) ``name`` imports from another folder."""
    out: set[str] = set()
    for source, names in _import_statements(name, path):
        for full in names if source is None else [f"{source}.{a}" for a in names]:
            parts = full.split(".")
            if parts[0] != "attnsurgeon" or len(parts) < 2 or _folder(full) == _folder(name):
                continue
            if any(p.startswith("_") and not p.startswith("__") for p in parts[1:]):
                out.add(f"{name} -> {full}")
    return out


# private names still imported across a folder: none. Do not add to it; make the name public instead.
PRIVATE_CROSSINGS_ALLOWED: set[str] = set()


def test_no_private_name_crosses_a_folder():
    crossing = set().union(*(_private_crossings(name, path) for name, path in MODULES.items()))
    new = sorted(crossing - PRIVATE_CROSSINGS_ALLOWED)
    assert not new, (
        "private names imported from another folder (make them public, list them in __all__):\n" + "\n".join(new)
    )
    gone = sorted(PRIVATE_CROSSINGS_ALLOWED - crossing)
    assert not gone, "no longer crossing, take them off PRIVATE_CROSSINGS_ALLOWED:\n" + "\n".join(gone)


def test_the_crossing_finder_finds_private_names(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from ..core.ops import _hidden, shown\nfrom .sibling import _own\n"
        "def f():\n    from attnsurgeon.graph import _shape\n    import attnsurgeon.blocks._common\n"
    )
    assert _private_crossings("attnsurgeon.pictures.m", source) == {
        "attnsurgeon.pictures.m -> attnsurgeon.core.ops._hidden",
        "attnsurgeon.pictures.m -> attnsurgeon.graph._shape",
        "attnsurgeon.pictures.m -> attnsurgeon.blocks._common",
    }


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_450_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(PACKAGE.parent)} has {lines} lines"


def _long_functions(source: str) -> list[str]:
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_over_80_lines(name):
    assert _long_functions(MODULES[name].read_text()) == [], MODULES[name].relative_to(PACKAGE.parent)


def test_the_length_check_counts_from_def_to_the_last_line():
    body = [f"x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1)]  # with the def: exactly the limit
    fits = "\n".join(["def fits():", *(f"    {line}" for line in body)])
    over = "\n".join(
        ["class C:", "    @staticmethod", "    def over():", *(f"        {line}" for line in body + ["y = 1"])]
    )
    assert _long_functions(fits) == []
    assert _long_functions(over) == [f"over ({MAX_FUNCTION_LINES + 1} lines, line 3)"]  # the decorator not counted


# the public API, as the README and the docs use it: these names stay where they are whatever moves below
PUBLIC = {
    "insert": "function",
    "apply_plan": "function",
    "optimize": "function",
    "profile": "function",
    "export": "function",
    "load": "function",
    "load_model": "function",
    "list_models": "function",
    "inspect_model": "function",
    "read_recipe": "function",
    "InsertionSpec": "class",
    "Recipe": "class",
    "SurgeryReport": "class",
    "AttnSurgeonError": "class",
}


def test_the_public_api_resolves_to_what_it_names():
    import inspect as pyinspect

    import attnsurgeon

    assert set(PUBLIC) <= set(attnsurgeon.__all__)
    for name, kind in PUBLIC.items():
        obj = getattr(attnsurgeon, name)
        assert pyinspect.isclass(obj) if kind == "class" else pyinspect.isfunction(obj), name
        assert obj.__name__ == name, f"attnsurgeon.{name} is {obj.__module__}.{obj.__name__}"
    # importing any module (the CLI imports saving.export) leaves the package's functions in place
    import attnsurgeon.profiling  # noqa: F401
    import attnsurgeon.saving.export  # noqa: F401

    assert pyinspect.isfunction(attnsurgeon.export) and pyinspect.isfunction(attnsurgeon.profile)
