"""The package's folders are its layers (docs/design.md §2): imports only go down, never in a cycle,
and deepspeed is imported only by the runtime layer and the tools."""

from __future__ import annotations

import ast
import pathlib
import re

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


# ---- docs/design.md: §2 names every module, and every citation of a section points at one that exists

DESIGN = ROOT / "docs" / "design.md"
# The numbers the code cites; a renumbering would silently change what every citation means.
DESIGN_SECTIONS = {
    1: "Data flow",
    2: "Layout",
    3: "Contracts",
    4: "The math",
    5: "Distributed rules",
    6: "Recipes",
    7: "Tests and benchmarks",
    8: "Style",
}
# "docs/design.md §4", "docs/design.md §4, §8", "docs/design.md §4-5" (a range names both ends and between)
_CITATION = re.compile(r"docs/design\.md((?:[ \t]*,?[ \t]*§[ \t]*\d+(?:[ \t]*[-–][ \t]*\d+)?)+)")
_CITED = re.compile(r"§[ \t]*(\d+)(?:[ \t]*[-–][ \t]*(\d+))?")


def _design_sections() -> dict[int, tuple[str, str]]:
    """Section number -> (title, text) of the `## N. Title` sections of docs/design.md."""
    parts = re.split(r"^## (\d+)\. (.+)$", DESIGN.read_text(), flags=re.MULTILINE)
    return {
        int(n): (title.strip(), text)
        for n, title, text in zip(parts[1::3], parts[2::3], parts[3::3], strict=True)
    }


def _cited_sections(text: str) -> set[int]:
    cited = set()
    for match in _CITATION.finditer(text):
        for first, last in _CITED.findall(match.group(1)):
            cited.update(range(int(first), int(last or first) + 1))
    return cited


def _listed_modules() -> list[str]:
    """Module files the layout must name, relative to hdpo_ds/; an __init__.py holding only a docstring is a
    package marker, not a module with contents."""
    listed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        body = ast.parse(path.read_text()).body
        if path.name == "__init__.py" and all(
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body
        ):
            continue
        listed.append(path.relative_to(PACKAGE).as_posix())
    return listed


def test_design_sections_keep_their_numbers():
    titles = {n: title for n, (title, _) in _design_sections().items()}
    assert titles == DESIGN_SECTIONS


def test_every_module_is_named_in_design_section_2():
    modules = _listed_modules()
    assert "runtime/attention.py" in modules and "data/__init__.py" in modules  # the walk sees the package
    layout = _design_sections()[2][1]
    unnamed = [m for m in modules if f"`{m}`" not in layout]
    assert not unnamed, f"name these modules in docs/design.md §2 (one line each): {unnamed}"


def test_every_design_citation_names_an_existing_section():
    sections = set(_design_sections())
    citing = [p for d in ("hdpo_ds", "launch", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    found, dangling = 0, []
    for path in citing:
        cited = _cited_sections(path.read_text())
        found += len(cited)
        dangling += [f"{path.relative_to(ROOT)}: §{n}" for n in sorted(cited - sections)]
    assert found > 0, "no docs/design.md citation found: the pattern no longer matches how the code cites"
    assert not dangling, f"citations of sections docs/design.md does not have: {dangling}"


def test_the_citation_pattern_reads_lists_and_ranges():
    doc = "docs/design.md"  # joined at run time, so that this file cites no missing section itself
    text = f"see {doc} §4, §8 and ({doc} §4-5); {doc} §12; {doc} alone"
    assert _cited_sections(text) == {4, 5, 8, 12}
    assert 12 not in _design_sections()  # so the last citation above would be reported as dangling
