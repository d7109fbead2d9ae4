"""``target.allocation: latency``: every layer of the dense network timed once on the job's device, and
each group's pruned share (from the MAC allocation) divided by the MACs its channels cost per second
they take, relative to the network.

The properties: the time after a layer is charged to that layer; with time proportional to MACs the
allocation is exactly the MAC allocation; a group whose channels are slow for their MACs is pruned
more, at the same MAC budget; a rate moves a group's share in proportion, never a whole group; a job
measures once and a resumed job reuses what it measured."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pruning_core.artifacts.inference import prepare_for_inference
from pruning_core.graph.budget import select_by_rates, select_to_budget
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.importance import magnitude
from pruning_core.graph.macs import layer_geometry
from pruning_core.jobs.runner import run
from pruning_core.methods.psap.method import allocate
from pruning_core.methods.psap.options import PSAPOptions
from pruning_core.models.zoo import build_model
from pruning_core.spec import SpecError, parse_spec
from pruning_core.speed import layer_times
from pruning_core.speed import target as speed_target
from pruning_core.speed.layer_times import (
    LayerTimes,
    TimeModel,
    latency_rates,
    load_or_measure,
    measure_layer_times,
)
from tests.specs import quick_spec

SLEEP_S = 0.05  # far above a preempted thread's stall on a busy 2-core machine (~10 ms seen)


class Sleep(nn.Module):
    """A leaf that takes ``SLEEP_S`` of wall time (stands for slow pooling or activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLEEP_S)
        return x


class Shared(nn.Module):
    """conv1, a slow leaf, conv2 called twice (weight sharing), pooling, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.slow = Sleep()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.slow(torch.relu(self.conv1(x)))
        x = self.conv2(torch.relu(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def test_the_time_after_a_layer_is_charged_to_it_and_a_shared_layer_per_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # unfolded: torch.fx would trace through Sleep (not a torch.nn leaf) and drop its sleep
    monkeypatch.setattr(
        layer_times, "prepare_for_inference", lambda m, d: prepare_for_inference(m, d, fold=False)
    )
    model = Shared().eval()
    names = [g.name for g in layer_geometry(model, torch.zeros(1, 3, 16, 16)).values()]
    assert names == ["conv1", "conv2", "conv2", "fc"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP partner to wait for when another process takes a core
    try:
        t = measure_layer_times(model, (3, 16, 16), names, "cpu", batch_size=2, repeats=3)
    finally:
        torch.set_num_threads(threads)
    assert t.names == tuple(names) and t.batch_size == 2 and t.device == "cpu"
    assert t.rest_s[0] >= 0.9 * SLEEP_S  # conv1's rest holds the slow leaf after it
    assert max(t.rest_s[1:]) < 0.5 * SLEEP_S  # and no other layer's
    assert all(c > 0 for c in t.conv_s)  # both calls of conv2 are timed, each under its own key
    assert max(t.conv_s) < 0.5 * SLEEP_S


def test_every_layer_of_a_folded_network_is_found_and_timed() -> None:
    """Folding rebuilds the network with torch.fx: its layers must keep the names the cost model uses."""
    graph = _resnet20()
    t = measure_layer_times(graph.model, (3, 32, 32), graph.cost.layer_names, "cpu", batch_size=2, repeats=2)
    assert len(t.conv_s) == len(graph.cost.layers) and all(c > 0 for c in t.conv_s)
    assert sum(t.rest_s) > 0  # activations, additions and pooling between the layers are charged too


def _resnet20() -> PruningGraph:
    torch.manual_seed(0)
    return PruningGraph(build_model("resnet20", 10, 3).eval(), torch.zeros(1, 3, 32, 32), 10)


def _times(graph: PruningGraph, per_mac: dict[str, float] | None = None) -> LayerTimes:
    """Synthetic layer times: 1 ns per MAC, ``per_mac[name]`` ns for the layers it names."""
    per_mac = per_mac or {}
    macs = [lc.geom.macs for lc in graph.cost.layers]
    names = tuple(graph.cost.layer_names)
    return LayerTimes(
        names=names,
        conv_s=tuple(m * per_mac.get(n, 1.0) * 1e-9 for n, m in zip(names, macs, strict=True)),
        rest_s=tuple(0.0 for _ in names),
        batch_size=8,
        device="cpu",
    )


def test_with_time_proportional_to_macs_the_rates_are_one_and_the_allocation_is_the_macs() -> None:
    graph = _resnet20()
    times = _times(graph)
    rates = latency_rates(graph, times)
    assert rates == pytest.approx([1.0] * len(graph.groups), rel=1e-9)
    model = TimeModel(graph.cost, times)
    full = torch.tensor(graph.full_keep(), dtype=torch.float64)
    assert model.seconds(full).item() == pytest.approx(times.total_s, rel=1e-12)
    half = full / 2
    assert model.seconds(half).item() == pytest.approx(graph.cost.macs(half).item() * 1e-9, rel=1e-12)
    scores = magnitude(graph)
    target = int(0.5 * graph.dense_macs)
    plain = select_to_budget(graph, scores, target, round_to=8)
    reshaped = select_by_rates(graph, scores, rates, target, round_to=8)
    assert [k.tolist() for k in plain] == [k.tolist() for k in reshaped]


def test_a_group_slow_for_its_macs_is_pruned_more_at_the_same_mac_budget() -> None:
    graph = _resnet20()
    slow = "layer1.0.conv1"  # its output channels are one group of their own
    times = _times(graph, {slow: 10.0})
    rates = latency_rates(graph, times)
    (g,) = [i for i, grp in enumerate(graph.groups) if grp.root == slow]
    # its own channels cost the most time per MAC (the residual group feeding it is slowed in part)
    assert rates[g] == min(rates) and rates[g] < 0.5 * sorted(rates)[len(rates) // 2]
    scores = magnitude(graph)
    target = int(0.5 * graph.dense_macs)
    by_macs = [len(k) for k in select_to_budget(graph, scores, target, round_to=1)]
    by_time = [len(k) for k in select_by_rates(graph, scores, rates, target, round_to=1)]
    assert by_time[g] < by_macs[g]
    assert graph.cost.macs(by_time) <= target and graph.cost.macs(by_macs) <= target
    model = TimeModel(graph.cost, times)
    predicted = [model.seconds(torch.tensor(k, dtype=torch.float64)).item() for k in (by_macs, by_time)]
    assert predicted[1] < predicted[0]  # the same MACs, less predicted time


def test_a_rate_moves_a_groups_share_in_proportion_not_the_whole_group() -> None:
    # Scores with a narrow spread in every group (as mean-normalised magnitudes have): the MAC allocation
    # prunes about half of each. Weighing the scores by a rate of 1.3 would lift one group's every score
    # above the others' threshold and keep it whole; dividing its pruned share by 1.3 keeps it pruned.
    graph = _resnet20()
    scores = [torch.linspace(0.9, 1.1, g.size)[torch.randperm(g.size)] for g in graph.groups]
    target = int(0.4 * graph.dense_macs)
    base = [len(k) for k in select_to_budget(graph, scores, target, round_to=1)]
    favoured = max(range(len(base)), key=lambda i: graph.groups[i].size - base[i])
    size = graph.groups[favoured].size
    share = (size - base[favoured]) / size
    assert share > 0.3
    rates = [1.0] * len(base)
    rates[favoured] = 1.3
    keep = select_by_rates(graph, scores, rates, target, round_to=1)
    counts = [len(k) for k in keep]
    assert graph.cost.macs(counts) <= target
    new_share = (size - counts[favoured]) / size
    # less of it pruned, but about share / 1.3 of it (times the common rescaling), not none
    assert share / 1.3 * 0.8 <= new_share < share
    # which channels a group keeps is still its own scores' choice
    top = torch.argsort(scores[favoured], descending=True)[: counts[favoured]]
    assert sorted(keep[favoured].tolist()) == sorted(top.tolist())


def test_rates_are_clipped_so_one_layer_cannot_decide_a_group_alone() -> None:
    graph = _resnet20()
    rates = latency_rates(graph, _times(graph, {"layer1.0.conv1": 1e6}))
    assert min(rates) == pytest.approx(1 / layer_times.RATE_CLIP)


def test_layer_times_are_measured_once_per_job_directory(tmp_path: Path) -> None:
    graph = _resnet20()
    times = _times(graph, {"conv1": 3.0})
    assert LayerTimes.from_json(times.to_json()) == times
    assert load_or_measure(tmp_path, lambda: times) == times

    def again() -> LayerTimes:
        raise AssertionError("a resumed job reuses its layer times")

    assert load_or_measure(tmp_path, again) == times


def test_psap_divides_each_groups_ratio_by_its_rate() -> None:
    graph = _resnet20()
    n = len(graph.groups)
    target = int(0.6 * graph.dense_macs)
    opts = PSAPOptions(adaptive=False)
    even = allocate(graph, [0.5] * n, target, opts)
    rates = [0.25] + [1.0] * (n - 1)
    slowed = allocate(graph, [0.5] * n, target, opts, latency_rates=rates)
    assert slowed[0] < even[0] and graph.cost.macs(slowed) <= target


def test_only_methods_with_a_score_allocator_take_a_latency_allocation() -> None:
    for name in ("magnitude", "epi", "psap"):
        spec = parse_spec(
            {"method": {"name": name}, "target": {"allocation": "latency"}, "schedule": {"epochs": 2}}
        )
        assert spec.target.allocation == "latency"
    for name in ("s2h", "tas"):
        with pytest.raises(SpecError, match=f"allocation: `latency` is for methods .*; {name} spends"):
            parse_spec({"method": {"name": name}, "target": {"allocation": "latency"}})
    assert parse_spec({}).target.allocation == "macs"


@pytest.mark.parametrize("method", ["magnitude", "epi", "psap"])
def test_a_job_allocates_by_latency_within_its_mac_target_and_resumes_without_timing(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = quick_spec("resnet20", {"name": method}, round_to=None, epochs=1 if method == "magnitude" else 2)
    raw = spec.model_dump(mode="json")
    raw["target"]["allocation"] = "latency"
    raw["export"]["latency_batch_size"] = 2
    spec = parse_spec(raw)
    report = run(spec, tmp_path).report
    details = report.method_details
    # kept only where it measured faster than the MAC allocation (tests/test_speed_target.py)
    assert details["allocation"] in {"latency", "macs"} and "allocation_check" in details
    rates = details["latency_rates"]
    assert rates and all(1 / layer_times.RATE_CLIP <= r <= layer_times.RATE_CLIP for r in rates.values())
    assert (tmp_path / layer_times.FILE).exists()
    assert report.achieved_macs_ratio <= report.target_macs_ratio + 0.02

    def no_timing(*_: object, **__: object) -> LayerTimes:
        raise AssertionError("a resumed job reuses its layer times")

    monkeypatch.setattr(layer_times, "measure_layer_times", no_timing)
    monkeypatch.setattr(speed_target, "compare_latency", no_timing)
    again = run(spec, tmp_path).report.method_details
    assert again["latency_rates"] == rates and again["allocation"] == details["allocation"]


def test_the_cli_sets_the_allocation_and_names_the_choices_for_an_unknown_one() -> None:
    from pruning_core.cli import _parser, build_spec

    args = _parser().parse_args(["run", "--method", "epi", "--allocation", "latency", "--epochs", "2"])
    assert parse_spec(build_spec(args)).target.allocation == "latency"
    bad = _parser().parse_args(["run", "--allocation", "fastest"])
    with pytest.raises(SpecError, match="target.allocation: Input should be 'macs' or 'latency'"):
        parse_spec(build_spec(bad))
