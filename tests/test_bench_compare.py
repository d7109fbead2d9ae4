"""bench.compare's contenders become the jobs they say (no training here: the comparison is scheduled)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from bench.compare import CONTENDERS, method_spec, profile_named
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
    assert CONTENDERS["s2h"].prune_at_init, "beside magnitude at the initial weights, as long"
    dense = method_spec("s2h-dense", s, 0.5, weights)
    assert dense.method.name == "s2h" and dense.model.weights == str(weights) and dense.kd.enabled
    assert dense.schedule.epochs == s.case.finetune_epochs and not dense.schedule.dense_epochs


def test_tas_starts_from_the_dense_weights_and_options_override() -> None:
    s, weights = _setup(), Path("dense.safetensors")
    tas = method_spec("tas", s, 0.47, weights, {"init": "supernet"})
    assert tas.model.weights == str(weights) and tas.method.init == "supernet"
    assert tas.method.search_epochs + tas.schedule.epochs == s.case.finetune_epochs
