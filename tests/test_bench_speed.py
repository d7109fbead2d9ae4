"""``bench.speed`` in miniature (ResNet-20, one ratio, batch 1, 3 rounds): the table's structure and the
figures' consistency, not the speed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.speed import SECTION, main


def test_speed_section_and_results_have_every_cell(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkept as is\n")
    args = ["--models", "resnet20", "--ratios", "0.5", "--batches", "1", "--repeats", "3"]
    threads = torch.get_num_threads()
    assert (
        main([*args, "--threads", "7", "--min-sample-ms", "1", "--out", str(tmp_path), "--markdown", str(md)])
        == 0
    )
    assert torch.get_num_threads() == threads  # in-process callers (this test) keep their setting
    (path,) = tmp_path.glob("speed-*.json")
    results = json.loads(path.read_text())
    (case,) = results["cases"]
    assert results["steps"] == [1, 8] and case["model"] == "resnet20"
    for step, v in case["variants"].items():
        assert v["macs"] <= 0.5 * case["dense_macs"]
        assert abs(v["implied_speedup"] - case["dense_macs"] / v["macs"]) < 1e-9
        assert sorted(v["timing"]) == ["b1-folded", "b1-folded-cl", "b1-plain"]
        for t in v["timing"].values():
            assert 0 < t["speedup_lo"] <= t["speedup"] <= t["speedup_hi"]
            assert abs(t["efficiency"] - t["speedup"] / v["implied_speedup"]) < 1e-9
        if step in ("8", "8-latency"):
            assert v["off_step_share"] == 0  # every conv of resnet20 (16/32/64 wide) in steps of 8
    assert sorted(case["variants"]) == ["1", "8", "8-latency"]
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept as is\n")
    section = text.split(f"<!-- bench:{SECTION} -->")[1].split(f"<!-- /bench:{SECTION} -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `resnet20`")]
    # model, px, ratio, batch + (MAC-implied and 3 forms) per variant: step 1, step 8, step 8 by latency
    assert len(rows) == 1 and rows[0].count("|") == 17
    assert "step 8, latency allocation" in section and section.count("Goal (") == 0  # no 224 px model
    assert "python -m bench.speed --models resnet20" in section and "load average" in section
