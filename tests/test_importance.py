"""Channel importance in one place: magnitude, BatchNorm scale and accumulated first-order Taylor."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.importance import STATIC, TaylorAccumulator, bn_scale, magnitude, neuron_l2
from pruning_core.models.zoo import build_model


def _small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def _backward(model: nn.Module, seed: int, size: int = 8) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, size, size, generator=g), torch.randint(0, 4, (4,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def test_taylor_is_the_squared_sum_of_g_times_w_over_coupled_parameters() -> None:
    model = _small()
    graph = PruningGraph(model, torch.randn(1, 3, 8, 8), 4)
    acc = TaylorAccumulator(graph)
    expected = torch.zeros(8)
    for seed in (1, 2):
        _backward(model, seed)
        acc.accumulate()
        conv, bn, nxt = model[0], model[1], model[3]
        gw = lambda p: (p * p.grad).detach()  # noqa: E731
        per_channel = (
            gw(conv.weight).flatten(1).sum(1)
            + gw(conv.bias)
            + gw(bn.weight)
            + gw(bn.bias)
            + gw(nxt.weight).sum((0, 2, 3))  # the consumer's input slice of each channel
        )
        expected += per_channel.pow(2)
    assert acc.steps == 2
    assert torch.allclose(acc.sums[0], expected, rtol=1e-5, atol=1e-12)
    scores = acc.scores()
    assert scores[0].mean().item() == pytest.approx(1.0)


def test_taylor_state_round_trips_and_handles_depthwise_groups() -> None:
    model = build_model("mobilenet_v2", 4, 3)
    graph = PruningGraph(model, torch.randn(1, 3, 16, 16), 4)
    with torch.no_grad():  # a dead channel: every parameter of channel 0 of the first group is zero
        for slot in graph.groups[0].outputs:
            m = graph.modules[slot.module]
            m.weight[slot.module_idx[slot.root_idx == 0]] = 0
            if getattr(m, "bias", None) is not None:
                m.bias[slot.module_idx[slot.root_idx == 0]] = 0
        for slot in graph.groups[0].inputs:
            graph.modules[slot.module].weight[:, slot.module_idx[slot.root_idx == 0]] = 0
    acc = TaylorAccumulator(graph)
    _backward(model, 0, 16)
    acc.accumulate()
    assert [len(s) for s in acc.scores()] == [g.size for g in graph.groups]
    assert acc.sums[0][0] == 0 and acc.sums[0][1:].gt(0).all()
    again = TaylorAccumulator(graph)
    again.load_state_dict(acc.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.sums, acc.sums, strict=True))


def test_static_scores_are_mean_normalised_and_rank_as_defined() -> None:
    model = _small().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.arange(1.0, 9.0))
        model[0].weight[2].zero_()
    graph = PruningGraph(model, torch.randn(1, 3, 8, 8), 4)
    for name in STATIC:
        if name == "neuron_l2":  # normalised by parameters per neuron instead (below)
            continue
        for s in STATIC.get(name)(graph):
            assert s.mean().item() == pytest.approx(1.0)
    conv = model[0]
    per_param = conv.weight.flatten(1).norm(dim=1) / conv.weight[0].numel() ** 0.5
    assert torch.allclose(neuron_l2(graph)[0], per_param.detach()), "||W_n|| / sqrt(P), not per group"
    assert neuron_l2(graph)[0][2] == 0.0
    gamma = bn_scale(graph)[0]
    assert torch.allclose(gamma, torch.arange(1.0, 9.0) / 4.5), "|gamma| of the group's one BatchNorm"
    conv, bn, nxt = model[0], model[1], model[3]
    l2 = (conv.weight.pow(2).sum((1, 2, 3)) + bn.weight.pow(2) + nxt.weight.pow(2).sum((0, 2, 3))) / 3
    assert torch.allclose(magnitude(graph, 2)[0], (l2 / l2.mean()).detach(), rtol=1e-5)


def test_taylor_through_depthwise_grouped_and_flattened_consumers() -> None:
    """conv -> depthwise -> grouped 1x1 -> flatten -> linear: every coupled slice, by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: coupled with its input channels
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 12, 1, groups=2),  # grouped: input channel c sits in block c // 4
        nn.BatchNorm2d(12),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),  # channel k feeds linear inputs 4k .. 4k+3
        nn.Linear(48, 4),
    )
    graph = PruningGraph(model, torch.randn(1, 3, 8, 8), 4)
    assert [g.root for g in graph.groups] == ["2", "4"]  # Torch-Pruning roots it at the depthwise conv
    acc = TaylorAccumulator(graph)
    _backward(model, 3)
    acc.accumulate()
    gw = {n: (p * p.grad).detach() for n, p in model.named_parameters()}
    pw_in = gw["4.weight"].reshape(2, 6, 4).sum(1).flatten()  # (block, out in block, in in block)
    first = (
        gw["0.weight"].sum((1, 2, 3)) + gw["0.bias"] + gw["1.weight"] + gw["1.bias"]
        + gw["2.weight"].sum((1, 2, 3)) + gw["2.bias"] + gw["3.weight"] + gw["3.bias"] + pw_in
    )  # fmt: skip
    second = (
        gw["4.weight"].sum((1, 2, 3)) + gw["4.bias"] + gw["5.weight"] + gw["5.bias"]
        + gw["8.weight"].reshape(4, 12, 4).sum((0, 2))
    )  # fmt: skip
    assert torch.allclose(acc.sums[0], first.pow(2), rtol=1e-4, atol=1e-12)
    assert torch.allclose(acc.sums[1], second.pow(2), rtol=1e-4, atol=1e-12)


def test_taylor_skips_a_step_whose_gradients_overflowed() -> None:
    model = _small()
    graph = PruningGraph(model, torch.randn(1, 3, 8, 8), 4)
    acc = TaylorAccumulator(graph)
    _backward(model, 1)
    acc.accumulate()
    before = [s.clone() for s in acc.sums]
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    acc.accumulate()
    assert torch.equal(acc.sums[0], before[0]), "an overflowed group adds nothing"
    assert torch.equal(acc.sums[1], 2 * before[1]), "the other groups still count"
