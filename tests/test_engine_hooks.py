"""What the paper methods need from the one loop: several backward passes (some restricted to a parameter
set), optimizers and LR rules per parameter set, split data streams, per-epoch method numbers and
views, BatchNorm statistics re-estimated, all resumable bit for bit on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pruning_core.artifacts.report import EpochRecord, epoch_line, scalar_metrics
from pruning_core.errors import Cancelled
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.macs import measure
from pruning_core.graph.surgery import remove_channels
from pruning_core.methods.base import Method, MethodContext
from pruning_core.spec import JobSpec, Schedule
from pruning_core.training.batches import Streams, epoch_plan, steps_per_epoch
from pruning_core.training.engine import (
    EpochAction,
    EpochEnd,
    NullReporter,
    StepOutput,
    TrainContext,
    fit,
    load_checkpoint,
)
from pruning_core.training.evaluation import View, evaluate, evaluate_views, recalibrate_bn
from pruning_core.training.optim import OptimizerConfig, Optimizers, ParamSet
from tests.test_engine import SIZE, NoisyBlobs, StopAt, _ctx, _model, _untimed

SCHEDULE = Schedule(epochs=2, batch_size=16, lr=0.05)


class Gated(nn.Module):
    """The model's logits scaled per class by a gate: a stand-in for mask logits beside the model."""

    def __init__(self, model: nn.Module, gate: nn.Parameter):
        super().__init__()
        self.model, self.gate = model, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * torch.sigmoid(self.gate)


class GateMethod(Method):
    """Two parameter sets (weights: the schedule's SGD; gate: Adam at a constant LR), an optional second
    loss restricted to the gate, per-step and per-epoch numbers, and two views."""

    def __init__(self, extra_loss: bool = True, streams: bool = False, device: str = "cpu"):
        spec = JobSpec()
        super().__init__(
            spec.method, MethodContext(spec, torch.zeros(1, 3, SIZE, SIZE), 4, torch.device(device), 1)
        )
        self.extra_loss, self.streams = extra_loss, streams
        self.gate = nn.Parameter(torch.zeros(4, device=device))
        self.grads: list[dict[str, torch.Tensor]] = []
        self.parts: list[int] = []

    def param_sets(self, model):
        gate_opt = OptimizerConfig("adam", lr=0.01, betas=(0.5, 0.999), weight_decay=1e-3)
        return [
            ParamSet("weights", list(model.parameters())),
            ParamSet("gate", [self.gate], gate_opt, lr_rule="constant"),
        ]

    def training_step(self, model, batch, ctx):
        if self.streams:
            assert len(batch) == 2 and all(len(b) == 2 for b in batch), "zip mode: a batch of each part"
            (x, y), (x_arch, _) = batch
            assert not torch.equal(x, x_arch)
        else:
            x, y = batch
        self.parts.append(ctx.part)
        with ctx.autocast():
            logits = Gated(model, self.gate)(x)
            loss = F.cross_entropy(logits, y)
            entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()
        ctx.backward(loss, retain_graph=self.extra_loss)
        if self.extra_loss:  # e.g. S2H's KL(s || sg(h)): may only move the mask logits
            ctx.backward(entropy, params="gate")
        return StepOutput(loss.detach(), {"gate_norm": self.gate.detach().norm()})

    def after_backward(self, model, ctx):
        assert ctx.stepping == ("weights", "gate")
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        self.grads.append({**grads, "gate": self.gate.grad.clone()})

    def on_epoch_end(self, model, epoch, metrics):
        assert {"top1", "top1_gated", "train_loss"} <= set(metrics)
        return EpochEnd(metrics={"indicator": 0.5 + epoch / 10, "ratios": [0.1 * epoch, 0.2]})

    def eval_views(self, model):
        return {"gated": View(Gated(model, self.gate)), "model": View(model)}

    def state_dict(self):
        return {**super().state_dict(), "gate": self.gate.detach().clone()}

    def load_state_dict(self, state, model):
        super().load_state_dict(state, model)
        with torch.no_grad():
            self.gate.copy_(state["gate"])


class TwoUpdates(GateMethod):
    """TAS-like: the weights step on one part, then the gate on the other, in one training step."""

    def training_step(self, model, batch, ctx):
        (x, y), (xa, ya) = batch
        with ctx.autocast():
            loss = F.cross_entropy(model(x), y)
        ctx.backward(loss, params="weights")
        ctx.update("weights")
        with ctx.autocast():  # the architecture step sees the weights just updated
            arch = F.cross_entropy(Gated(model, self.gate)(xa), ya)
        ctx.backward(arch, params="gate")
        ctx.update("gate")
        if self.extra_loss:  # a second update of one set in one step is refused
            ctx.backward(F.cross_entropy(Gated(model, self.gate)(xa), ya), params="gate")
            ctx.update("gate")
        return StepOutput(loss.detach())

    def after_backward(self, model, ctx):
        self.grads.append({"stepping": ctx.stepping, "weights_have_grad": model.fc.weight.grad is not None})


def test_sets_can_update_mid_step_in_order_once_each() -> None:
    method = TwoUpdates(extra_loss=False)
    gate = method.gate.detach().clone()
    fit(_model(), method, SCHEDULE.model_copy(update={"epochs": 1}), _ctx(None), streams=Streams())
    assert [g["stepping"] for g in method.grads[:2]] == [("weights",), ("gate",)]
    assert not method.grads[1]["weights_have_grad"], "the architecture loss never reached the weights"
    assert len(method.grads) == 2 * 3, "two updates per step, nothing left for the end of the step"
    assert not torch.equal(method.gate, gate)
    with pytest.raises(RuntimeError, match="stepped twice"):
        fit(_model(), TwoUpdates(), SCHEDULE.model_copy(update={"epochs": 1}), _ctx(None), streams=Streams())


def _one_step(extra_loss: bool) -> dict[str, torch.Tensor]:
    method = GateMethod(extra_loss)
    fit(_model(), method, SCHEDULE.model_copy(update={"epochs": 1, "max_steps_per_epoch": 1}), _ctx(None))
    return method.grads[0]


def test_restricted_backward_leaves_every_other_gradient_bit_identical() -> None:
    without, with_extra = _one_step(False), _one_step(True)
    weights = [k for k in without if k != "gate"]
    assert weights
    for k in weights:
        assert torch.equal(without[k], with_extra[k]), f"the gate-only loss reached {k}"
    assert not torch.equal(without["gate"], with_extra["gate"]), "the restricted loss must reach the gate"


class TakeGrads(GateMethod):
    """Separates the gate's gradient of two losses with ``take_grads`` and steps on their sum."""

    def training_step(self, model, batch, ctx):
        x, y = batch
        logits = Gated(model, self.gate)(x)
        loss = F.cross_entropy(logits, y)
        entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()
        self.expected = [torch.autograd.grad(v, self.gate, retain_graph=True)[0] for v in (loss, entropy)]
        ctx.backward(loss, retain_graph=True)
        self.first = ctx.take_grads("gate")
        self.cleared = self.gate.grad is None
        ctx.backward(entropy, "gate")
        self.second = ctx.take_grads([self.gate])
        self.gate.grad = self.first[0] + self.second[0]  # what a method does with them
        return StepOutput(loss.detach())


def test_take_grads_separates_the_gradients_of_several_losses() -> None:
    method = TakeGrads()
    fit(_model(), method, SCHEDULE.model_copy(update={"epochs": 1, "max_steps_per_epoch": 1}), _ctx(None))
    assert method.cleared, "taken gradients leave .grad"
    assert torch.allclose(method.first[0], method.expected[0]) and torch.allclose(
        method.second[0], method.expected[1]
    )
    assert method.grads[0]["gate"].equal(method.first[0] + method.second[0])


@pytest.mark.parametrize("streams", [False, True])
def test_two_optimizers_resume_bit_identical(tmp_path: Path, streams: bool) -> None:
    split = Streams((0.5, 0.5)) if streams else None
    ref_method = GateMethod(streams=streams)
    ref = fit(_model(), ref_method, SCHEDULE, _ctx(None), streams=split)
    with pytest.raises(Cancelled):
        fit(_model(), GateMethod(streams=streams), SCHEDULE, _ctx(tmp_path, StopAt(1, 1)), streams=split)
    method = GateMethod(streams=streams)
    torch.manual_seed(999)
    resumed = fit(_model(), method, SCHEDULE, _ctx(tmp_path), streams=split)
    assert resumed.resumed_from == 1
    assert torch.equal(method.gate, ref_method.gate), "the gate (and its Adam state) resume exactly"
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, ref.model.state_dict()[k]), k
    assert _untimed(resumed.history) == _untimed(ref.history), "the resumed epoch reports the same"
    optim = load_checkpoint(tmp_path / "train.pt")["optim"]["optimizers"]
    assert {"exp_avg", "exp_avg_sq"} <= set(optim["gate"]["state"][0]), "the gate trains with Adam"
    assert "momentum_buffer" in optim["weights"]["state"][0], "the weights train with the schedule's SGD"


def test_lr_rules_and_method_numbers_reach_the_record(tmp_path: Path) -> None:
    result = fit(_model(), GateMethod(), SCHEDULE, _ctx(None))
    first, last = result.history
    assert first["metrics"]["lr_gate"] == last["metrics"]["lr_gate"] == 0.01, "constant LR rule"
    assert first["metrics"]["lr_weights"] > last["metrics"]["lr_weights"], "the schedule's cosine"
    assert last["metrics"]["indicator"] == pytest.approx(0.6) and last["metrics"]["ratios"] == [0.1, 0.2]
    assert first["metrics"]["gate_norm"] > 0, "step metrics are averaged into the epoch"
    assert set(first["views"]) == {"gated", "model"} and first["top1"] == first["views"]["gated"]
    assert first["train_macs"] == 96 * (_model_macs()), "one forward per sample, counted as it ran"
    rec = EpochRecord.model_validate(last)
    assert scalar_metrics([rec]) == ["gate_norm", "indicator", "lr_weights", "lr_gate"], "LRs come last"
    line = epoch_line(last)
    assert "indicator 0.6" in line and "gated" in line and "ratios" not in line


def _model_macs() -> int:
    from pruning_core.graph.macs import count_macs

    return count_macs(_model(), torch.zeros(1, 3, SIZE, SIZE))


# --- data streams ---


def test_streams_split_is_fixed_disjoint_and_reordered_per_epoch() -> None:
    s = Schedule(batch_size=8)
    split = Streams((0.5, 0.5))
    e0, e1 = epoch_plan(100, s, 3, 0, split), epoch_plan(100, s, 3, 1, split)
    assert len(e0) == steps_per_epoch(100, s, split) == 6  # 50 per part, 6 full batches
    parts0 = [{i for step in e0 for i in step[k]} for k in range(2)]
    assert not parts0[0] & parts0[1], "the parts are disjoint"
    assert all(len(p) == 48 for p in parts0)
    full = [set(), set()]
    for e in range(6):
        for step in epoch_plan(100, s, 3, e, split):
            for k in range(2):
                full[k].update(step[k])
    assert not full[0] & full[1], "the split never changes between epochs"
    assert e0 != e1, "each epoch has its own order"
    assert epoch_plan(100, s, 3, 0, split) == e0, "a pure function of (seed, epoch)"
    alt = epoch_plan(100, s, 3, 0, Streams((0.5, 0.5), "alternate"))
    assert len(alt) == 12 and all(len(step) == 1 for step in alt)
    assert {i for step in alt[0::2] for i in step[0]} == parts0[0]


def test_alternate_streams_tell_the_step_its_part() -> None:
    method = GateMethod()
    fit(
        _model(),
        method,
        SCHEDULE.model_copy(update={"epochs": 1}),
        _ctx(None),
        streams=Streams(mode="alternate"),
    )
    assert method.parts == [0, 1, 0, 1, 0, 1]


# --- BatchNorm statistics ---


def test_recalibration_is_rng_neutral_and_views_keep_the_training_statistics() -> None:
    model = _model()
    blobs = NoisyBlobs(96, 0)
    data = TensorDataset(blobs.x, blobs.y)  # no random augmentation: two re-estimations must agree
    ctx = TrainContext(torch.device("cpu"), 0, data, data, bn_batches=3, bn_batch_size=16)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    assert recalibrate_bn(model, ctx.train, ctx.device, batches=3, batch_size=16)
    assert torch.equal(torch.rand(3), expected_next), "the global RNG must be left as it was"
    bn = model.bn1
    assert bn.num_batches_tracked.item() == 3 and bn.momentum == 0.1

    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn.running_mean.fill_(3.0)  # stale statistics: a view that asks for re-estimation must not see them
    stale = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = evaluate_views({"m": View(model, recalibrate_bn=True)}, ctx.test, ctx.device, ctx.recalibrate)[
        "m"
    ]
    assert all(torch.equal(v, stale[k]) for k, v in model.state_dict().items()), "restored after the view"
    model.load_state_dict(before)
    assert fresh == evaluate_views({"m": View(model)}, ctx.test, ctx.device, ctx.recalibrate)["m"]


# --- what the review of the first version found ---


def test_an_overflowed_step_is_skipped_and_hidden_from_after_backward() -> None:
    w = nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opts = Optimizers([ParamSet("weights", [w])], Schedule(lr=0.1), scaler)
    seen: list[tuple[str, ...]] = []
    opts.begin()
    opts.backward((w * torch.tensor([1.0, 1e35, 1.0])).sum())  # 1e35 x 2**16 overflows float32
    opts.finish(seen.append)
    assert seen == [], "after_backward must not see inf gradients"
    assert torch.equal(w.detach(), torch.ones(3)) and scaler.get_scale() == 2.0**15
    opts.begin()
    opts.backward(w.sum())
    opts.finish(seen.append)
    assert seen == [("weights",)] and not torch.equal(w.detach(), torch.ones(3))


def test_parameter_sets_are_disjoint_and_named() -> None:
    w = nn.Parameter(torch.ones(2))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(ValueError, match="both sets"):
        Optimizers([ParamSet("a", [w]), ParamSet("b", [w])], Schedule(), scaler)
    with pytest.raises(ValueError, match="no trainable"):
        Optimizers([ParamSet("a", [])], Schedule(), scaler)
    opts = Optimizers([ParamSet("a", [w])], Schedule(), scaler)
    with pytest.raises(KeyError, match="no parameter set 'b'"):
        opts.step(["b"], lambda names: None)


class Metrics(GateMethod):
    """Numbers as a method might produce them: numpy scalars, tensors, or (wrongly) nested lists."""

    def __init__(self, nested: bool = False):
        super().__init__(extra_loss=False)
        self.nested = nested

    def on_epoch_end(self, model, epoch, metrics):
        if self.nested:
            return EpochEnd(metrics={"protected": [[1, 2], [3]]})
        return EpochEnd(metrics={"np": np.float64(0.25), "ratios": torch.tensor([0.5, 1.0])})


def test_method_numbers_become_plain_python_and_resume(tmp_path: Path) -> None:
    result = fit(_model(), Metrics(), SCHEDULE, _ctx(tmp_path))
    metrics = result.history[0]["metrics"]
    assert metrics["np"] == 0.25 and type(metrics["np"]) is float and metrics["ratios"] == [0.5, 1.0]
    again = fit(_model(), Metrics(), SCHEDULE, _ctx(tmp_path))  # the checkpoint loads (weights_only)
    assert _untimed(again.history) == _untimed(result.history)
    with pytest.raises(TypeError, match="'protected' must be a number or a flat list"):
        fit(_model(), Metrics(nested=True), SCHEDULE, _ctx(None))


class _PrunedEvents(NullReporter):
    def __init__(self) -> None:
        self.events: list[dict] = []

    def pruned(self, data: dict) -> None:
        self.events.append(data)


class GatePruneAtEnd(GateMethod):
    """Prunes the network physically at the end of the last epoch; the gate's Adam state must survive."""

    def on_epoch_end(self, model, epoch, metrics):
        return EpochEnd(EpochAction.PRUNE if epoch == SCHEDULE.epochs - 1 else EpochAction.CONTINUE)

    def prune_now(self, model):
        graph = PruningGraph(model, self.ctx.example, 4)
        return remove_channels(graph, [torch.arange(max(1, g.size // 2)) for g in graph.groups])


def test_a_prune_record_describes_the_network_after_and_untouched_sets_keep_their_state(tmp_path) -> None:
    method = GatePruneAtEnd(extra_loss=False)
    blobs = NoisyBlobs(32, 1)
    test = TensorDataset(blobs.x, blobs.y)  # no noise drawn per read: two evaluations must agree
    seen = _PrunedEvents()
    ctx = TrainContext(
        torch.device("cpu"), 3, NoisyBlobs(96, 0), test, seen, tmp_path, example=method.ctx.example
    )
    dense = measure(_model(), method.ctx.example)
    result = fit(_model(), method, SCHEDULE, ctx)
    last = result.history[-1]
    after = evaluate(Gated(result.model, method.gate), test, torch.device("cpu"))
    assert last["event"] == "pruned" and last["top1"] == after["top1"]
    assert last["test_loss"] == after["test_loss"] and last["views"]["gated"] == after["top1"]
    assert last["macs"] < last["macs_before"]
    (event,) = seen.events  # the pruned event: the network's own numbers before and after
    assert (event["macs_before"], event["params_before"]) == (dense.macs, dense.params)
    pruned = measure(result.model, method.ctx.example)
    assert (event["macs_after"], event["params_after"]) == (pruned.macs, pruned.params)
    assert event["macs_after"] < event["macs_before"] and event["text"].startswith("pruned: MACs ")
    gate_state = load_checkpoint(tmp_path / "train.pt")["optim"]["optimizers"]["gate"]["state"][0]
    assert gate_state["step"].item() == 2 * 6, "the gate's Adam state carried over the prune"
