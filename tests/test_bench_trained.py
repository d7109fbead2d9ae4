"""bench.trained (Table A): every contender starts from the given weights with the same budget, lands in
the target band, and the table shows every row (digits, random dense weights, one seed: a smoke run)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench import trained
from bench.run import save_weights
from pruning_core.graph.budget import TARGET_BAND
from pruning_core.models.zoo import build_model

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


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


def _part(seed: int, top1: float, **over: object) -> dict:
    """A one-seed Table A results dict (the committed seed-0 run's), its seed and magnitude's top-1 set."""
    results = json.loads((RESULTS / "trained-cpu-2026-12-07T023833Z.json").read_text())
    run = copy.deepcopy(results["case"]["runs"][0]) | {"seed": seed}
    run["targets"][0]["rows"]["magnitude"]["top1"] = top1
    return (
        results
        | {"case": results["case"] | {"runs": [run]}, "date": f"2026-12-0{seed + 1}T00:00:00+00:00"}
        | over
    )


def test_merge_joins_seeds_in_order_and_renders_their_spread(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_part(1, 80.0)))
    b.write_text(json.dumps(_part(0, 82.0)))
    md = tmp_path / "B.md"
    assert trained.main(["--merge", str(a), str(b), "--out", str(tmp_path), "--markdown", str(md)]) == 0
    (merged_file,) = tmp_path.glob("trained-cpu-seeds0-1-*.json")  # beside the parts, never over one
    merged = json.loads(merged_file.read_text())
    assert [r["seed"] for r in merged["case"]["runs"]] == [0, 1]
    assert merged["date"].startswith("2026-12-01") and "--merge" in merged["command"]
    assert "81.00 ± 1.41 (82.00, 80.00)" in md.read_text()  # seed order, the sample std of the two


def test_merge_refuses_parts_of_different_tables_or_a_repeated_seed() -> None:
    with pytest.raises(SystemExit, match="options"):
        trained.merge([_part(0, 80.0), _part(1, 80.0, options={"psap": {"settle": 0.5}})])
    with pytest.raises(SystemExit, match="more than one file"):
        trained.merge([_part(0, 80.0), _part(0, 81.0)])


def test_merge_replaces_a_contender_rerun_alone_at_new_options() -> None:
    """Options chosen after some seeds ran: the contender reruns alone on every seed, its rows and
    options replace the old ones, the baselines' rows stay."""
    rerun = _part(
        0, 80.0, contenders=["s2h-dense"], baselines=False, options={"s2h-dense": {"finetune_epochs": 2}}
    )
    for run in rerun["case"]["runs"]:
        for t in run["targets"]:
            t["rows"] = {"s2h-dense": t["rows"]["s2h-dense"] | {"top1": 99.0}}
    old = [_part(0, 80.0), _part(1, 81.0)]
    with pytest.raises(SystemExit, match="lacks seeds"):
        trained.merge([*old, rerun], rerun=("s2h-dense",))
    second = copy.deepcopy(rerun)
    second["case"]["runs"][0]["seed"] = 1
    merged = trained.merge([*old, rerun, second], rerun=("s2h-dense",))
    rows = [t["rows"] for r in merged["case"]["runs"] for t in r["targets"]]
    assert all(r["s2h-dense"]["top1"] == 99.0 for r in rows), "the rerun's rows"
    assert [r["magnitude"]["top1"] for r in rows[::2]] == [80.0, 81.0], "the baselines' rows kept"
    assert merged["options"] == {"psap": {"settle": 0.75}, "s2h-dense": {"finetune_epochs": 2}}
    assert merged["contenders"] == ["tas", "psap", "s2h-dense"]
    # a later seed run without the replaced contender joins the earlier ones that had it
    third = _part(2, 82.0, contenders=["tas", "psap"])
    for t in third["case"]["runs"][0]["targets"]:
        del t["rows"]["s2h-dense"]
    again = copy.deepcopy(rerun)
    again["case"]["runs"][0]["seed"] = 2
    merged = trained.merge([*old, third, rerun, second, again], rerun=("s2h-dense",))
    assert [r["seed"] for r in merged["case"]["runs"]] == [0, 1, 2]
    assert all(t["rows"]["s2h-dense"]["top1"] == 99.0 for r in merged["case"]["runs"] for t in r["targets"])
    with pytest.raises(SystemExit, match="contenders"):
        trained.merge([*old, third, rerun, second, again])  # without --replace they are different tables
    with pytest.raises(SystemExit, match="alone"):
        trained.merge(old, rerun=("s2h-dense",))
