"""The one training loop: exact resume, cooperative cancel and Ctrl-C, optimizer rebuilt after pruning."""

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from pruning_core.errors import Cancelled
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.macs import count_macs
from pruning_core.graph.surgery import describe, rebuild, remove_channels
from pruning_core.jobs.runner import run
from pruning_core.methods.base import Method, MethodContext
from pruning_core.models.zoo import build_model
from pruning_core.spec import JobSpec, Schedule, parse_spec
from pruning_core.training.engine import (
    EpochAction,
    EpochEnd,
    NullReporter,
    TrainContext,
    fit,
    has_checkpoint,
)
from pruning_core.training.optim import lr_factor

SIZE = 8


class NoisyBlobs(Dataset):
    """Class-dependent blobs whose __getitem__ draws from the global RNG, like random augmentation."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5 + self.y.view(-1, 1, 1, 1) * 0.5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(3, SIZE, SIZE), self.y[i]


def _model() -> nn.Module:
    torch.manual_seed(1)
    return build_model("resnet20", 4, 3)


def _method() -> Method:
    spec = JobSpec()
    return Method(spec.method, MethodContext(spec, torch.zeros(1, 3, SIZE, SIZE), 4, torch.device("cpu"), 1))


def _ctx(tmp: Path | None, reporter=None) -> TrainContext:
    return TrainContext(
        device=torch.device("cpu"),
        seed=3,
        train=NoisyBlobs(96, 0),
        test=NoisyBlobs(32, 1),
        reporter=reporter or NullReporter(),
        checkpoint_dir=tmp,
        describe=lambda m: describe(m, "resnet20", 4, 3, SIZE),
        rebuild=rebuild,
    )


SCHEDULE = Schedule(epochs=3, batch_size=16, lr=0.05, warmup_epochs=0.5)


class StopAt(NullReporter):
    """Cancels (or sends SIGINT) when the run reaches a given (epoch, step)."""

    def __init__(self, epoch: int, step: int, sigint: bool = False):
        self.at, self.sigint, self.fired = (epoch, step), sigint, False

    def step(self, phase: str, epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == self.at and not self.fired:
            self.fired = True
            if self.sigint:
                os.kill(os.getpid(), signal.SIGINT)

    def cancelled(self) -> bool:
        return self.fired and not self.sigint


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], list[dict]]:
    result = fit(_model(), _method(), SCHEDULE, _ctx(None))
    return _weights(result.model), result.history


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")} for r in history]


@pytest.mark.parametrize(("epoch", "step", "sigint"), [(1, 3, False), (0, 4, True), (2, 1, False)])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, reference, epoch, step, sigint) -> None:
    with pytest.raises(KeyboardInterrupt if sigint else Cancelled):
        fit(_model(), _method(), SCHEDULE, _ctx(tmp_path, StopAt(epoch, step, sigint)))
    assert (tmp_path / "train.pt").exists(), "an interruption must leave a checkpoint"
    torch.manual_seed(12345)  # the resumed process starts from an unrelated RNG state
    resumed = fit(_model(), _method(), SCHEDULE, _ctx(tmp_path))
    assert resumed.resumed_from == epoch
    weights, history = reference
    assert _untimed(resumed.history) == _untimed(history), "the resumed epoch reports what it would have"
    # CPU seconds of the training steps; the interrupted epoch's are those before and after the stop
    assert all(r["cpu_s"] > 0 for r in resumed.history)
    assert resumed.history[epoch]["cpu_s"] > 0.5 * min(r["cpu_s"] for r in history)
    for k, v in _weights(resumed.model).items():
        assert torch.equal(v, weights[k]), f"{k} differs after resume"


def test_finished_phase_is_restored_not_retrained(tmp_path) -> None:
    first = fit(_model(), _method(), SCHEDULE, _ctx(tmp_path))
    again = fit(_model(), _method(), SCHEDULE, _ctx(tmp_path))
    assert again.history == first.history
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, first.model.state_dict()[k])


class PruneAfterFirstEpoch(Method):
    """Physically halves every group at the end of epoch 0 (an EPI-like schedule)."""

    def on_epoch_end(self, model, epoch, metrics):
        return EpochEnd(EpochAction.PRUNE if epoch == 0 else EpochAction.CONTINUE)

    def prune_now(self, model):
        graph = PruningGraph(model, self.ctx.example, 4)
        return remove_channels(graph, [torch.arange(max(1, g.size // 2)) for g in graph.groups])


def test_prune_mid_training_rebuilds_optimizer_and_resumes(tmp_path) -> None:
    spec = JobSpec()
    method = PruneAfterFirstEpoch(
        spec.method, MethodContext(spec, torch.zeros(1, 3, SIZE, SIZE), 4, torch.device("cpu"), 1)
    )
    dense_macs = count_macs(_model(), torch.zeros(1, 3, SIZE, SIZE))
    result = fit(_model(), method, SCHEDULE, _ctx(tmp_path))
    macs = [r["macs"] for r in result.history]
    assert macs[0] < 0.4 * dense_macs and macs[0] == macs[1] == macs[2]
    first = result.history[0]
    assert first["event"] == "pruned" and first["bn_recalibrated"] is True
    assert first["macs_before"] == dense_macs and first["top1_before"] is not None
    samples = 96  # 6 steps of 16 per epoch
    assert first["train_macs"] == dense_macs * samples, "the pruning epoch trained the dense network"
    assert [r["train_macs"] for r in result.history[1:]] == [macs[0] * samples] * 2
    assert result.history[2]["top1"] > 40.0, "training went on after the prune (4 classes: chance is 25%)"
    # the checkpoint holds the pruned architecture: a fresh dense model is rebuilt to it on restore
    again = fit(_model(), method, SCHEDULE, _ctx(tmp_path))
    assert describe(again.model, "resnet20", 4, 3, SIZE) == describe(result.model, "resnet20", 4, 3, SIZE)


def test_lr_schedule_warmup_then_cosine() -> None:
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)), "cosine must not increase"
    assert f[-1] < 0.01
    assert lr_factor(50, total, 0, "constant") == 1.0


def test_a_checkpoint_of_an_older_format_is_not_resumed(tmp_path) -> None:
    """A job whose checkpoint an older engine wrote trains the phase again instead of failing on it
    (and the runner, asking ``has_checkpoint``, runs the method's ``start_phase`` again)."""
    torch.save({"phase": "train", "epoch": 1, "optimizer": {}, "finished": False}, tmp_path / "train.pt")
    messages: list[str] = []
    reporter = NullReporter()
    reporter.message = messages.append  # type: ignore[method-assign]
    ctx = _ctx(tmp_path, reporter)
    assert not has_checkpoint(ctx, "train")
    result = fit(_model(), _method(), SCHEDULE, ctx)
    assert result.resumed_from is None and len(result.history) == SCHEDULE.epochs
    assert messages == ["train: its checkpoint was written by an older engine; training it again"]
    assert has_checkpoint(ctx, "train")


@pytest.mark.parametrize("batches", [20, 0])
def test_the_report_says_where_batchnorm_statistics_were_re_estimated(tmp_path, batches: int) -> None:
    spec = parse_spec(
        {
            "schedule": {"epochs": 1, "max_steps_per_epoch": 2, "bn_recalibration_batches": batches},
            "export": {"formats": ["safetensors"]},
            "device": "cpu",
        }
    )
    report = run(spec, tmp_path).report
    assert report.bn_recalibration == (["finetune:start"] if batches else []), "magnitude prunes at start"
