"""The package's folders are its layers (docs/design.md §2): imports only go down, never in a cycle,
and deepspeed is imported only by the runtime layer and the tools."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hdpo_ds"

# Lower rank = lower layer. A module may import its own folder, or any folder of a strictly lower rank.
LAYERS = {
    "common": 0,
    "objectives": 1,
    "monitoring": 1,
    "data": 1,
    "config": 2,
    "runtime": 3,
    "tracking": 3,
    "reference": 4,
    "recipes": 5,
    "tools": 6,
    "cli": 7,
    "examples": 8,
}
DEEPSPEED_LAYERS = {"runtime", "tools"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, including those inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # from hdpo_ds.runtime import dist imports the module hdpo_ds.runtime.dist
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, s) for s in submodules if s in MODULES] or [(node.lineno, node.module)]
    return found


def test_every_module_is_in_a_declared_layer():
    unplaced = [m for m in MODULES if m != "hdpo_ds" and _layer(m) not in LAYERS]
    assert not unplaced, f"add these to a layer (and docs/design.md §2): {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "hdpo_ds"))
def test_imports_go_down(module):
    layer = _layer(module)
    upward = []
    for line, imported in _imports(MODULES[module]):
        target = _layer(imported) if imported.startswith("hdpo_ds.") else None
        if target is None or target == layer:
            continue
        if LAYERS[target] >= LAYERS[layer]:
            upward.append(f"line {line}: {imported} ({target}, rank {LAYERS[target]})")
    assert not upward, f"{module} ({layer}, rank {LAYERS[layer]}) imports up or sideways: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "hdpo_ds"))
def test_deepspeed_only_in_runtime_and_tools(module):
    uses = [line for line, imported in _imports(MODULES[module]) if imported.split(".")[0] == "deepspeed"]
    if _layer(module) not in DEEPSPEED_LAYERS:
        assert not uses, f"{module} imports deepspeed at lines {uses}"


def test_no_import_cycle():
    graph = {
        m: {i for _, i in _imports(p) if i in MODULES and i != m and MODULES[i].name != "__init__.py"}
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checks_see_an_upward_import(tmp_path):
    """The rules are not vacuous: an objective importing the runtime and deepspeed is seen as such."""
    bad = tmp_path / "bad.py"
    bad.write_text("from hdpo_ds.runtime import dist\nimport deepspeed\n")
    imported = [i for _, i in _imports(bad)]
    assert imported == ["hdpo_ds.runtime.dist", "deepspeed"]
    assert LAYERS[_layer(imported[0])] > LAYERS["objectives"]
    # and the real graph has edges through `from package import module`
    edges = {i for _, i in _imports(MODULES["hdpo_ds.recipes.preference"])}
    assert {"hdpo_ds.runtime.dist", "hdpo_ds.runtime.engine", "hdpo_ds.objectives.objective"} <= edges
