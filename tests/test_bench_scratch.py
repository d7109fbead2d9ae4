"""bench.scratch: a pruned network's widths cut from the initial weights give that network's MACs and
parameters, and the section shows each job beside its widths retrained (digits, 2 epochs: a smoke run)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import scratch
from bench.compare import COMPARE_CPU
from bench.run import resolve_data, setup
from pruning_core.graph.budget import TARGET_BAND


def test_cut_keeps_the_widths_asked_and_full_widths_change_nothing(tmp_path: Path) -> None:
    case = COMPARE_CPU.cases[0]  # digits
    s, model = setup(case, resolve_data(case.data), 0, COMPARE_CPU, tmp_path)
    model = model.cpu().eval()
    full = scratch.widths(model, s)
    same = scratch.cut(model, full, s).eval()
    x = torch.randn(4, *s.example.shape[1:])
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    fewer = [max(1, n // 2) for n in full]
    assert scratch.widths(scratch.cut(model, fewer, s), s) == fewer


def test_each_job_beside_its_widths_retrained(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    out = tmp_path / "results"
    args = ["--method", "s2h", "--case", "digits", "--dense-epochs", "1", "--finetune-epochs", "1"]
    args += ["--targets", "0.5", "--seeds", "0", "--out", str(out), "--markdown", str(md)]
    assert scratch.main(args) == 0
    (path,) = out.glob("scratch-s2h-cpu-*.json")
    (run,) = json.loads(path.read_text())["runs"]
    (t,) = run["targets"]
    rows = t["rows"]
    for name in ("s2h", "magnitude"):
        again = rows[f"{name} widths, retrained"]
        assert (again["macs"], again["params"]) == (rows[name]["macs"], rows[name]["params"]), name
        assert 0.5 - TARGET_BAND - 1e-9 <= rows[name]["macs"] / run["dense_macs"] <= 0.5 + 1e-9, name
    text = md.read_text()
    assert "<!-- bench:scratch-s2h-cpu -->" in text and "`s2h`'s widths, retrained" in text
    assert not list(out.glob(".work-*")), "the job directories are removed"
