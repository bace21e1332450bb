"""The product's import layers, read from the source (ast, nothing imported): a module imports only
its own package and the layers below it, so the low layers can be used and tested alone.

Low to high:
  0. renderers, geometry: tensors in, buffers out (geometry uses the rasterizer and the mesh normals
     of renderers; renderers imports nothing of the project)
  1. guidance: the 2D models SDS distils (uses renderers: cameras, the prior's library renders)
  2. stages: the run's configuration, plan, stages and pipeline
  3. batch (Ray), bench (benchmarks): built on the stages, not on each other
  4. app_gpu, app_queue, app_warmup: what the Gradio app needs beyond its handlers (where a run gets its
     GPU, the line of runs, the prior's libraries loaded at start)
  5. app_support: the runs that outlive their page and the status line (uses the line's text helpers)
  6. app_examples, app_page, app_plan: the page's examples, its layout, and the plan from its fields
  7. app, generate: the entry points
Imports inside functions count as much as those at the top of a file.
"""
import ast
import importlib
from pathlib import Path

import pytest

from tests.helpers import ROOT

LAYERS = {
    "renderers": 0, "geometry": 0, "guidance": 1, "stages": 2, "batch": 3, "bench": 3,
    "app_gpu": 4, "app_queue": 4, "app_warmup": 4, "app_support": 5, "app_examples": 6, "app_page": 6, "app_plan": 6,
    "app": 7, "generate": 7,
}
NOT_PRODUCT = {"tests", "docs", "examples", "shared"}  # folders of the checkout that are not importable code


def _product_files() -> list[Path]:
    files = sorted(ROOT.glob("*.py"))
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if folder.name not in NOT_PRODUCT:
            files += sorted(folder.rglob("*.py"))
    return files


def _unit(path: Path) -> str:
    """The layer unit of a file: its top-level package, or the module's name for a top-level file."""
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imported_units(path: Path) -> set[tuple[str, int]]:
    """(project unit, line) for every absolute import of a project unit in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update((name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in LAYERS)
    return found


def test_every_product_module_has_a_layer():
    units = {_unit(path) for path in _product_files()}
    assert units >= {"renderers", "geometry", "guidance", "stages", "batch", "app", "generate"}
    missing = sorted(units - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_no_layer_imports_a_higher_or_a_sibling_one():
    wrong = []
    for path in _product_files():
        unit = _unit(path)
        for other, line in sorted(_imported_units(path)):
            if other != unit and LAYERS[other] >= LAYERS[unit] and not (LAYERS[other] == LAYERS[unit] == 0):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({unit}, layer {LAYERS[unit]}) imports "
                             f"{other} (layer {LAYERS[other]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_two_units_import_each_other():
    edges = {(_unit(path), other) for path in _product_files() for other, _ in _imported_units(path)}
    cycles = sorted((a, b) for a, b in edges if a != b and (b, a) in edges)
    assert not cycles, f"these packages import each other: {cycles}"


@pytest.mark.parametrize("source, ok", [
    ("from stages.plan import resolve", False),
    ("def f():\n    import batch.plan", False),
    ("from renderers.cameras import sample_cameras", True),
    ("from .sds import SDSLoss", True),  # relative: inside the package
])
def test_the_check_sees_imports_at_the_top_and_inside_functions(tmp_path, source, ok):
    path = tmp_path / "module.py"
    path.write_text(source + "\n")
    higher = {unit for unit, _ in _imported_units(path) if LAYERS[unit] > LAYERS["guidance"]}
    assert (not higher) == ok


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("name", [_module_name(path) for path in _product_files()])
def test_every_product_module_imports(name):
    # The fast tier (-m "not slow") leaves out whole runs; this keeps every module imported by it.
    importlib.import_module(name)
