"""The house rules: the layering of the engine and the service (import-linter's contracts in
pyproject.toml, read statically), and what must stay torch-free when it is really imported."""

import os
import shutil
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
    assert _loaded_after("import pruning_core.jobs.runner, pruning_core.cli", SERVICE) == []


def test_import_contracts_are_kept() -> None:
    """Every contract in ``[tool.importlinter]``: the engine's layers, no cycles, torch-free modules."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--no-cache"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    """The layers contract is live: a graph module that imports the runner is refused."""
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "pruning_core", tmp_path / "pruning_core")
    for package in ("api", "worker", "store", "pruning_client"):
        shutil.copytree(root / package, tmp_path / package)
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "pruning_core" / "graph" / "upward.py"
    bad.write_text("from ..jobs import runner  # noqa: F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 1
    assert "pruning_core.graph.upward -> pruning_core.jobs.runner" in out.stdout


@pytest.mark.parametrize(
    "module",
    [
        "pruning_core.spec",
        "pruning_core.artifacts.report",
        "pruning_core.settings",
        "pruning_core",
        "pruning_core.methods",
        "pruning_core.methods.s2h.options",
        "pruning_core.methods.tas.options",
        "pruning_core.models.weights",
    ],
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
