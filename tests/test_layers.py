"""The package's layer rule, read from the source: a module imports only from its own layer or the layers below.

model (with kernels) <- engine <- pipeline <- commands, stream, bench, demo. Every import counts: at module
level, inside functions, under TYPE_CHECKING, and importlib.import_module("...") with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import framepack_rt

REPO = Path(__file__).resolve().parents[1]
# Where each installed package's source lives (setup.py maps kernels/ and stream/ into framepack_rt).
SOURCES = {"framepack_rt": REPO / "framepack_rt", "framepack_rt.kernels": REPO / "kernels",
           "framepack_rt.stream": REPO / "stream"}
LAYERS = {"model": 0, "kernels": 0, "engine": 1, "pipeline": 2, "commands": 3, "stream": 3, "bench": 3, "demo": 3}
LAYER_NAMES = ["model", "engine", "pipeline", "commands / stream / bench / demo"]


def modules() -> dict[str, Path]:
    found = {}
    for package, root in SOURCES.items():
        for path in root.rglob("*.py"):
            if "weights" in path.parts or (package == "framepack_rt" and path.relative_to(root).parts[0] in
                                           ("kernels", "stream")):
                continue
            parts = [*package.split("."), *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "framepack_rt" or len(parts) < 2:
        return None  # the top-level facade, or not ours
    return LAYERS[parts[1]]


def imports_of(path: Path, module: str, known: set[str], lazy_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    body = ast.walk(tree) if not lazy_only else iter(tree.body)
    for node in body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in known:
                    names.add(full)
                elif target == "framepack_rt" and alias.name in framepack_rt._LAZY:
                    names.add(framepack_rt._LAZY[alias.name])
                else:
                    names.add(target)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return {n for n in names if n.startswith("framepack_rt")}


def test_every_layer_exists_and_every_module_is_in_one():
    found = modules()
    assert {m.split(".")[1] for m in found if m.count(".")} == set(LAYERS)
    assert len(found) > 60


def test_modules_import_only_their_own_layer_or_below():
    found = modules()
    violations = []
    for module, path in found.items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target in imports_of(path, module, set(found)):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                violations.append(f"{module} ({LAYER_NAMES[mine]}) imports {target} ({LAYER_NAMES[theirs]})")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a model-layer module that imports the pipeline is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from framepack_rt.pipeline.framepack_pipeline import FramePackPipeline\n"
                   "    import importlib\n    importlib.import_module('framepack_rt.stream.server')\n")
    targets = imports_of(bad, "framepack_rt.model.bad", set(modules()))
    assert {layer_of(t) for t in targets} == {2, 3}


def test_no_import_cycle_at_module_level():
    """Module-level imports form no cycle (model.transformer and model.checkpoint used to import each other)."""
    found = modules()
    graph = {m: {t for t in imports_of(p, m, set(found), lazy_only=True) if t in found and t != m}
             for m, p in found.items()}
    for module in graph:  # a package imports its own __init__ first: not a cycle of ours
        graph[module] -= {p for p in graph if module.startswith(p + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
