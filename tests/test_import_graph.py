"""The package's import graph reads top-down and has no cycles.

Layers, top to bottom: ``cli`` -> the tools it runs (``train``, ``experiments``, ``bench``) ->
``integrations`` (model-library glue) -> ``nn`` -> the public API (the package itself, ``ops``,
``rng``) -> ``_backend`` (picks a kernel backend, so it imports them) -> the kernels
(``reference``, ``triton``, ``_C``) -> plain helpers (``_checks``, ``_formulas``, ``metrics``,
``data``). ``nn`` and ``integrations`` use the public API only, never a backend directly.

Every import statement of every module under ``udn_kernels/`` counts, at module or function
level, relative or absolute, plus ``importlib.import_module("udn_kernels....")`` with a literal
name. Importing ``a.b.c`` also runs the package ``a.b`` unless it encloses the importer (Python
imported it first), so that is an edge too. So the root package ``udn_kernels`` is an edge only
when named (``import udn_kernels``, ``from .. import gaussian_linear``): it re-exports the public
API and belongs to that layer, so nothing below the API may import it.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = "udn_kernels"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / ROOT

# Layers, top to bottom: a module belongs to the group of its longest matching prefix (the root
# package only to its own).
GROUPS = {
    "udn_kernels.cli": "cli",
    "udn_kernels.__main__": "cli",
    "udn_kernels.train": "app",
    "udn_kernels.experiments": "app",
    "udn_kernels.bench": "app",
    "udn_kernels._cli_support": "app",
    "udn_kernels.selftest": "app",
    "udn_kernels.integrations": "integrations",  # model-library glue on the public API
    "udn_kernels.nn": "nn",
    "udn_kernels": "api",  # re-exports the ops, rng and backend selection
    "udn_kernels.ops": "api",
    "udn_kernels.rng": "api",
    "udn_kernels._backend": "dispatch",
    "udn_kernels.reference": "kernels",
    "udn_kernels.triton": "kernels",
    "udn_kernels._C": "kernels",
    "udn_kernels._C_avx2": "kernels",
    "udn_kernels._C_avx512": "kernels",
    "udn_kernels._extension": "kernels",  # loads the C++ module this CPU runs
    "udn_kernels._formulas": "base",
    "udn_kernels._checks": "base",
    "udn_kernels._build_targets": "base",  # setup.py's flag choice, no imports
    "udn_kernels.metrics": "base",
    "udn_kernels.data": "base",
}

# The groups a group may import besides itself.
ALLOWED = {
    "cli": {"app", "integrations", "nn", "api", "dispatch", "kernels", "base"},
    "app": {"integrations", "nn", "api", "dispatch", "kernels", "base"},
    "integrations": {"nn", "api", "base"},
    "nn": {"api", "base"},  # models use the public ops and rng, never a backend directly
    "api": {"dispatch", "kernels", "base"},
    "dispatch": {"kernels", "base"},
    "kernels": {"base"},
    "base": set(),
}

def _modules() -> dict[str, pathlib.Path]:
    """Module name -> source path of every module of the package (a package by its __init__)."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()
KNOWN = set(MODULES) | {f"{ROOT}._C"}  # the compiled extension has no source here


def _deepest_module(name: str) -> str | None:
    """``name`` or its longest prefix that is a module of the package (None if outside it)."""
    while name not in KNOWN:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _is_import_module(node: ast.AST) -> bool:
    """``import_module("literal")`` or ``importlib.import_module("literal")``."""
    return (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
            == "import_module" and bool(node.args) and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str))


def _imported_names(package: str, tree: ast.AST):
    """Full names of what the import statements of a module of ``package`` import (modules or
    names defined in a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0], base]))
            # `from a import b` imports module a.b when there is one, else a name of module a
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif _is_import_module(node):
            yield node.args[0].value


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules its import statements name (the deepest module of each)."""
    imports = {}
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        names = _imported_names(package, ast.parse(path.read_text(), str(path)))
        imports[module] = {_deepest_module(name) for name in names} - {None, module}
    return imports


def _ancestors(module: str) -> set[str]:
    return {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}


def _runs(module: str, target: str) -> set[str]:
    """``target`` and the packages above it that importing it runs: not the importer's own
    ancestors, which Python imported before the importer (the root package among them)."""
    return (_ancestors(target) - _ancestors(module)) | {target}


IMPORTS = _imports()
GRAPH = {module: set().union(*(_runs(module, t) for t in targets))
         - {module} for module, targets in IMPORTS.items()}


def _group(module: str) -> str | None:
    prefixes = [p for p in GROUPS if module == p or (p != ROOT and module.startswith(p + "."))]
    return GROUPS[max(prefixes, key=len)] if prefixes else None


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(child) == "open":
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_the_parser_sees_every_kind_of_import():
    source = """
import udn_kernels
from .. import rng, gaussian_linear
from ..reference import philox as p
def f():
    from .udn import UDN
    importlib.import_module("udn_kernels._C")
"""
    names = set(_imported_names("udn_kernels.nn", ast.parse(source)))
    assert {_deepest_module(n) for n in names} == {
        ROOT, "udn_kernels.rng", "udn_kernels.reference.philox", "udn_kernels.nn.udn", "udn_kernels._C"}
    assert _runs("udn_kernels.nn.layers", "udn_kernels.reference.philox") == {
        "udn_kernels.reference", "udn_kernels.reference.philox"}
    assert _runs("udn_kernels.reference.heads", "udn_kernels.reference.philox") == {"udn_kernels.reference.philox"}
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in sorted(KNOWN) if _group(m) is None]
    assert not unplaced, f"add to GROUPS: {unplaced}"


def test_no_import_cycles():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_layers():
    upward = [f"{module} ({_group(module)}) imports {target} ({_group(target)})"
              for module in sorted(GRAPH) for target in sorted(GRAPH[module])
              if _group(target) != _group(module) and _group(target) not in ALLOWED[_group(module)]]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)
