"""bench.compare's contenders become the jobs they say (no training here: the comparison is scheduled)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench.compare import CONTENDERS, _methods, contenders_of, method_spec, profile_named, render, section_of
from pruning_core.spec import DataSpec


def _setup() -> SimpleNamespace:
    profile = profile_named("cpu")  # digits: 30 dense + 15 fine-tune epochs
    case = profile.cases[0]
    return SimpleNamespace(
        case=case, spec=SimpleNamespace(data=DataSpec(name="digits")), seed=0, profile=profile
    )


def test_s2h_runs_from_scratch_in_one_stage_and_from_the_dense_weights_with_kd() -> None:
    s, weights = _setup(), Path("dense.safetensors")
    scratch = method_spec("s2h", s, 0.5, weights)
    assert scratch.method.name == "s2h" and scratch.model.weights is None and not scratch.kd.enabled
    assert scratch.schedule.epochs == s.case.dense_epochs + s.case.finetune_epochs
    one_stage_tuned = method_spec("s2h", s, 0.5, weights, {"finetune_epochs": 2})  # in the one budget too
    assert one_stage_tuned.schedule.epochs + 2 == s.case.dense_epochs + s.case.finetune_epochs
    assert CONTENDERS["s2h"].prune_at_init, "beside magnitude at the initial weights, as long"
    dense = method_spec("s2h-dense", s, 0.5, weights)
    assert dense.method.name == "s2h" and dense.model.weights == str(weights) and dense.kd.enabled
    assert dense.schedule.epochs == s.case.finetune_epochs and not dense.schedule.dense_epochs
    tuned = method_spec("s2h-dense", s, 0.5, weights, {"finetune_epochs": 3})  # its own fine-tuning
    assert tuned.schedule.epochs + tuned.method.finetune_epochs == s.case.finetune_epochs, "one budget"
    with pytest.raises(ValueError, match="no epoch"):
        method_spec("s2h-dense", s, 0.5, weights, {"finetune_epochs": s.case.finetune_epochs})


def test_tas_starts_from_the_dense_weights_and_options_override() -> None:
    s, weights = _setup(), Path("dense.safetensors")
    tas = method_spec("tas", s, 0.47, weights, {"init": "supernet"})
    assert tas.model.weights == str(weights) and tas.method.init == "supernet"
    assert tas.method.search_epochs + tas.schedule.epochs == s.case.finetune_epochs
    shorter = method_spec("tas", s, 0.47, weights, {"search_epochs": 1})  # a smaller share of the budget
    assert shorter.method.search_epochs == 1 and shorter.schedule.epochs == s.case.finetune_epochs - 1


def _row(top1: float, **extra: Any) -> dict[str, Any]:
    return {"top1": top1, "macs": 50, "params": 1000, "macs_ratio": 0.5, **extra}


def _method_row(top1: float, **extra: Any) -> dict[str, Any]:
    return _row(
        top1, epoch_s=2.0, epoch_cpu_s=2.0, phase="train", train_macs=10**9, train_wall_s=9.0, **extra
    )


def test_several_methods_share_one_table_and_old_results_still_render() -> None:
    """Table B: one-stage methods in one table beside magnitude at the initial weights, with their cost;
    a results file of one method (the v1 format) renders as before."""
    rows = {
        "magnitude": _row(40.0, train_macs=2 * 10**9, train_wall_s=20.0),
        "peer": _row(39.0),
        "prune-at-init": _row(41.0, train_macs=10**9, train_wall_s=10.0),
        "s2h": _method_row(42.0),
        "epi": _method_row(43.0, trigger_epoch=3, trigger="indicator"),
    }
    run = {
        "seed": 0,
        "train_images": 100,
        "dense": {"top1": 45.0, "params": 2000, "epoch_s": 1.0, "epoch_cpu_s": 1.0, "train_macs": 10**9},
        "targets": [{"target": 0.5, "rows": rows}],
    }
    case = {"label": "digits", "model": "resnet20", "dense_epochs": 2, "finetune_epochs": 1, "runs": [run]}
    machine = {
        "cpu": "x",
        "cores": 2,
        "torch_threads": 1,
        "torch": "t",
        "torch_pruning": "p",
        "device": "cpu",
        "gpu": None,
    }
    results = {
        "method": "s2h+epi",
        "contenders": {
            "s2h": {"one_stage": True, "options": {}, "search_share": None, "kd": False, "cost": False},
            "epi": {
                "one_stage": True,
                "options": {"tau": 0.9},
                "search_share": None,
                "kd": False,
                "cost": True,
            },
        },
        "profile": "cpu",
        "command": "python -m bench.compare --method s2h,epi",
        "date": "d",
        "wall_s": 60.0,
        "machine": machine,
        "cases": [case],
    }
    text = render(results, Path("r.json"))
    assert section_of(results) == "compare-s2h+epi-cpu"
    for label in (
        "`magnitude` + KD, after the dense training",
        "`magnitude` at the initial weights",
        "`s2h`",
        "`epi`",
    ):
        assert f"| 0.5 | {label} |" in text
    assert "| 0.5 | `epi` | 43.00 (n=1) | 0.500 | 1,000 | 1 G |" in text  # the cost columns
    assert "`epi` at 0.5 pruned at the end of epoch 3 (indicator)" in text and "`tau: 0.9`" in text
    assert "Time per epoch of `s2h`'s `train` phase" in text and "Time per epoch of `epi`'s" in text

    old = {k: v for k, v in results.items() if k != "contenders"} | {"method": "epi", "one_stage": True}
    del rows["s2h"]
    assert list(contenders_of(old)) == ["epi"] and "| 0.5 | `epi` |" in render(old, Path("r.json"))


def test_method_lists_are_checked() -> None:
    assert _methods("s2h, epi") == ["s2h", "epi"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown nope"):
        _methods("s2h,nope")
