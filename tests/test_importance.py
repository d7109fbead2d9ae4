"""Channel importance in one place: magnitude, BatchNorm scale and accumulated first-order Taylor."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.groups import PruningGraph
from pruning_core.importance import STATIC, TaylorAccumulator, bn_scale, magnitude
from pruning_core.zoo import build_model


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
        for s in STATIC.get(name)(graph):
            assert s.mean().item() == pytest.approx(1.0)
    gamma = bn_scale(graph)[0]
    assert torch.allclose(gamma, torch.arange(1.0, 9.0) / 4.5), "|gamma| of the group's one BatchNorm"
    conv, bn, nxt = model[0], model[1], model[3]
    l2 = (conv.weight.pow(2).sum((1, 2, 3)) + bn.weight.pow(2) + nxt.weight.pow(2).sum((0, 2, 3))) / 3
    assert torch.allclose(magnitude(graph, 2)[0], (l2 / l2.mean()).detach(), rtol=1e-5)
