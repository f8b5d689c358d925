"""The house rules of the source tree, read from the source (ast), so they stay true:
the data path reads one way (capture -> IR -> passes -> runtime -> artifacts -> API ->
tooling -> CLI), no import circles (imports inside functions counted too), no object's
private attribute written from outside it, no unused private function, short functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> the package it installs as (setup.py package_dir).
PACKAGES = {"fmecompile": "fmecompile", "passes": "fmecompile.passes", "kernels": "fmecompile.kernels"}

# Layers of the data path, first to last; a module may import its own layer and earlier ones.
# A pattern names a module, or with ".*" a package and everything in it; the first layer
# with a matching pattern is a module's layer.
LAYERS = [
    ("foundation", ("fmecompile.version", "fmecompile.errors", "fmecompile.messages", "fmecompile.progress",
                    "fmecompile.runtime", "fmecompile.runtime.distributed",
                    "fmecompile.runtime.loop", "fmecompile.runtime.sharded", "fmecompile.ir")),
    ("pass declarations", ("fmecompile.passes.registry", "fmecompile.passes.group.patterns",
                           "fmecompile.passes")),  # the bare package: a docstring
    ("config", ("fmecompile.config",)),
    ("capture and kernels", ("fmecompile.diagnose", "fmecompile.runtime.offload", "fmecompile.capture",
                             "fmecompile.signature", "fmecompile.model_state",
                             "fmecompile.kernels.*")),
    ("passes", ("fmecompile.passes.*",)),
    ("runtime", ("fmecompile.contract", "fmecompile.runtime.cuda_graphs", "fmecompile.runtime.capture_safety",
                 "fmecompile.runtime.inductor_bodies",
                 "fmecompile.rehash", "fmecompile.runtime.program")),
    ("program files", ("fmecompile.graph_file", "fmecompile.archive", "fmecompile.compile_cache")),
    ("compiled modules", ("fmecompile.compiled", "fmecompile.backend")),
    ("artifacts", ("fmecompile.artifacts",)),
    # The model zoo and the pipelines built from the shipped configs, which fme.plan builds by name.
    ("models", ("fmecompile.tools.zoo", "fmecompile.tools.pipelines")),
    ("api", ("fmecompile.check", "fmecompile.install", "fmecompile.planner", "fmecompile.optimize",
             "fmecompile")),  # the bare package: the public API
    ("tooling", ("fmecompile.tools.*",)),
    ("cli", ("fmecompile.cli",)),
]
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The fmecompile modules `name` imports, anywhere in its source."""
    tree = ast.parse(MODULES[name].read_text())
    here = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        package = pattern[:-2]
        return name == package or name.startswith(package + ".")
    return name == pattern


def _layer(name: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(_matches(name, p) for p in patterns):
            return index
    raise AssertionError(f"{name} belongs to no layer of this test; add it to LAYERS")


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_module_imports_a_later_layer():
    backwards = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
                 for a, targets in GRAPH.items() for b in targets if _layer(b) > _layer(a)]
    assert not backwards, "\n".join(backwards)


def test_passes_and_kernels_import_no_runtime_or_tooling():
    runtime = _layer("fmecompile.rehash")
    offending = [f"{a} imports {b}" for a, targets in GRAPH.items() for b in targets
                 if a.startswith(("fmecompile.passes", "fmecompile.kernels")) and _layer(b) >= runtime]
    assert not offending, "\n".join(offending)


def test_no_import_circles():
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_attribute_written_from_outside(name):
    """`x._field = ...` (or `setattr(x, "_field", ...)`) only on self or cls."""
    tree = ast.parse(MODULES[name].read_text())
    offending = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for part in ast.walk(target):
                if (isinstance(part, ast.Attribute) and part.attr.startswith("_") and not part.attr.startswith("__")
                        and not (isinstance(part.value, ast.Name) and part.value.id in ("self", "cls"))):
                    offending.append(f"line {node.lineno}: {ast.unparse(target)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")):
            offending.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not offending, offending


@pytest.mark.parametrize("name", sorted(MODULES))
def test_private_module_functions_are_used(name):
    source = MODULES[name].read_text()
    tree = ast.parse(source)
    unused = [f.name for f in tree.body if isinstance(f, (ast.FunctionDef, ast.ClassDef))
              and f.name.startswith("_") and not f.name.startswith("__") and f.name != "_"
              and source.count(f.name) == 1]
    assert not unused, f"{name} defines {unused} and never uses them"


def test_functions_are_short():
    long = [f"{name}.{f.name}: {f.end_lineno - f.lineno + 1} lines"
            for name, path in MODULES.items() for f in _functions(ast.parse(path.read_text()))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_structure_test_sees_the_tree():
    """Guards against a test that checks nothing: the modules and edges it reads exist."""
    assert {"fmecompile.ir", "fmecompile.passes.slice.codegen", "fmecompile.kernels.group_norm"} <= set(MODULES)
    assert "fmecompile.ir" in GRAPH["fmecompile.capture"]
    assert "fmecompile.passes.slice.plan" in GRAPH["fmecompile.passes.slice.slicer"]
