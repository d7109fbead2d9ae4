"""bench.trained (Table A): every contender starts from the given weights with the same budget, lands in
the target band, and the table shows every row (digits, random dense weights, one seed: a smoke run)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import trained
from bench.run import save_weights
from pruning_core.budget import TARGET_BAND
from pruning_core.zoo import build_model


def test_table_a_smoke_every_contender_from_the_weights_in_the_band(tmp_path: Path) -> None:
    weights = save_weights(build_model("resnet20", 10, 1), tmp_path / "dense.safetensors")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    out = tmp_path / "results"
    rc = trained.main(
        ["--profile", "smoke", "--weights", str(weights), "--out", str(out), "--markdown", str(md)]
    )
    assert rc == 0
    (path,) = out.glob("trained-smoke-*.json")
    results = json.loads(path.read_text())
    (run,) = results["case"]["runs"]
    (t,) = run["targets"]
    assert set(t["rows"]) == {"magnitude", "peer", *trained.CONTENDERS}
    for name, row in t["rows"].items():
        assert t["target"] - TARGET_BAND - 1e-9 <= row["macs_ratio"] <= t["target"] + 1e-9, name
        assert row["train_wall_s"] > 0, name
    text = md.read_text()
    assert "<!-- bench:trained-smoke -->" in text
    for label in trained.LABELS.values():
        assert label in text
    # --render regenerates the same section from the committed JSON
    md.write_text("# Benchmarks\n")
    assert trained.main(["--render", str(path), "--markdown", str(md)]) == 0
    assert "| 0.5 | `magnitude` + KD |" in md.read_text()


def test_no_baselines_runs_the_chosen_contenders_alone(tmp_path: Path) -> None:
    weights = save_weights(build_model("resnet20", 10, 1), tmp_path / "dense.safetensors")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    out = tmp_path / "results"
    args = ["--profile", "smoke", "--weights", str(weights), "--out", str(out), "--markdown", str(md)]
    assert trained.main([*args, "--methods", "psap", "--no-baselines"]) == 0
    (path,) = out.glob("trained-smoke-*.json")
    (t,) = json.loads(path.read_text())["case"]["runs"][0]["targets"]
    assert set(t["rows"]) == {"psap"}
    text = md.read_text()
    assert f"| 0.5 | {trained.LABELS['psap']} |" in text and "| 0.5 | `magnitude` + KD |" not in text
