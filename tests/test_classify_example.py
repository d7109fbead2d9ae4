"""The ONNX example of docs/outputs.md (examples/classify_onnx.py: onnxruntime, numpy and Pillow only) run
on real CIFAR-10 JPEGs against a tiny job's model.onnx: it must preprocess exactly as the data pipeline
did and predict what the PyTorch model predicts. Also the job's model card and its contract in every file."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pruning_core.artifacts.card import CARD_FILE
from pruning_core.artifacts.contract import InputContract
from pruning_core.artifacts.export import load_pruned, read_contract
from pruning_core.artifacts.report import read_report
from pruning_core.data.loaders import load_data
from pruning_core.jobs.runner import run
from pruning_core.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "classify_onnx.py"
SHARED_CIFAR = ROOT.parent / "shared/datasets/cifar10-jpeg.tar.gz"

pytestmark = pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="shared CIFAR-10 JPEG archive not present")

# Runs the example as a user would (its __main__, argv), then checks it never needed torch.
RUN_WITHOUT_TORCH = (
    "import runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "assert 'torch' not in sys.modules, 'the example imported torch'\n"
)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny CIFAR job: ResNet-20, 4 train and 1 test image per class, one dense and one pruning epoch."""
    spec = parse_spec(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "imagefolder", "root": str(SHARED_CIFAR), "per_class": 4, "test_per_class": 1},
            "target": {"macs_ratio": 0.5},
            "schedule": {"dense_epochs": 1, "epochs": 1, "batch_size": 20, "bn_recalibration_batches": 1},
            "export": {"formats": ["safetensors", "onnx"], "latency_max_s": 0.0},
            "device": "cpu",
        }
    )
    workdir = tmp_path_factory.mktemp("cifar-job")
    result = run(spec, workdir)
    data = load_data(spec.data, cache_dir=workdir / ".data", seed=spec.seed)  # the extraction is cached
    return result, workdir, data


def _test_images(workdir: Path, classes: list[str]) -> list[Path]:
    """The job's test images in test-set order: the one extracted image of each class, by class."""
    (tree,) = {p.parent.parent for p in workdir.glob(".data/imagefolder/*/*/test/*/*.jpg")}
    files = [sorted((tree / c).glob("*.jpg")) for c in classes]
    assert all(len(f) == 1 for f in files)  # test_per_class=1: image i is test item i
    return [f[0] for f in files]


def test_the_docs_show_the_example_verbatim() -> None:
    page = (ROOT / "docs" / "outputs.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- examples/classify_onnx\.py -->\n```python\n(.*?)```", page, re.S)
    assert blocks == [EXAMPLE.read_text(encoding="utf-8")]


def test_the_onnx_example_classifies_cifar_jpegs_as_pytorch_does(job) -> None:
    result, workdir, data = job
    onnx_path = workdir / "model.onnx"
    assert onnx_path.name in result.artifacts
    images = _test_images(workdir, data.classes)
    pipeline = torch.stack([data.test[i][0] for i in range(len(images))])
    assert [data.test[i][1] for i in range(len(images))] == list(range(len(images)))
    model = load_pruned(workdir)
    with torch.no_grad():
        torch_probs = model(pipeline).softmax(1).numpy()
    torch_labels = [data.classes[i] for i in torch_probs.argmax(1)]

    # As a user runs it: a separate interpreter, the script's own __main__, no torch.
    out = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_TORCH, str(EXAMPLE), str(onnx_path), *map(str, images)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workdir,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert [r[0] for r in rows] == [str(p) for p in images]
    assert [r[1] for r in rows] == torch_labels
    assert np.allclose([float(r[2]) for r in rows], torch_probs.max(1), atol=2e-4)

    # Its functions, in process: the same input tensors as the pipeline and the same probabilities.
    example = runpy.run_path(str(EXAMPLE))
    session, contract = example["load"](str(onnx_path))
    for i, path in enumerate(images):
        with Image.open(path) as image:
            x = example["preprocess"](image, contract)
        assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
        assert np.abs(x[0] - pipeline[i].numpy()).max() < 1e-5
        label, probs = example["classify"](session, contract, path)
        assert label == torch_labels[i]
        assert np.abs(probs - torch_probs[i]).max() < 1e-4


def test_the_job_records_its_contract_everywhere_and_writes_a_model_card(job) -> None:
    result, workdir, data = job
    want = InputContract.from_datasets(data)
    assert want.classes[:3] == ("airplane", "automobile", "bird") and len(want.classes) == 10
    assert want.mean == data.mean and want.std == data.std and want.size == 32 and want.channels == 3
    for source in (workdir, workdir / "architecture.json", workdir / "model.onnx"):
        assert read_contract(source) == want
    arch = json.loads((workdir / "architecture.json").read_text())
    assert arch["input"]["mean"] == list(data.mean)

    card = (workdir / CARD_FILE).read_text(encoding="utf-8")
    report = read_report(workdir)
    assert CARD_FILE in result.artifacts and report.files[CARD_FILE] == len(card.encode())
    assert {"model.safetensors", "architecture.json", "model.onnx"} <= set(report.files)
    assert f"| MACs per image | {report.dense.macs:,} | {report.pruned.macs:,} |" in card
    assert f"| parameters | {report.dense.params:,} | {report.pruned.params:,} |" in card
    assert "0: airplane" in card and "9: truck" in card
    assert f"{data.mean[0]:.4f}" in card and f"{data.std[2]:.4f}" in card
    assert "`model.onnx`" in card and "`model.torchscript.pt`" not in card  # only the files written
