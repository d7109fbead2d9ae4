"""`prune run` end to end on digits: artifacts that reload, a report that tells the truth, one-line
errors, and Ctrl-C then the same command resumes to the same weights."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pruning_core.artifacts.export import load_pruned
from pruning_core.cli import main
from pruning_core.graph.macs import count_macs
from pruning_core.training.evaluation import evaluate

BASE = [
    "run",
    "--model",
    "resnet20",
    "--data",
    "digits",
    "--method",
    "magnitude",
    "--batch-size",
    "32",
    "--quiet",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("job")
    cwd = os.getcwd()
    os.chdir(out)  # anything written outside --out would show up here
    try:
        assert (
            main([*BASE, "--target", "0.5", "--dense-epochs", "2", "--epochs", "2", "--kd", "--out", "run"])
            == 0
        )
    finally:
        os.chdir(cwd)
    return out


def test_report_and_artifacts_agree(finished: Path) -> None:
    run = finished / "run"
    assert sorted(p.name for p in finished.iterdir()) == ["run"], "nothing may be written outside --out"
    report = json.loads((run / "report.json").read_text())
    assert abs(report["achieved_macs_ratio"] - 0.5) <= 0.02
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    assert report["pruned"]["params"] < report["dense"]["params"]
    assert [b["batch_size"] for b in report["latency"]["batches"]] == [1, 8]
    assert all(
        b["dense_ms"]["median"] > 0 and b["pruned_ms"]["median"] > 0 for b in report["latency"]["batches"]
    )
    assert [p["name"] for p in report["phases"] if p["epochs"]] == ["dense", "finetune"]
    assert len(report["history"]) == 4
    assert report["pruned"]["top1"] > 80.0, "fine-tuning must recover a useful digits classifier"
    assert {g["root"] for g in report["groups"]} and all(g["pruned"] <= g["dense"] for g in report["groups"])
    for name in (
        "model.safetensors",
        "architecture.json",
        "model.onnx",
        "model.pt2",  # the default formats include torch.export
        "model.torchscript.pt",
        "MODEL_CARD.md",
        "training.png",
        "widths.png",
        "report.html",
    ):
        assert (run / name).stat().st_size > 0, name

    model = load_pruned(run)
    x = torch.zeros(1, 1, 8, 8)
    assert count_macs(model, x) == report["pruned"]["macs"]
    from pruning_core.data.loaders import load_data
    from pruning_core.spec import DataSpec

    data = load_data(DataSpec(name="digits"), cache_dir=finished / "cache")
    assert evaluate(model, data.test, torch.device("cpu"))["top1"] == pytest.approx(report["pruned"]["top1"])


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pruning_core.cli", *argv], cwd=cwd, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "resnet21"], "model.name: unknown model 'resnet21'; known: resnet20"),
        (["--target", "1.5"], "target.macs_ratio"),
        (["--target", "0.0005"], "unreachable"),
        (["--model", "tv:resnet9000"], "unknown torchvision model 'tv:resnet9000'"),
        (["--weights", "missing.safetensors"], "weights file not found"),
        (["--data", "imagenet"], "known: digits"),
        (["--method", "nope"], "method.name: unknown method 'nope'; known: magnitude, s2h, tas, psap, epi"),
        (["--set", "schedule.batch_size=0"], "schedule.batch_size"),
        (["--set", "nofield"], "expected FIELD=VALUE"),
    ],
)
def test_bad_input_is_one_line_and_trains_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    argv = [*BASE, "--target", "0.5", "--epochs", "1", *args, "--out", "out"]
    # later flags win, so the bad value replaces the good default above
    proc = _run(argv, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists(), "refused before any training"


def test_corrupt_weights_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(os.urandom(256))
    proc = _run([*BASE, "--weights", "w.safetensors", "--epochs", "1", "--out", "out"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not a valid safetensors file" in proc.stderr


def test_out_dir_of_another_job_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "spec.json").write_text(json.dumps({"seed": 99}))
    proc = _run([*BASE, "--epochs", "1", "--out", "out"], tmp_path)
    assert proc.returncode == 2 and "holds a different job" in proc.stderr


def test_ctrl_c_then_same_command_resumes_to_same_weights(tmp_path: Path) -> None:
    argv = [
        "run",
        "--model",
        "resnet20",
        "--data",
        "digits",
        "--target",
        "0.5",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--formats",
        "safetensors",
        "--out",
        "out",
    ]
    ref = _run([*argv[:-1], "ref"], tmp_path)
    assert ref.returncode == 0, ref.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "pruning_core.cli", *argv],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # bytes: text mode would turn a "\r" into "\n"
    seen = []
    for line in proc.stdout:  # wait for the first epoch
        seen.append(line)
        if b"finetune epoch 1:" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read().decode()
    assert proc.wait(timeout=120) == 130, rest
    assert "\r" not in b"".join(seen).decode() + rest, "into a pipe: epoch lines, no progress-bar frames"
    assert "run the same command to resume" in rest
    assert (tmp_path / "out" / "checkpoints" / "finetune.pt").exists()

    again = _run(argv, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout + again.stderr
    a, b = (
        load_file(tmp_path / "ref" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_archive_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "data.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(500))
    proc = _run(
        [*BASE, "--data", "imagefolder", "--data-root", "data.tar.gz", "--epochs", "1", "--out", "out"],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
