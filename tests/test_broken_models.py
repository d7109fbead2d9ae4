"""No broken model is called a success (issue #26, item 3): non-finite weights at load, training that
diverges, a final network with non-finite logits and a MAC ratio outside the target's band each end the
job ``failed`` with a code of their own, not retried, saying which in one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import Engine

from pruning_core.errors import DivergedError, NonFiniteModelError, TargetMissedError, WeightsError
from pruning_core.graph.budget import TARGET_BAND
from pruning_core.jobs.runner import check_target, run
from pruning_core.methods.magnitude.method import Magnitude
from pruning_core.models.zoo import build_model
from pruning_core.settings import Settings
from pruning_core.training.engine import _check_divergence
from store import repo
from store.db import make_engine, migrate, session_scope
from store.models import Job
from tests.specs import quick_spec
from worker.execute import execute


@pytest.fixture
def job_db(sqlite_url: str, tmp_path: Path) -> tuple[Settings, Engine]:
    migrate(sqlite_url)
    settings = Settings(
        database_url=sqlite_url, state_dir=tmp_path / "state", redis_url=None, heartbeat_s=0.2
    )
    engine = make_engine(sqlite_url)
    yield settings, engine
    engine.dispose()


def _execute(settings: Settings, engine: Engine, spec: dict) -> tuple[Job, list[str]]:
    """Run ``spec`` as alice's job through ``execute``; the finished row and its message events."""
    with session_scope(engine) as s:
        job_id = repo.create_job(s, "alice", spec, spec["method"]["name"])[0].id
    execute(job_id, worker_name="test", settings=settings)
    with session_scope(engine) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        texts = [e.data["text"] for e in repo.events_after(s, job_id, 0, limit=1000) if e.kind == "message"]
    return job, texts


def test_nan_weights_fail_the_job_bad_weights_at_load(tmp_path: Path) -> None:
    """Weights that are all NaN (the attack ran ``schedule.epochs: 0`` and "succeeded" with a MAC ratio
    of 0.05 for 0.5): refused when loaded, one line naming the tensors, before any pruning."""
    dense = build_model("resnet20", 4, 3).state_dict()
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in dense.items()}
    save_file(state, str(tmp_path / "nan.safetensors"))
    spec = quick_spec("resnet20", {"name": "magnitude"}, target=0.5, epochs=0)
    spec = spec.model_copy(
        update={"model": spec.model.model_copy(update={"weights": str(tmp_path / "nan.safetensors")})}
    )
    with pytest.raises(
        WeightsError, match=r"NaN or infinite values in 107 tensor\(s\): bn1\.bias, .*, \.\.\.; "
    ) as err:
        run(spec, tmp_path / "work")
    assert err.value.code == "bad_weights" and "\n" not in str(err.value)
    assert not (tmp_path / "work" / "model.safetensors").exists()


def test_training_that_diverges_fails_diverged_not_retried(job_db) -> None:
    """``lr: 10``, momentum 0.99 (ResNet-20, synthetic: the attack reached a test loss of 5.9e11 and
    "succeeded"): the loss grows past ``DIVERGENCE_FACTOR`` times its first step's and the job ends
    ``failed`` / ``diverged``, not retryable, naming the epoch, the step and what to lower."""
    settings, engine = job_db
    spec = quick_spec(
        "resnet20", {"name": "magnitude"}, target=0.5, per_class=40, lr=10.0, momentum=0.99,
        nesterov=False, warmup_epochs=0, max_steps_per_epoch=20,
    ).model_dump(mode="json")  # fmt: skip
    job, texts = _execute(settings, engine, spec)
    assert (job.status, job.error_code, job.retryable, job.attempt) == ("failed", "diverged", False, 1)
    assert "epoch 1, step " in job.error_message
    assert job.error_message.endswith("lower schedule.lr (now 10) or schedule.momentum (now 0.99)")
    assert "x its start" in job.error_message and "\n" not in job.error_message
    assert texts[-1] == f"failed (diverged): {job.error_message}"


def test_a_network_with_non_finite_logits_fails(tmp_path: Path) -> None:
    """torchvision's MNASNet keeps BatchNorm statistics with a momentum of 0.0003: after one short epoch
    its eval-mode logits are NaN (the attack "succeeded" with the test loss reported as null). The job
    fails ``non_finite_model`` rather than export a broken network."""
    spec = quick_spec("tv:mnasnet0_5", {"name": "magnitude"}, size=32, target=0.5, per_class=16)
    with pytest.raises(
        NonFiniteModelError, match=r"logits are NaN or infinite on 16 of 16 test images"
    ) as err:
        run(spec, tmp_path)
    assert err.value.code == "non_finite_model"
    assert not (tmp_path / "model.safetensors").exists()


def test_a_mac_ratio_outside_the_band_fails_target_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A method that removes no channel (MACs 1.0 of the dense for a 0.5 target; the NaN-weights attack
    got 0.05) fails ``target_missed`` instead of succeeding with a network that misses the target."""
    monkeypatch.setattr(Magnitude, "start_phase", lambda self, phase, model: model)
    spec = quick_spec("resnet20", {"name": "magnitude"}, target=0.5)
    with pytest.raises(
        TargetMissedError, match=r"pruned to 1\.0000 of the dense MACs, outside \[0\.4800, 0\.5000\]"
    ):
        run(spec, tmp_path)


@pytest.mark.parametrize(
    ("achieved", "ok"),
    [(0.5, True), (0.49, True), (0.5 - TARGET_BAND, True), (0.47, False), (0.501, False), (0.05, False)],
)
def test_the_target_band(achieved: float, ok: bool) -> None:
    """``[target - TARGET_BAND, target]`` of the dense MACs, for every method."""
    if ok:
        check_target(0.5, achieved, "magnitude")
    else:
        with pytest.raises(TargetMissedError) as err:
            check_target(0.5, achieved, "magnitude")
        assert err.value.code == "target_missed"


def _run(first_loss: float | None) -> SimpleNamespace:
    """What ``engine._check_divergence`` reads of a training run: its phase, position, schedule, start."""
    schedule = SimpleNamespace(lr=0.05, optimizer="adam", momentum=0.9)
    ctx = SimpleNamespace(divergence_factor=100.0)
    return SimpleNamespace(
        ctx=ctx, s=schedule, phase="finetune", epoch=2, step_in_epoch=6, first_loss=first_loss
    )


def test_a_non_finite_loss_is_diverged_not_an_internal_error() -> None:
    """A NaN loss was a FloatingPointError (``internal_error``, retried): now ``diverged``, one line
    naming the epoch and step (Adam: only the learning rate to lower)."""
    with pytest.raises(DivergedError) as err:
        _check_divergence(_run(2.3), float("nan"))
    assert err.value.code == "diverged"
    assert str(err.value) == (
        "training diverged in finetune, epoch 3, step 7: the loss became nan; lower schedule.lr (now 0.05)"
    )


def test_a_loss_that_starts_near_zero_may_rise_a_few_units() -> None:
    """The start counts as at least ``LOSS_FLOOR`` (1): trained weights' loss of 0.01 may rise to 50
    after a pruning without being called divergent; past 100 it is."""
    run = _run(None)
    _check_divergence(run, 0.01)  # the first step sets the start
    assert run.first_loss == 0.01
    _check_divergence(run, 50.0)
    with pytest.raises(DivergedError, match=r"rose to 101, over 100x its start \(1\)"):
        _check_divergence(run, 101.0)
