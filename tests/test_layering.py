"""The package's layering, read from the source (imports parsed with ``ast``, nothing imported):

* no ``ssl_ad`` import inside a function or class (they hid import cycles before);
* no import cycle between modules;
* each unit (a top-level module, or a subpackage with its modules) imports only units of lower
  layers: shared infrastructure at the bottom, then models and data, methods, evaluation, the
  trainer (which runs evaluation's AD monitor), and the tools built on both.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssl_ad"

LAYERS = [
    {"ssl_ad", "ssl_ad.errors", "ssl_ad.atomic", "ssl_ad.progress"},
    {"ssl_ad.cli", "ssl_ad.config_lists", "ssl_ad.config_defaults", "ssl_ad.schedules", "ssl_ad.sharding",
     "ssl_ad.checkpointing", "ssl_ad.event_files"},
    {"ssl_ad.models", "ssl_ad.data"},
    {"ssl_ad.config_check", "ssl_ad.methods", "ssl_ad.figures"},
    {"ssl_ad.evaluation"},  # never imports train (the trainer imports its AD monitor, as big_vision's evaluators)
    {"ssl_ad.train"},
    {"ssl_ad.ablation", "ssl_ad.convert"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, bool, int]]:
    """(imported ssl_ad module, at module level?, line) for every import statement of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # 'from ssl_ad import sharding' imports the module ssl_ad.sharding
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, id(node) not in nested, node.lineno))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_unit_has_a_layer():
    assert sorted({_unit(m) for m in MODULES} - set(LAYER_OF)) == []


def test_no_ssl_ad_import_inside_functions():
    local = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
             for name, edges in GRAPH.items() for target, top, line in edges if not top]
    assert local == []


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for target, _, _ in GRAPH[m]:
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)
    assert cycles == []


def test_units_import_only_lower_layers():
    bad = []
    for name, edges in GRAPH.items():
        for target, _, line in edges:
            a, b = _unit(name), _unit(target)
            if a != b and LAYER_OF[b] >= LAYER_OF[a]:
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {a} (layer {LAYER_OF[a]}) imports {b} "
                           f"(layer {LAYER_OF[b]})")
    assert bad == []


def test_the_parser_sees_imports():
    # guards the test itself: known edges are found
    assert ("ssl_ad.sharding", True) in {(t, top) for t, top, _ in GRAPH["ssl_ad.train.loop"]}
    assert any(t == "ssl_ad.methods.base" for t, _, _ in GRAPH["ssl_ad.train.step"])
