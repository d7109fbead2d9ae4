"""The channel step (``target.round_to``): one job setting, defaulting per device type, applied by every
method's allocation; narrow groups, grouped convolutions and the classifier head stay exact."""

from __future__ import annotations

import pytest
import torch

from pruning_core.errors import TargetError
from pruning_core.graph.budget import (
    check_reachable,
    counts_for_ratios,
    group_step,
    min_macs,
    select_to_budget,
)
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.importance import magnitude
from pruning_core.methods.psap.method import allocate
from pruning_core.methods.psap.options import PSAPOptions
from pruning_core.methods.s2h.method import build_spaces, width_step
from pruning_core.methods.tas.space import width_candidates
from pruning_core.models.zoo import build_model
from pruning_core.spec import CHANNEL_STEP_DEFAULTS, JobSpec, parse_spec

STEP = 8


@pytest.fixture(scope="module", params=[("mobilenet_v2", 32), ("tv:resnet18", 32)])
def graph(request) -> PruningGraph:
    """CIFAR MobileNetV2 (groups of 16 to 1280 channels, depthwise couplings) and ResNet-18 (64-512)."""
    name, side = request.param
    torch.manual_seed(0)
    return PruningGraph(build_model(name, 10, 3).eval(), torch.zeros(1, 3, side, side), 10)


def _in_steps(graph: PruningGraph, counts: list[int], step: int) -> bool:
    """Every count a multiple of its group's step: the channel grouping, else ``step`` where the group
    is at least that wide (its full width allowed)."""
    for g, k in zip(graph.groups, counts, strict=True):
        unit = group_step(g.size, g.ch_groups, step)
        if k % unit and k != g.size:
            return False
    return True


def test_the_step_defaults_per_device_type_and_stays_an_option() -> None:
    assert JobSpec().channel_step("cpu") == CHANNEL_STEP_DEFAULTS["cpu"] == 8
    assert JobSpec().channel_step("cuda") == CHANNEL_STEP_DEFAULTS["cuda"]
    assert JobSpec().channel_step("mps") == 1  # a device type nobody measured: any width
    assert parse_spec({"target": {"round_to": 1}}).channel_step("cpu") == 1
    legacy = parse_spec({"method": {"name": "magnitude", "round_to": 4}})
    assert legacy.channel_step("cuda") == 4  # magnitude's old option still works
    both = parse_spec({"method": {"name": "magnitude", "round_to": 4}, "target": {"round_to": 16}})
    assert both.channel_step("cpu") == 16


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_global_allocator_keeps_steps_and_the_target(graph: PruningGraph, ratio: float) -> None:
    target = int(ratio * graph.dense_macs)
    free = [len(k) for k in select_to_budget(graph, magnitude(graph), target)]
    stepped = [len(k) for k in select_to_budget(graph, magnitude(graph), target, round_to=STEP)]
    assert not _in_steps(graph, free, STEP), "without a step some width is off it (or the test is moot)"
    assert _in_steps(graph, stepped, STEP)
    assert graph.cost.macs(stepped) <= target


def test_ratio_allocator_and_psap_keep_steps_and_the_target(graph: PruningGraph) -> None:
    target = int(0.4 * graph.dense_macs)
    ratios = [float(i % 5) / 4 for i in range(len(graph.groups))]
    counts = counts_for_ratios(graph, ratios, target, round_to=STEP)
    assert _in_steps(graph, counts, STEP) and graph.cost.macs(counts) <= target
    sparsity = [0.1 + 0.8 * (i % 3) / 2 for i in range(len(graph.groups))]
    counts = allocate(graph, sparsity, target, PSAPOptions(), round_to=STEP)
    assert _in_steps(graph, counts, STEP) and graph.cost.macs(counts) <= target


def test_s2h_candidates_are_multiples_of_the_step(graph: PruningGraph) -> None:
    for s in build_spaces(graph, None, 1, round_to=STEP):
        widths = [int(w) for w in s.widths]
        assert widths[-1] == s.positions and widths == sorted(set(widths))
        unit = group_step(s.positions, 1, STEP)
        if s.group.ch_groups == 1 and unit > 1:
            assert all(w % unit == 0 for w in widths[:-1]) and s.step % unit == 0
            assert len(widths) >= min(s.positions // unit, 8) - 1  # still a search, not one choice
    # step 1 is the method's own rule: d, 2d, ..., C with 8-16 candidates
    for s in build_spaces(graph, None, 1, round_to=1):
        assert s.step == width_step(s.positions)


def test_the_step_narrows_in_narrow_groups_so_each_keeps_four_widths() -> None:
    # step 8 in groups of 32 channels or more; 4, 2, 1 below, so a 16-channel group is not just 8 or 16
    assert [group_step(c, 1, 8) for c in (8, 16, 24, 31, 32, 64, 1280)] == [2, 4, 4, 4, 8, 8, 8]
    assert group_step(64, 32, 8) == 32  # a grouped convolution keeps its own blocks
    assert group_step(64, 1, 1) == 1 and group_step(100, 1, 6) == 6 and group_step(20, 1, 6) == 3


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_the_stepped_global_allocator_lands_close_under_the_target(name: str, ratio: float) -> None:
    """Rounding one threshold up to each group's step left MACs unspent (resnet20 landed at 0.432 for
    0.5); the allocator widens groups step by step while the budget allows."""
    torch.manual_seed(0)
    graph = PruningGraph(build_model(name, 10, 3).eval(), torch.zeros(1, 3, 32, 32), 10)
    target = int(ratio * graph.dense_macs)
    counts = [len(k) for k in select_to_budget(graph, magnitude(graph), target, round_to=STEP)]
    assert _in_steps(graph, counts, STEP)
    assert target - 0.01 * graph.dense_macs <= graph.cost.macs(counts) <= target


def test_tas_candidates_are_multiples_of_the_step() -> None:
    assert width_candidates(64, step=8) == [16, 24, 32, 40, 48, 56, 64]
    assert width_candidates(100, step=8) == [24, 40, 48, 56, 64, 80, 88, 96, 100]
    assert width_candidates(6, step=8) == width_candidates(6)  # narrower than the step: exact
    assert width_candidates(64, least=20, step=8)[0] == 24


def test_the_step_raises_the_reachable_floor_and_the_check_says_so() -> None:
    graph = PruningGraph(build_model("resnet20", 10, 3), torch.zeros(1, 3, 32, 32), 10)
    free, stepped = min_macs(graph), min_macs(graph, round_to=STEP)
    assert stepped > free
    between = (free + stepped) / 2 / graph.dense_macs
    check_reachable(graph, between)
    with pytest.raises(TargetError, match="steps of 8"):
        check_reachable(graph, between, round_to=STEP)
