"""Under AMP on CUDA: several backward passes, restricted ones and early optimizer steps all go through
the one GradScaler, and the gradients a method sees are the true (unscaled) ones. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pruning_core.spec import Schedule
from pruning_core.training.engine import TrainContext, fit
from tests.test_engine import NoisyBlobs, _model
from tests.test_engine_hooks import GateMethod, TakeGrads, TwoUpdates

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _ctx() -> TrainContext:
    return TrainContext(torch.device("cuda"), 3, NoisyBlobs(96, 0), NoisyBlobs(32, 1))


def _first_grads(amp: bool, extra_loss: bool) -> dict[str, torch.Tensor]:
    method = GateMethod(extra_loss, device="cuda")
    schedule = Schedule(epochs=1, batch_size=16, max_steps_per_epoch=1, amp=amp)
    fit(_model(), method, schedule, _ctx())
    return {k: v.float().cpu() for k, v in method.grads[0].items()}


def test_amp_gradients_are_unscaled_once_and_restricted_losses_stay_restricted() -> None:
    torch.backends.cudnn.deterministic = True
    fp32 = _first_grads(amp=False, extra_loss=True)
    amp = _first_grads(amp=True, extra_loss=True)
    amp_without = _first_grads(amp=True, extra_loss=False)
    for k, v in fp32.items():  # float16 noise is a few percent; a scaling slip is a factor of 2**16
        ratio = amp[k].norm() / v.norm()
        cosine = F.cosine_similarity(amp[k].flatten(), v.flatten(), dim=0)
        assert 0.8 < ratio < 1.25 and cosine > 0.95, f"{k}: AMP gradient not unscaled once ({ratio:.3g})"
    for k in fp32:
        if k != "gate":
            assert torch.allclose(amp[k], amp_without[k], rtol=1e-3, atol=1e-6), (
                f"the gate-only loss reached {k}"
            )
    assert not torch.allclose(amp["gate"], amp_without["gate"])


def test_early_steps_under_amp_train_both_sets() -> None:
    from pruning_core.training.batches import Streams

    method = TwoUpdates(extra_loss=False, device="cuda")
    before = method.gate.detach().cpu().clone()
    result = fit(_model(), method, Schedule(epochs=3, batch_size=16, amp=True), _ctx(), streams=Streams())
    assert [g["stepping"] for g in method.grads[:2]] == [("weights",), ("gate",)]
    assert not torch.equal(method.gate.detach().cpu(), before), "the gate stepped"
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_a_job_with_given_weights_runs_on_cuda(tmp_path) -> None:
    """No dense phase: the dense model must reach the GPU before it is measured."""
    from pruning_core.jobs.runner import run
    from pruning_core.spec import parse_spec

    spec = {"data": {"name": "digits"}, "schedule": {"epochs": 1, "max_steps_per_epoch": 3}, "device": "cuda"}
    report = run(parse_spec(spec), tmp_path).report
    assert report.device.startswith("cuda") and 0.48 <= report.achieved_macs_ratio <= 0.5


def test_taken_gradients_are_unscaled_under_amp() -> None:
    method = TakeGrads(device="cuda")
    fit(_model(), method, Schedule(epochs=1, batch_size=16, max_steps_per_epoch=1, amp=True), _ctx())
    for got, want in zip((method.first[0], method.second[0]), method.expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-7), "take_grads must divide by the loss scale"


def test_s2h_trains_and_prunes_under_amp(tmp_path) -> None:
    from pruning_core.jobs.runner import run
    from tests.specs import quick_spec

    spec = quick_spec(
        "resnet20",
        {"name": "s2h", "mask_lr_scale": 40.0},
        per_class=16,
        device="cuda",
        epochs=2,
        batch_size=16,
        amp=True,
        max_steps_per_epoch=None,
    )
    report = run(spec, tmp_path).report
    assert report.achieved_macs_ratio < 0.9 and report.finalize_rel_diff < 1e-2  # float16 logits
    assert set(report.history[-1].views) == {"hard", "soft"}
