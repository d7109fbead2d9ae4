"""The CUDA training defaults (AMP type, channels_last, torch.compile), tested through their CPU
equivalents: the same engine paths with the precision, memory format or compiler forced on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pruning_core.errors import Cancelled
from pruning_core.graph.budget import TARGET_BAND
from pruning_core.graph.surgery import describe, rebuild
from pruning_core.jobs.runner import run
from pruning_core.methods import METHODS
from pruning_core.methods.base import DenseTraining, Method, MethodContext
from pruning_core.spec import JobSpec, Schedule, parse_spec
from pruning_core.training.acceleration import amp_dtype, memory_format
from pruning_core.training.engine import StepContext, StepOutput, TrainContext, fit
from tests.test_engine import SIZE, NoisyBlobs, PruneAfterFirstEpoch, StopAt, _model, _untimed, _weights
from tests.test_method_contract import TARGET, _spec

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SCHEDULE = Schedule(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.5)


def test_amp_type_is_bfloat16_where_the_gpu_has_it_else_float16(monkeypatch: pytest.MonkeyPatch) -> None:
    on = Schedule(amp=True)
    assert amp_dtype(CPU, on) is None, "CPU training stays float32"
    assert amp_dtype(CUDA, Schedule(amp=False)) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(CUDA, on) == torch.bfloat16
    assert amp_dtype(CUDA, Schedule(amp_dtype="float16")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype(CUDA, on) == torch.float16
    assert amp_dtype(CPU, on, torch.bfloat16) == torch.bfloat16 and amp_dtype(CUDA, on, torch.float32) is None


def test_channels_last_on_cuda_by_default_and_as_the_schedule_says() -> None:
    assert memory_format(CPU, Schedule()) == torch.contiguous_format
    assert memory_format(CUDA, Schedule()) == torch.channels_last
    assert memory_format(CUDA, Schedule(channels_last=False)) == torch.contiguous_format
    assert memory_format(CPU, Schedule(channels_last=True)) == torch.channels_last


class Probe(Method):
    """Plain training that records, per step, the input's and the first conv weight's layout and the
    logits' type, and the scaler's state."""

    compiles = True

    def __init__(self) -> None:
        spec = JobSpec()
        super().__init__(spec.method, MethodContext(spec, torch.zeros(1, 3, SIZE, SIZE), 4, CPU, 1))
        self.seen: list[tuple[bool, bool, torch.dtype, bool, bool]] = []

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        x, y = batch
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        with ctx.autocast():
            logits = model(x)
            loss = self.supervised_loss(logits, x, y)
        self.seen.append(
            (
                x.is_contiguous(memory_format=torch.channels_last),
                conv.weight.is_contiguous(memory_format=torch.channels_last),
                logits.dtype,
                ctx._run.scaler.is_enabled(),
                ctx._run.compiled,
            )
        )
        return StepOutput(loss)


def _ctx(tmp: Path | None = None, reporter=None, **forced) -> TrainContext:
    ctx = TrainContext(
        CPU,
        3,
        NoisyBlobs(96, 0),
        NoisyBlobs(32, 1),
        checkpoint_dir=tmp,
        describe=lambda m: describe(m, "resnet20", 4, 3, SIZE),
        rebuild=rebuild,
        **forced,
    )
    if reporter is not None:
        ctx.reporter = reporter
    return ctx


def test_channels_last_training_on_cpu_matches_contiguous_and_hands_back_contiguous_weights() -> None:
    probe = Probe()
    result = fit(_model(), probe, SCHEDULE, _ctx(memory_format=torch.channels_last))
    assert all(x and w for x, w, *_ in probe.seen), "inputs and weights are NHWC while training"
    assert all(p.is_contiguous() for p in result.model.parameters()), "and contiguous when handed back"
    # the same arithmetic in another summation order: equal up to rounding over a few steps (over
    # a dozen, small-batch BatchNorm training amplifies the rounding to percents)
    short = SCHEDULE.model_copy(update={"epochs": 1, "max_steps_per_epoch": 3})
    nhwc = fit(_model(), Probe(), short, _ctx(memory_format=torch.channels_last))
    plain = fit(_model(), Probe(), short, _ctx())
    for k, v in _weights(nhwc.model).items():
        assert torch.allclose(v.float(), _weights(plain.model)[k].float(), rtol=1e-4, atol=1e-5), k


def test_channels_last_survives_a_physical_prune_and_resumes_exactly(tmp_path: Path) -> None:
    spec = JobSpec()
    ctx_m = MethodContext(spec, torch.zeros(1, 3, SIZE, SIZE), 4, CPU, 1)
    schedule = SCHEDULE.model_copy(update={"epochs": 3})
    reference = fit(
        _model(), PruneAfterFirstEpoch(spec.method, ctx_m), schedule, _ctx(memory_format=torch.channels_last)
    )
    with pytest.raises(Cancelled):
        fit(
            _model(),
            PruneAfterFirstEpoch(spec.method, ctx_m),
            schedule,
            _ctx(tmp_path, StopAt(1, 2), memory_format=torch.channels_last),
        )
    resumed = fit(
        _model(),
        PruneAfterFirstEpoch(spec.method, ctx_m),
        schedule,
        _ctx(tmp_path, memory_format=torch.channels_last),
    )
    assert _untimed(resumed.history) == _untimed(reference.history)
    for k, v in _weights(resumed.model).items():
        assert torch.equal(v, _weights(reference.model)[k]), k


@pytest.mark.parametrize(("dtype", "scaled"), [(torch.bfloat16, False), (torch.float16, True)])
def test_autocast_types_and_the_scaler_on_cpu(dtype: torch.dtype, scaled: bool) -> None:
    """bfloat16 steps without the GradScaler, float16 through it; both train."""
    probe = Probe()
    result = fit(_model(), probe, SCHEDULE, _ctx(precision=dtype))
    assert {(d, s) for *_, d, s, _ in probe.seen} == {(dtype, scaled)}
    losses = [r["train_loss"] for r in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in result.model.parameters()), "weights stay float32"


def test_compile_where_the_method_allows_it_counts_the_same_macs() -> None:
    """The eager backend on CPU: the plumbing of ``schedule.compile`` (compile, MAC count, hand-back)."""
    compiled = Probe()
    result = fit(
        _model(), compiled, SCHEDULE.model_copy(update={"compile": True}), _ctx(compile_backend="eager")
    )
    assert all(c for *_, c in compiled.seen) and result.model._compiled_call_impl is None
    plain = fit(_model(), Probe(), SCHEDULE, _ctx())
    assert [r["train_macs"] for r in result.history] == [r["train_macs"] for r in plain.history]
    for k, v in _weights(result.model).items():
        assert torch.allclose(v, _weights(plain.model)[k], rtol=1e-4, atol=1e-6), k
    unmarked = Probe()
    unmarked.compiles = False  # a method with masks, hooks or two forwards is never compiled
    fit(_model(), unmarked, SCHEDULE.model_copy(update={"compile": True}), _ctx(compile_backend="eager"))
    assert not any(c for *_, c in unmarked.seen)


def test_only_plain_training_methods_may_be_compiled() -> None:
    assert DenseTraining.compiles and METHODS.get("magnitude").compiles
    assert not any(METHODS.get(n).compiles for n in METHODS.names() if n != "magnitude")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_in_channels_last(name: str, tmp_path: Path) -> None:
    """The contract's job with NHWC training forced on CPU: masks, hooks, two forwards and the
    physical removal all work on NHWC weights, and the target is met."""
    raw = _spec(name).model_dump(mode="json")
    raw["schedule"]["channels_last"] = True
    report = run(parse_spec(raw), tmp_path).report
    assert TARGET - TARGET_BAND <= report.achieved_macs_ratio <= TARGET
    assert report.finalize_rel_diff is not None and report.finalize_rel_diff < 1e-4
