"""PSAP is PSAP: step targets tighten to the budget, the allocation meets each step's MAC target tightly
and prunes sparser groups more, the gradient signal is scale-free (the raw one is not), an injected
gradient pulse protects a zeroed filter that would otherwise stay pruned and no pulse protects none,
zeroed filters stay exactly zero through momentum and weight decay, and the run ends at the target
with the physically pruned network equal to the masked one."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.filters import GroupFilters
from pruning_core.groups import PruningGraph
from pruning_core.macs import count_macs
from pruning_core.methods import MethodContext, Phase
from pruning_core.methods.psap import PSAP, allocate, step_epochs, step_target
from pruning_core.runner import run
from pruning_core.spec import PSAPOptions, SpecError, parse_spec
from pruning_core.zoo import build_model
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
    assert all(len(v) == 1 for v in by_size.values()), "without adaptation, one ratio for every group"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_the_gradient_signal_of_a_zeroed_filter_before_batchnorm_is_comparable_to_a_live_ones() -> None:
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
    with torch.no_grad():
        net.bn.bias[0] = 0.5  # the zeroed channel's constant output passes the ReLU
    filters.attach()
    F.cross_entropy(net(x), y).backward()
    scaled = filters.grad_signal()[group]
    raw = net.conv.weight.grad.flatten(1).norm(dim=1)
    assert raw[0] / raw[1:].mean() > 50, "BatchNorm divides a constant channel by sqrt(eps)"
    assert 0.05 < scaled[0] / scaled[1:].mean() < 5
    # a regrowing filter's gradient, tempered by std / median live std, is a live filter's size again
    live = [
        ~zeroed if i == group else torch.ones(g.size, dtype=torch.bool) for i, g in enumerate(graph.groups)
    ]
    filters.temper_grads_([~m for m in live], live)
    tempered = net.conv.weight.grad.flatten(1).norm(dim=1)
    assert 0.05 < tempered[0] / tempered[1:].mean() < 5 and torch.equal(tempered[1:], raw[1:])


def _harness() -> tuple[PSAP, nn.Module, torch.Tensor, torch.Tensor]:
    """PSAP (default options) attached to a fresh resnet20, one prune step done."""
    torch.manual_seed(0)
    spec = quick_spec("resnet20", {"name": "psap"}, size=8, target=0.5, epochs=2)
    model = build_model("resnet20", 4, 3).train()
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    method = PSAP(spec.method, MethodContext(spec, x[:1], 4, torch.device("cpu"), count_macs(model, x[:1])))
    method.start_phase(Phase("psap", 1), model)
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


def test_an_injected_gradient_pulse_protects_a_zeroed_filter_and_no_pulse_protects_none() -> None:
    method, model, x, y = _harness()
    assert method.graph is not None
    g = next(i for i, z in enumerate(method.zeroed) if z.any())
    channel = int(torch.nonzero(method.zeroed[g])[0])
    slot = method.filters.slots[g][0]  # type: ignore[union-attr]
    row = int(slot.rows[slot.roots == channel][0])
    _steps(method, model, x, y)
    assert not any(p.any() for p in method.protected), "no pulse, no protection"
    metrics = method._prune_step()
    assert metrics["protected"] == 0 and bool(method.zeroed[g][channel]), "it stays pruned"

    method, model, x, y = _harness()
    pulse = torch.zeros_like(slot.module.weight)
    module = dict(model.named_modules())[slot.name]
    pulse[row] = 1e4  # a gradient spike on the zeroed filter
    handle = module.weight.register_hook(lambda grad: grad + pulse)
    _steps(method, model, x, y)
    handle.remove()
    assert bool(method.protected[g][channel])
    assert sum(int(p.sum()) for p in method.protected) == 1, "only the pulsed filter"
    norms = method.filters.norms()  # type: ignore[union-attr]
    assert float(norms[g][channel]) > 0.0, "a protected filter regrows"
    others = [n[z] for n, z in zip(norms, method._pruned(), strict=True)]
    assert all(float(n.abs().sum()) == 0.0 for n in others), "the other zeroed filters stay at zero"
    metrics = method._prune_step()
    assert metrics["protected"] == 1 and not bool(method.zeroed[g][channel]), "spared by the next step"
    assert metrics["regrown"] >= 1


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


def test_zeroed_filters_stay_exactly_zero_through_momentum_and_weight_decay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved: list[float] = []
    original = PSAP.after_step

    def checked(self: PSAP, model: nn.Module, ctx: Any) -> None:
        if self.filters is None or not self.steps_done:
            return original(self, model, ctx)
        pruned = self._pruned()
        before = _largest(self, pruned)
        moved.append(before)
        original(self, model, ctx)
        after = _largest(self, pruned)
        assert after == 0.0

    monkeypatch.setattr(PSAP, "after_step", checked)
    spec = _digits({}, epochs=3)
    assert spec.schedule.momentum > 0 and spec.schedule.weight_decay > 0
    run(
        spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"max_steps_per_epoch": 6})}),
        tmp_path,
    )
    assert moved and max(moved) > 0, "the optimizer's momentum moves zeroed filters: re-zeroing is needed"


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
