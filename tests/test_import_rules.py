"""The serving side (retrieval/, webapp/) and the shared readers (catalog/) never import torch."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = ["catalog", "retrieval", "webapp"]


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
