"""PSAP is PSAP: step targets tighten to the budget, the allocation meets each step's MAC target tightly
and prunes sparser groups more; the sparsity ratio is read from the trained weights (regrown filters do
not count); the gradient signal is defined for zeroed channels (their own gradient is zero); a pulse
protects a small-norm live filter and brings a zeroed one back with its values, before the cut; zeroed
filters stay trainable (frozen only in the ablation); the network that trains is the network that is
cut at every step (BatchNorm included); and the run ends at the target with the physically pruned
network equal to the masked one."""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.graph.filters import GroupFilters, sparsity
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.macs import count_macs
from pruning_core.graph.surgery import remove_channels
from pruning_core.jobs.runner import run
from pruning_core.methods import MethodContext, Phase
from pruning_core.methods.psap.method import PSAP, allocate, step_epochs, step_target
from pruning_core.methods.psap.options import PSAPOptions
from pruning_core.models.zoo import build_model
from pruning_core.spec import SpecError, parse_spec
from tests.specs import quick_spec


def test_prune_steps_fall_every_interval_and_on_the_last_epoch_and_tighten_to_the_target() -> None:
    assert step_epochs(6, 1) == [0, 1, 2, 3, 4, 5]
    assert step_epochs(7, 3) == [2, 5, 6]
    # the final cut leaves `settle` of the epochs (at least one) to the physically pruned network
    assert step_epochs(10, 1, settle=0.2) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert step_epochs(10, 3, settle=0.2) == [2, 5, 7] and step_epochs(2, 1, settle=0.2) == [0]
    for schedule in ("geometric", "linear"):
        o = PSAPOptions(schedule=schedule, ramp=0.5)
        targets = [step_target(k, 6, 0.3, o) for k in range(1, 7)]
        assert all(a > b for a, b in zip(targets[:3], targets[1:3], strict=False)), targets
        assert targets[2:] == pytest.approx([0.3] * 4)  # reached after half the steps, then held


def test_the_allocation_meets_the_step_target_within_one_channel_per_group_and_prunes_sparser_groups_more() -> (
    None
):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3)
    graph = PruningGraph(model, torch.zeros(1, 3, 32, 32), 10)
    sparsity = torch.rand(len(graph.groups)).tolist()
    target = int(0.4 * graph.dense_macs)
    counts = allocate(graph, sparsity, target, PSAPOptions())
    sizes = [g.size for g in graph.groups]
    assert graph.cost.macs(counts) <= target
    one_more = [min(n, c + 1) for n, c in zip(sizes, counts, strict=True)]
    assert graph.cost.macs(one_more) > target, "one channel more in every group would not fit"
    ratios = [1 - c / n for c, n in zip(counts, sizes, strict=True)]
    for i in range(len(sizes)):
        for j in range(len(sizes)):
            if sparsity[i] >= sparsity[j]:  # monotone, up to one channel of rounding
                assert ratios[i] >= ratios[j] - 1 / sizes[j], (i, j)
    uniform = allocate(graph, sparsity, target, PSAPOptions(adaptive=False))
    by_size: dict[int, set[int]] = {}
    for n, c in zip(sizes, uniform, strict=True):
        by_size.setdefault(n, set()).add(c)
    # without adaptation, one ratio for every group; the budget's leftover (budget.top_up) widens the
    # groups whose channels cost the fewest MACs by a few channels
    assert all(max(v) - min(v) <= n // 8 for n, v in by_size.items()), by_size


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_zeroed_channel_gets_no_filter_gradient_but_a_signal_at_its_output_like_a_live_ones() -> None:
    torch.manual_seed(0)
    net = _Net().train()
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    graph = PruningGraph(net, x[:1], 4)
    filters = GroupFilters(graph)
    (group,) = [i for i, g in enumerate(graph.groups) if g.root == "conv"]
    zeroed = torch.zeros(8, dtype=torch.bool)
    zeroed[0] = True
    filters.zero_(
        [zeroed if i == group else torch.zeros(g.size, dtype=torch.bool) for i, g in enumerate(graph.groups)]
    )
    assert float(net.bn.weight[0]) == 0.0 and float(net.bn.bias[0]) == 0.0, "BatchNorm affine zeroed too"
    filters.attach()
    F.cross_entropy(net(x), y).backward()
    assert float(net.conv.weight.grad[0].abs().sum()) == 0.0, "a dead channel's filter gets no gradient"
    signal = filters.signal()[group]
    assert 0.2 < float(signal[0] / signal[1:].mean()) < 5, signal
    assert not filters.signal()[group].any(), "read once: the next backward starts from zero"


def test_the_sparsity_ratio_counts_zeroed_filters_that_stayed_at_zero_not_those_that_regrew() -> None:
    method, model, x, y = _harness()
    assert method.filters is not None
    g, h = [i for i, z in enumerate(method.zeroed) if z.any()][:2]
    # group h's zeroed filters regrow to a live filter's size; group g's stay at zero
    for slot in method.filters.slots[h]:
        with torch.no_grad():
            w = slot.module.weight
            for row, root in zip(slot.rows.tolist(), slot.roots.tolist(), strict=True):
                if method.zeroed[h][root]:
                    w[row] = torch.randn_like(w[row]) * w.std()
    metrics = method._prune_step()
    assert metrics["sparsity_ratios"][g] >= float(method.zeroed[g].float().mean()) - 0.01 > 0.0
    assert metrics["sparsity_ratios"][h] < metrics["sparsity_ratios"][g]
    assert metrics["sparsity_ratios"][h] < 0.1
    # the measure itself: by weight norm against the live ones' median, never by mask
    norms = [torch.tensor([1.0, 1.1, 0.9, 0.0]), torch.tensor([1.0, 1.1, 0.9, 0.8])]
    live = [torch.tensor([True, True, True, False])] * 2
    assert sparsity(norms, live, 0.1) == [0.25, 0.0]


def _harness(
    options: dict[str, Any] | None = None, step: bool = True
) -> tuple[PSAP, nn.Module, torch.Tensor, torch.Tensor]:
    """PSAP attached to a fresh resnet20, one prune step done (unless not ``step``)."""
    torch.manual_seed(0)
    spec = quick_spec("resnet20", {"name": "psap", **(options or {})}, size=8, target=0.5, epochs=2)
    model = build_model("resnet20", 4, 3).train()
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    method = PSAP(spec.method, MethodContext(spec, x[:1], 4, torch.device("cpu"), count_macs(model, x[:1])))
    method.start_phase(Phase("psap", 1), model)
    if step:
        method._prune_step()
    return method, model, x, y


def _steps(method: PSAP, model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int = 5) -> None:
    """``n`` SGD steps (momentum, weight decay) with the method's hooks around them."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        method.after_backward(model, None)  # type: ignore[arg-type]
        opt.step()
        method.after_step(model, None)  # type: ignore[arg-type]


def _consumer_pulse(method: PSAP, model: nn.Module, g: int, channel: int, factor: float = 50.0) -> None:
    """Make the loss far more sensitive to ``channel``'s output: its consumers read it ``factor`` times
    louder (a large gradient at that channel, whatever its own filter)."""
    assert method.filters is not None
    with torch.no_grad():
        for slot in method.filters.input_slots[g]:
            w = slot.module.weight
            for idx, root in zip(slot.rows.tolist(), slot.roots.tolist(), strict=True):
                if root == channel:
                    w[:, idx] *= factor


def _first_internal_group(method: PSAP) -> int:
    """A zeroed group whose channels feed only one conv (a block's inner channels)."""
    return next(
        i
        for i, z in enumerate(method.zeroed)
        if z.any() and len(method.filters.input_slots[i]) == 1  # type: ignore[union-attr]
    )


def test_a_pulse_brings_a_zeroed_filter_back_with_its_values_and_without_one_it_stays_cut() -> None:
    method, model, x, y = _harness()
    g = _first_internal_group(method)
    channel = int(torch.nonzero(method.zeroed[g])[0])
    slot = method.filters.slots[g][0]  # type: ignore[union-attr]
    row = int(slot.rows[slot.roots == channel][0])
    saved = method.bank[f"{slot.name}.weight"][row].clone()
    assert float(saved.abs().sum()) > 0 and float(slot.module.weight[row].abs().sum()) == 0.0
    _steps(method, model, x, y)
    metrics = method._prune_step()
    assert bool(method.zeroed[g][channel]), "no pulse: it stays pruned"

    method, model, x, y = _harness()
    slot = method.filters.slots[g][0]  # type: ignore[union-attr]
    _consumer_pulse(method, model, g, channel)
    _steps(method, model, x, y)
    assert float(method.ema[g][channel]) > method.options.pulse_factor
    metrics = method._prune_step()
    assert not bool(method.zeroed[g][channel]) and metrics["restored"] >= 1, "spared by the next step"
    assert torch.equal(slot.module.weight[row], saved), "with the values it had when it was zeroed"


def test_a_small_norm_filter_with_a_large_gradient_signal_survives_a_step_that_would_cut_it_by_norm() -> None:
    outcomes = []
    for pulse in (False, True):
        method, model, x, y = _harness(step=False)
        g, channel = 1, 0  # layer1.0.conv1's first channel: the step prunes this group to about half
        if pulse:
            _consumer_pulse(method, model, g, channel)
        _steps(method, model, x, y, n=8)
        for slot in method.filters.slots[g]:  # type: ignore[union-attr]
            with torch.no_grad():
                slot.module.weight[slot.rows[slot.roots == channel]] *= 1e-3  # the smallest norm by far
        method._prune_step()
        outcomes.append(bool(method.zeroed[g][channel]))
    assert outcomes == [True, False], "cut by norm alone; kept when its gradient signal pulses"


@pytest.mark.parametrize("reconstruct", [True, False])
def test_the_network_that_trains_is_the_network_that_is_cut_at_every_step(reconstruct: bool) -> None:
    method, model, x, y = _harness({"reconstruct": reconstruct})
    for step in range(3):
        assert method.graph is not None
        keep = [torch.nonzero(~z).flatten() for z in method.zeroed]
        cut = remove_channels(PruningGraph(copy.deepcopy(model).eval(), x[:1], 4), keep).eval()
        model.eval()
        with torch.no_grad():
            trained, pruned = model(x), cut(x)
        assert count_macs(cut, x[:1]) < count_macs(model, x[:1])
        rel = float((trained - pruned).norm() / trained.norm())
        assert rel < 1e-5, (step, rel)
        model.train()
        _steps(method, model, x, y, n=3)
        method._prune_step()


def _digits(options: dict[str, Any], seed: int = 0, target: float = 0.5, epochs: int = 4) -> Any:
    return parse_spec(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "digits"},
            "method": {"name": "psap", **options},
            "target": {"macs_ratio": target, "round_to": 1},
            "schedule": {"dense_epochs": 3, "epochs": epochs, "batch_size": 64},
            "export": {"formats": ["safetensors"]},
            "seed": seed,
            "device": "cpu",
        }
    )


def _largest(method: PSAP, pruned: list[torch.Tensor]) -> float:
    """The largest filter norm among the pruned channels."""
    assert method.filters is not None
    norms = method.filters.norms()
    return max(float(n[m.cpu()].max()) if m.any() else 0.0 for n, m in zip(norms, pruned, strict=True))


def test_frozen_zeroed_filters_stay_exactly_zero_through_momentum_and_weight_decay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ablation (``reconstruct: false``): zeroed filters are frozen, re-zeroed after every step."""
    moved: list[float] = []
    original = PSAP.after_step

    def checked(self: PSAP, model: nn.Module, ctx: Any) -> None:
        if self.filters is None or not self.steps_done:
            return original(self, model, ctx)
        pruned = self.zeroed
        before = _largest(self, pruned)
        moved.append(before)
        original(self, model, ctx)
        after = _largest(self, pruned)
        assert after == 0.0

    monkeypatch.setattr(PSAP, "after_step", checked)
    spec = _digits({"reconstruct": False}, epochs=3)
    assert spec.schedule.momentum > 0 and spec.schedule.weight_decay > 0
    run(
        spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"max_steps_per_epoch": 6})}),
        tmp_path,
    )
    assert moved and max(moved) > 0, "the optimizer's momentum moves zeroed filters: re-zeroing is needed"


@pytest.mark.parametrize("reconstruct", [True, False])
def test_zeroed_filters_stay_trainable_unless_frozen(reconstruct: bool) -> None:
    method, model, x, y = _harness({"reconstruct": reconstruct})
    assert method.filters is not None
    g = _first_internal_group(method)
    channel = int(torch.nonzero(method.zeroed[g])[0])
    slot = method.filters.slots[g][0]
    with torch.no_grad():  # as if it had regrown
        slot.module.weight[slot.rows[slot.roots == channel]] = 0.1
    _steps(method, model, x, y, n=2)
    regrown = float(method.filters.norms()[g][channel])
    assert (regrown > 0.0) == reconstruct, "between steps only the frozen ablation re-zeroes them"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Any:
    return run(_digits({}), tmp_path_factory.mktemp("psap"))


def test_a_run_ends_at_the_target_with_the_masked_network_physically_pruned(finished) -> None:
    report = finished.report
    assert 0.48 <= report.achieved_macs_ratio <= 0.5
    assert report.finalize_rel_diff is not None and report.finalize_rel_diff < 1e-4
    epochs = [r for r in report.history if r.phase == "psap"]
    steps = [r for r in epochs if "step_target" in r.metrics]
    targets = [r.metrics["step_target"] for r in steps]
    assert targets == sorted(targets, reverse=True) and targets[-1] == pytest.approx(0.5)
    for r in steps[1:]:  # each step meets its target; the masked network follows (plus protected filters)
        assert r.metrics["step_macs_ratio"] <= r.metrics["step_target"]
        assert (r.macs_before or r.macs) / report.dense.macs <= targets[r.epoch - 1] + 0.02
    # the last step is the final cut, and the pruned network trains on (settle)
    cut = steps[-1]
    assert cut.event == "pruned" and epochs[-1].epoch > cut.epoch
    assert all(r.macs == report.pruned.macs for r in epochs if r.epoch >= cut.epoch)
    assert {"layer_ratios", "sparsity_ratios", "protected", "regrown"} <= set(steps[-1].metrics)
    for plot in ("metric-layer_ratios.png", "metric-sparsity_ratios.png", "training.png"):
        assert (finished.workdir / plot).stat().st_size > 0
    assert report.pruned.top1 > 90.0


def test_without_an_injected_pulse_few_zeroed_filters_are_protected(finished) -> None:
    steps = [r for r in finished.report.history if r.phase == "psap" and "zeroed" in r.metrics]
    zeroed = [r.metrics["zeroed"] for r in steps]
    protected = [r.metrics["protected"] for r in steps]
    # protections counted at step k were among the filters zeroed at step k - 1
    share = sum(protected[1:]) / sum(zeroed[:-1])
    assert share < 0.2, (protected, zeroed)


@pytest.mark.parametrize(
    "name, size",
    [
        ("tv:resnet18", 32),
        ("tv:mobilenet_v2", 32),
        ("tv:regnet_x_400mf", 32),
        ("vgg16_bn", 16),
        ("mobilenet_v2", 16),
    ],
)
def test_runs_on_torchvision_and_zoo_cnns(name: str, size: int, tmp_path: Path) -> None:
    spec = quick_spec(name, {"name": "psap"}, size=size, target=0.6, epochs=2, max_steps_per_epoch=2)
    report = run(spec, tmp_path).report
    assert 0.58 <= report.achieved_macs_ratio <= 0.6
    assert report.finalize_rel_diff is not None and report.finalize_rel_diff < 1e-4


@pytest.mark.slow
def test_psap_is_not_worse_than_uniform_soft_filter_pruning(tmp_path: Path) -> None:
    """At the same final MACs on digits, three seeds: PSAP (adaptive ratios, protection) against
    uniform-ratio soft filter pruning without protection, within 0.5 points on the mean."""
    tops: dict[str, list[float]] = {"psap": [], "sfp": []}
    for seed in range(3):
        for key, options in (("psap", {}), ("sfp", {"adaptive": False, "protect": False})):
            report = run(_digits(options, seed, target=0.3, epochs=8), tmp_path / f"{key}-{seed}").report
            assert 0.28 <= report.achieved_macs_ratio <= 0.3
            tops[key].append(report.pruned.top1)
    assert statistics.fmean(tops["psap"]) >= statistics.fmean(tops["sfp"]) - 0.5, tops


def test_a_psap_job_without_training_epochs_is_refused() -> None:
    with pytest.raises(SpecError, match="at least 2 epochs"):
        parse_spec({"method": {"name": "psap"}, "schedule": {"epochs": 1}})
    assert (
        parse_spec({"method": {"name": "psap", "settle": 0}, "schedule": {"epochs": 1}}).schedule.epochs == 1
    )
