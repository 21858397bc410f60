"""The package's rooms and doors: every module imports, no import cycles, layers only import downwards.

The allowed dependencies are data (``MAY_IMPORT``), read together with
``docs/architecture.md``. Imports inside functions count too: a lazy import is
still a dependency, only a cheaper one.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import nemo_surgery

PACKAGE_DIR = Path(nemo_surgery.__file__).parent
#: Lines above which a module must say in its docstring why it is not split ("Size: ...").
MAX_LINES = 350

#: Room of a module -> rooms it may import. A room is the first package level below nemo_surgery
#: ("engine", "surgery", ...) or a top-level module name ("neuron_set", "errors", ...).
BASE = {"errors", "console", "atomic", "provenance", "keymap", "neuron_set", "schema", "__init__"}
MAY_IMPORT: dict[str, set[str]] = {
    "__init__": set(),
    "errors": {"__init__"},
    "console": {"__init__"},
    "atomic": {"__init__"},
    "keymap": {"__init__"},
    "schema": {"__init__", "errors"},
    "provenance": {"__init__", "errors", "schema"},
    "neuron_set": {"__init__", "errors", "atomic", "provenance", "keymap", "schema"},
    "demo": {"__init__"},
    "surgery": BASE,
    "engine": BASE | {"surgery"},  # torch-free byte readers (headers, the byte-level fingerprint); never the reverse
    "verify": BASE | {"engine", "surgery", "demo"},  # demo: the scene world and checker (verify/scenes.py)
    "workflow": BASE | {"surgery", "verify", "engine"},
    "cli": BASE | {"engine", "surgery", "verify", "workflow", "demo", "cli"},
    "__main__": {"cli"},
}
#: Rooms that must not import torch even lazily: apply never loads a model; --help stays fast.
TORCH_FREE = {"surgery", "neuron_set", "provenance", "schema", "keymap", "atomic", "errors", "console", "demo"}


def _modules() -> list[str]:
    names = ["nemo_surgery"]
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="nemo_surgery."):
        names.append(info.name)
    return sorted(names)


def _path(module: str) -> Path:
    rel = module.split(".")[1:]
    pkg = PACKAGE_DIR.joinpath(*rel)
    return pkg / "__init__.py" if pkg.is_dir() else pkg.with_suffix(".py")


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, known: set[str]) -> set[str]:
    """Every module of the package (and 'torch') that `module` imports, at any depth of its code."""
    tree = ast.parse(_path(module).read_text(encoding="utf-8"))
    is_pkg = _path(module).name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "torch":
                out.add("torch")
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("nemo_surgery") and target != module:
                out.add(target)
    return out


MODULES = _modules()
GRAPH = {m: _imports(m, set(MODULES)) for m in MODULES}


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycles():
    graph = {m: {t for t in deps if t in GRAPH} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "nemo_surgery":  # the root package only holds __version__
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module)


def test_rooms_only_import_what_the_architecture_allows():
    bad = []
    for module, deps in GRAPH.items():
        room = _room(module)
        allowed = MAY_IMPORT.get(room)
        assert allowed is not None, f"{module}: room {room!r} is not in MAY_IMPORT (add it with its allowed imports)"
        for dep in deps - {"torch"}:
            if _room(dep) != room and _room(dep) not in allowed:
                bad.append(f"{module} imports {dep}")
        if room in TORCH_FREE and "torch" in deps:
            bad.append(f"{module} imports torch")
    assert not bad, "; ".join(sorted(bad))


def test_modules_are_small_or_say_why():
    long = []
    for module in MODULES:
        path = _path(module)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > MAX_LINES and "Size:" not in doc:
            long.append(f"{module} ({lines} lines)")
    assert not long, f"modules over {MAX_LINES} lines without a 'Size:' reason in their docstring: {long}"


def test_the_checker_sees_a_cycle_and_a_forbidden_door():
    """The graph walker is not blind: known edges are found (else the tests above could not fail)."""
    assert "nemo_surgery.cli.common" in GRAPH["nemo_surgery.cli.main"]
    assert "nemo_surgery.engine.layers" in GRAPH["nemo_surgery.engine.hooks"]
    assert "torch" in GRAPH["nemo_surgery.engine.hooks"]
