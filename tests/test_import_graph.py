"""The package's import graph reads top-down and has no cycles.

Every import statement of every module under ``udn_kernels/`` counts, at module or function
level, relative or absolute, plus ``importlib.import_module("udn_kernels....")`` with a literal
name. Importing ``a.b.c`` also runs the package ``a.b``, so that is an edge too; the root package
``udn_kernels`` is an edge only when named itself (``import udn_kernels``, ``from .. import op``):
it re-exports the public API (the ops, ``rng``, backend selection) and belongs to that layer.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = "udn_kernels"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / ROOT

# Layers, top to bottom: each module belongs to the group of its longest matching prefix.
GROUPS = {
    "udn_kernels.cli": "cli",
    "udn_kernels.__main__": "cli",
    "udn_kernels.train": "app",
    "udn_kernels.experiments": "app",
    "udn_kernels.bench": "app",
    "udn_kernels._cli_support": "app",
    "udn_kernels.nn": "nn",
    "udn_kernels": "api",  # the package itself: re-exports the ops, rng and backend selection
    "udn_kernels.ops": "api",
    "udn_kernels.rng": "api",
    "udn_kernels._backend": "dispatch",  # picks a kernel backend: imports the kernel packages
    "udn_kernels.reference": "kernels",
    "udn_kernels.triton": "kernels",
    "udn_kernels._C": "kernels",
    "udn_kernels._formulas": "base",
    "udn_kernels._checks": "base",
    "udn_kernels.metrics": "base",
    "udn_kernels.data": "base",
}

# The groups a group may import besides itself.
ALLOWED = {
    "cli": {"app", "nn", "api", "dispatch", "kernels", "base"},
    "app": {"nn", "api", "dispatch", "kernels", "base"},
    "nn": {"api", "base"},  # models use the public ops and rng, never a backend directly
    "api": {"dispatch", "kernels", "base"},
    "dispatch": {"kernels", "base"},
    "kernels": {"base"},
    "base": set(),
}

# (importer, imported) statements tolerated for now: removed by the triton branch.
KNOWN_EXCEPTIONS = {
    ("udn_kernels.reference.stochastic_linear", "udn_kernels.ops._stochastic"),
    ("udn_kernels.triton.heads", "udn_kernels.ops.heads"),
    ("udn_kernels.triton.stochastic_linear", "udn_kernels.ops._stochastic"),
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


def _imported_names(module: str, tree: ast.AST):
    """Full names of what each import statement of ``module`` imports (possibly not modules)."""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` imports module a.b when there is one, else a name of module a
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            yield node.args[0].value


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules its import statements name (the deepest module of each)."""
    imports = {}
    for module, path in MODULES.items():
        names = _imported_names(module, ast.parse(path.read_text(), str(path)))
        imports[module] = {_deepest_module(name) for name in names} - {None, module}
    return imports


def _ancestors(module: str) -> set[str]:
    return {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}


def _runs(module: str, target: str) -> set[str]:
    """``target`` and the packages above it that importing it runs: not the importer's own
    ancestors, which Python imported before the importer (the root package among them)."""
    return (_ancestors(target) - _ancestors(module)) | {target}


IMPORTS = _imports()
GRAPH = {module: set().union(*(_runs(module, t) for t in targets if (module, t) not in KNOWN_EXCEPTIONS))
         - {module} for module, targets in IMPORTS.items()}


def _group(module: str) -> str | None:
    prefixes = [p for p in GROUPS if module == p or module.startswith(p + ".")]
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
    # a module-level relative import, a function-level one, `import udn_kernels` and import_module
    assert "udn_kernels._checks" in GRAPH["udn_kernels.rng"]
    assert "udn_kernels.reference" in GRAPH["udn_kernels._backend"]
    assert ROOT in GRAPH["udn_kernels.nn.layers"]
    assert "udn_kernels._C" in GRAPH["udn_kernels._backend"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_module_belongs_to_a_layer():
    assert [m for m in sorted(KNOWN) if _group(m) is None] == []


def test_known_exceptions_are_still_imports():
    """Delete an entry once its import is gone (the list should end up empty)."""
    assert [(m, t) for m, t in sorted(KNOWN_EXCEPTIONS) if t not in IMPORTS.get(m, ())] == []


def test_no_import_cycles():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_layers():
    upward = [f"{module} ({_group(module)}) imports {target} ({_group(target)})"
              for module in sorted(GRAPH) for target in sorted(GRAPH[module])
              if _group(target) != _group(module) and _group(target) not in ALLOWED[_group(module)]]
    assert upward == []
