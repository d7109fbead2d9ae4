"""The house rules: the engine imports no service framework; the spec and report stay torch-free."""

import subprocess
import sys
from pathlib import Path

import pytest

from pruning_client.spec_args import read_spec_mapping
from pruning_core.spec import parse_spec

SERVICE = ("fastapi", "celery", "sqlalchemy", "api", "worker", "store")


def _loaded_after(import_stmt: str, forbidden: tuple[str, ...]) -> list[str]:
    code = f"import sys; {import_stmt}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_engine_imports_no_service_framework() -> None:
    assert _loaded_after("import pruning_core.runner, pruning_core.cli", SERVICE) == []


@pytest.mark.parametrize(
    "module", ["pruning_core.spec", "pruning_core.report", "pruning_core.settings", "pruning_core"]
)
def test_torch_free_modules(module: str) -> None:
    assert _loaded_after(f"import {module}", ("torch", "torchvision", "torch_pruning")) == []


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml"))
)
def test_example_specs_are_valid(path: Path) -> None:
    spec = parse_spec(read_spec_mapping(path))
    assert spec.target.macs_ratio < 1


def test_web_pages_import_no_engine() -> None:
    """The pages (api/web) are part of api/: no torch, no worker internals."""
    assert _loaded_after("import api.web", ("torch", "torchvision", "torch_pruning", "worker")) == []
