"""The serving side (retrieval/, webapp/) and the shared readers (catalog/) never import torch; the packages
import each other only downwards, along LAYERS; training resolves a config without FAISS or ONNX Runtime."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = ["core", "catalog", "retrieval", "webapp"]


def _modules(package: str) -> list[str]:
    return [package] + [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(ROOT / package)])]


@pytest.mark.parametrize("package", TORCH_FREE)
def test_package_never_imports_torch(package: str) -> None:
    modules = _modules(package)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not leaked, leaked[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cli_parser_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom sct.cli import build_parser\nbuild_parser()\n"
        "assert 'torch' not in sys.modules and 'training.trainer' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_check_itself_catches_torch() -> None:
    """The same probe on a module that does import torch must fail, or the tests above prove nothing."""
    code = "import sys, training.model\nassert 'torch' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0


# --- The layers of the packages ----------------------------------------------------------------------------------

#: The packages, bottom first: a package imports only from the layers below its own (docs/ARCHITECTURE.md's table
#: of packages lists the library layers in this order). Within a layer, packages do not import each other, except
#: in the top one (scripts and tests, which may share fixtures).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("catalog",),
    ("retrieval",),
    ("training", "webapp"),
    ("sct",),
    ("benchmarks", "experiments", "tests"),
)
#: The packages of docs/ARCHITECTURE.md's table: every layer but the top one.
LIBRARY_PACKAGES = [package for layer in LAYERS[:-1] for package in layer]


def module_files(root: Path, packages: Sequence[str]) -> dict[str, Path]:
    """Dotted module name → file, for every .py file under each package folder of ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` (or their packages) that ``module`` imports anywhere in its file, function bodies
    included; imports under ``if TYPE_CHECKING:`` are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            for child in node.orelse:  # the else branch still runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name.split(".")[0] in {k.split(".")[0] for k in known}}


def import_graph(root: Path, packages: Sequence[str]) -> dict[str, set[str]]:
    """module → the first-party modules (of ``packages``) it imports."""
    files = module_files(root, packages)
    known = set(files)
    return {module: imported_modules(module, path, known) for module, path in files.items()}


def layer_violations(graph: Mapping[str, set[str]], layers: Sequence[Sequence[str]]) -> list[str]:
    """Every import that goes up a layer, or sideways between two packages of one layer (but the top one)."""
    rank = {package: position for position, layer in enumerate(layers) for package in layer}
    top = len(layers) - 1
    wrong = []
    for module, targets in sorted(graph.items()):
        source = module.split(".")[0]
        for target in sorted(targets):
            package = target.split(".")[0]
            if package == source or package not in rank:
                continue
            if rank[package] > rank[source] or (rank[package] == rank[source] != top):
                wrong.append(f"{module} imports {target} ({source} may not import {package})")
    return wrong


def module_cycles(graph: Mapping[str, set[str]], package: str) -> list[list[str]]:
    """The import cycles among the modules of ``package`` (each a strongly connected component of 2+ modules,
    or a module importing itself), found with Tarjan's algorithm."""
    inside = {
        m: {t for t in ts if t.split(".")[0] == package and t in graph}
        for m, ts in graph.items()
        if m.split(".")[0] == package
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(inside[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in inside[node]:
                cycles.append(sorted(component))

    for node in sorted(inside):
        if node not in index:
            connect(node)
    return cycles


ALL_PACKAGES = [package for layer in LAYERS for package in layer]


def test_no_import_goes_up_a_layer_or_between_training_and_webapp() -> None:
    graph = import_graph(ROOT, ALL_PACKAGES)
    assert len(graph) > 100  # the walk found the project's modules
    assert layer_violations(graph, LAYERS) == []


def test_nothing_but_sct_imports_sct() -> None:
    graph = import_graph(ROOT, ALL_PACKAGES)
    importers = sorted(
        m
        for m, targets in graph.items()
        if any(t.split(".")[0] == "sct" for t in targets)
        and m.split(".")[0] not in ("sct", "benchmarks", "experiments", "tests")
    )
    assert importers == []


# Not sct: sct.demo runs its steps through sct.cli.main, which registers sct.demo (both imports in functions).
@pytest.mark.parametrize("package", ["core", "catalog", "retrieval", "training", "webapp"])
def test_no_import_cycle_between_the_modules_of_a_package(package: str) -> None:
    assert module_cycles(import_graph(ROOT, ALL_PACKAGES), package) == []


def test_the_checker_reports_an_upward_import_a_sideways_one_and_a_cycle(tmp_path: Path) -> None:
    """The same checks on a tiny package tree that breaks each rule, or the tests above prove nothing."""
    files = {
        "core/__init__.py": "",
        "core/low.py": "def helper():\n    from retrieval import high  # upward, inside a function\n",
        "retrieval/__init__.py": "",
        "retrieval/high.py": "from core.low import helper\n",
        "training/__init__.py": "",
        "training/a.py": "from . import b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import webapp.w\n",
        "training/b.py": "import training.a\nimport webapp.w\n",  # a cycle with a.py, and sideways
        "webapp/__init__.py": "",
        "webapp/w.py": "import numpy\nfrom retrieval.high import helper\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ["core", "retrieval", "training", "webapp"])
    layers = (("core",), ("retrieval",), ("training", "webapp"), ("sct",))
    assert layer_violations(graph, layers) == [
        "core.low imports retrieval.high (core may not import retrieval)",
        "training.b imports webapp.w (training may not import webapp)",
    ]  # training.a's import of webapp is under TYPE_CHECKING; webapp.w's of retrieval goes down
    assert module_cycles(graph, "training") == [["training.a", "training.b"]]
    assert module_cycles(graph, "retrieval") == []


def _architecture_table_packages() -> list[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("## Packages", 1)[1].split("\n\n", 2)[1]
    return [line.split("|")[1].strip().strip("`").rstrip("/") for line in table.splitlines()[2:]]


def test_the_architecture_table_lists_the_layers_in_order() -> None:
    assert _architecture_table_packages() == LIBRARY_PACKAGES


def test_training_resolves_a_config_and_builds_its_parser_without_faiss_onnx_runtime_or_a_cli_of_another_package() -> (
    None
):
    code = (
        "import argparse, sys\n"
        "import training.config, training.trainer\n"
        "from training import cli\n"
        "cli.register(argparse.ArgumentParser().add_subparsers())\n"
        "training.config.resolve_config('cub', 'data', 'out', cuda_available=False)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'onnxruntime', 'webapp', 'flask')\n"
        "                or m in ('retrieval.cli', 'webapp.cli', 'sct.cli'))\n"
        "assert not leaked, leaked[:8]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_core_imports_no_heavy_library() -> None:
    modules = _modules("core")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "heavy = ('torch', 'torchvision', 'faiss', 'onnxruntime', 'flask', 'PIL', 'catalog', 'retrieval')\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not leaked, leaked[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
