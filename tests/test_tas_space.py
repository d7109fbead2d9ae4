"""TAS's search space pieces: the official candidate lists, channel-wise interpolation, Gumbel sampling,
and the expected cost, checked against a brute-force expectation over real, physically built networks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.graph.blocks import find_stages, keep_blocks
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.macs import count_macs
from pruning_core.graph.surgery import remove_channels
from pruning_core.methods.tas.space import (
    align_channels,
    channel_wise_interpolation,
    cost_loss,
    depth_candidates,
    gumbel_pair,
    layer_weights,
    stage_layers,
    tau_at,
    width_candidates,
)
from pruning_core.models.zoo import BasicBlock


def test_candidates_are_the_official_lists() -> None:
    assert width_candidates(16) == [4, 6, 8, 9, 11, 12, 14, 16]
    assert width_candidates(32) == [9, 12, 16, 19, 22, 25, 28, 32]
    assert width_candidates(64) == [19, 25, 32, 38, 44, 51, 57, 64]
    assert width_candidates(3) == [1, 2, 3] and width_candidates(16, least=10) == [10, 11, 12, 14, 16]
    assert depth_candidates(9) == [1, 3, 5, 7, 9] and depth_candidates(18)[-2:] == [17, 18]
    assert depth_candidates(3) == [1, 2, 3] and depth_candidates(2) == [1, 2]


def test_tau_follows_a_cosine_from_max_to_min() -> None:
    assert tau_at(0, 10) == pytest.approx(5.0) and tau_at(10, 10) == pytest.approx(0.1)
    assert tau_at(5, 10) == pytest.approx(2.55)


@pytest.mark.parametrize("c_in, c_out", [(4, 9), (6, 16), (11, 16), (3, 7)])
def test_cwi_is_an_explicit_channel_bin_mean(c_in: int, c_out: int) -> None:
    x = torch.randn(2, c_in, 3, 5)
    explicit = torch.stack(
        [
            x[:, math.floor(j * c_in / c_out) : math.ceil((j + 1) * c_in / c_out)].mean(1)
            for j in range(c_out)
        ],
        dim=1,
    )
    assert torch.allclose(channel_wise_interpolation(x, c_out), explicit, atol=1e-6)
    # the official implementation: adaptive 3-D average pooling of the (unbatched) tensor
    assert torch.allclose(
        channel_wise_interpolation(x, c_out), F.adaptive_avg_pool3d(x, (c_out, 3, 5)), atol=1e-6
    )
    assert torch.equal(channel_wise_interpolation(x, c_in), x)
    v = torch.randn(4, c_in)  # a linear layer's output
    assert channel_wise_interpolation(v, c_out).shape == (4, c_out)


def test_pad_alignment_keeps_each_channel_in_place_and_interpolate_is_cwi() -> None:
    x = torch.randn(2, 5, 3, 3)
    padded = align_channels(x, 8, "pad")
    assert padded.shape == (2, 8, 3, 3)
    assert torch.equal(padded[:, :5], x) and torch.equal(padded[:, 5:], torch.zeros(2, 3, 3, 3))
    assert torch.equal(align_channels(x, 8, "interpolate"), channel_wise_interpolation(x, 8))
    assert not torch.equal(align_channels(x, 8, "interpolate")[:, :5], x), "CWI moves channels"


def test_gumbel_pair_draws_two_distinct_candidates_weighted_by_their_renormalised_probabilities() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 3.0, -1.0, 0.5], requires_grad=True)
    counts = torch.zeros(4)
    for _ in range(300):
        idx, w = gumbel_pair(logits, tau=1.0)
        assert idx[0] != idx[1] and torch.allclose(w.sum(), torch.tensor(1.0))
        counts[idx] += 1
    assert counts.argmax() == 1 and counts.min() > 0
    idx, w = gumbel_pair(logits, tau=0.5)
    w[0].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


class Tiny(nn.Module):
    """A stem and one stage of two identity blocks: three coupled groups and two depths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.layer1 = nn.Sequential(BasicBlock(6, 6, 1), BasicBlock(6, 6, 1))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_expected_cost_equals_the_brute_force_expectation_over_built_networks() -> None:
    x = torch.zeros(1, 3, 5, 5)
    graph = PruningGraph(Tiny(), x, 4)
    assert len(graph.groups) == 3
    cands = [width_candidates(g.size, (0.5, 1.0)) for g in graph.groups]
    stages = stage_layers(graph, find_stages(graph.model))
    torch.manual_seed(3)
    alphas = [torch.randn(len(c)) for c in cands]
    beta = torch.randn(len(stages[0].depths))
    probs = [a.softmax(0) for a in alphas]
    expected_widths = torch.stack(
        [p @ torch.tensor(c, dtype=torch.float32) for p, c in zip(probs, cands, strict=True)]
    )
    formula = graph.cost.macs(
        expected_widths.double(), layer_weights(graph, stages, [beta.softmax(0).double()])
    )
    brute = 0.0
    for choice in itertools.product(*[range(len(c)) for c in cands]):
        for d, depth in enumerate(stages[0].depths):
            torch.manual_seed(0)
            net = Tiny()
            g = PruningGraph(net, x, 4)
            remove_channels(g, [torch.arange(cands[i][j]) for i, j in enumerate(choice)])
            keep_blocks(net, {"layer1": depth})
            p = math.prod(float(probs[i][j]) for i, j in enumerate(choice)) * float(beta.softmax(0)[d])
            brute += p * count_macs(net, x)
    assert formula.item() == pytest.approx(brute, rel=1e-6)


def test_the_cost_loss_is_piecewise_around_the_target() -> None:
    e = torch.tensor(50.0, requires_grad=True)
    assert cost_loss(e, current=60, target=55, tolerance=5).item() == pytest.approx(math.log(50))
    assert cost_loss(e, current=49, target=55, tolerance=5).item() == pytest.approx(-math.log(50))
    assert cost_loss(e, current=52, target=55, tolerance=5).item() == 0.0
    cost_loss(e, current=60, target=55, tolerance=5).backward()
    assert e.grad.item() == pytest.approx(1 / 50)
