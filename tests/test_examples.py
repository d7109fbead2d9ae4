"""The examples run as a user runs them: examples/custom_model.py as a script, examples/quickstart.ipynb
top to bottom in a Jupyter kernel (nbclient), each on the CPU on digits; both end in the MAC band every
job promises, and what they reload scores what the report says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pruning_core.graph.budget import TARGET_BAND

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "custom_model.py"
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
RESULT = re.compile(r"^(prune|plan): MACs .* \(ratio ([\d.]+), target ([\d.]+)\).* -> ([\d.]+)%$", re.M)


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Child processes import this checkout and run one torch thread (tests/conftest.py says why)."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def in_band(ratio: float, target: float) -> bool:
    return target - TARGET_BAND - 1e-9 <= ratio <= target + 1e-9


def test_custom_model_script_prunes_both_ways_within_the_band(kernel_env: None, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", "0.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    results = {
        way: (float(ratio), float(target), float(top1)) for way, ratio, target, top1 in RESULT.findall(out)
    }
    assert set(results) == {"prune", "plan"}, out
    for way, (ratio, target, top1) in results.items():
        assert in_band(ratio, target), f"{way}: {ratio} outside the band of {target}"
        assert top1 > 80.0, f"{way}: fine-tuning must recover a useful digits classifier ({top1}%)"
    reloaded = re.search(r"^prune: the pruned DigitsNet scores top-1 ([\d.]+)%$", out, re.M)
    assert reloaded is not None and float(reloaded.group(1)) == results["prune"][2], out
    assert re.search(r"^prune: 2\.\dx fewer MACs · ", out, re.M), "the report's headline"


def test_quickstart_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_quickstart_notebook_runs_top_to_bottom(kernel_env: None, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "\n".join(
        o.get("text", "") or o.get("data", {}).get("text/plain", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    ratio = re.search(r"ratio ([\d.]+) for the target ([\d.]+)", text)
    assert ratio is not None and in_band(float(ratio.group(1)), float(ratio.group(2))), text
    reloaded = re.search(r"reloaded: top-1 ([\d.]+)% \(report: ([\d.]+)%\)", text)
    assert reloaded is not None and reloaded.group(1) == reloaded.group(2), text
    counted = re.search(r"counted: ([\d,]+) MACs of ([\d,]+)", text)
    assert counted is not None, text
    small, dense = (int(g.replace(",", "")) for g in counted.groups())
    assert in_band(small / dense, 0.5), "plan/apply lands in the band too"
    assert "'tensorboard.tar.gz'" in text and "'model.onnx'" in text
