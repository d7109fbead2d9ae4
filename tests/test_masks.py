"""A mask folded into a BatchNorm's affine is ``BN(x) * m``: the same outputs, running statistics and
gradients (into the input, the BN parameters and the mask) as the multiply after BN it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.masks import ChannelMasks


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _pass(model: _Net, mask: torch.Tensor, x: torch.Tensor, fold: bool) -> dict[str, torch.Tensor]:
    """Forward and backward with ``mask`` on the conv/BN group, folded or as a multiply after BN."""
    graph = PruningGraph(model, x[:1], num_classes=4)
    masks = ChannelMasks(graph, [mask])
    if fold:
        masks.attach()
        assert model.bn in masks._folded
    else:  # the reference: a multiply on BN's output
        handle = model.bn.register_forward_hook(lambda _m, _i, out: out * mask.view(1, -1, 1, 1))
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    if fold:
        masks.detach()
    else:
        handle.remove()
    return {
        "out": out.detach(),
        "x": x.grad,
        "mask": mask.grad,
        "weight": model.bn.weight.grad,
        "bias": model.bn.bias.grad,
        "mean": model.bn.running_mean.clone(),
        "var": model.bn.running_var.clone(),
    }


@pytest.mark.parametrize("train", [True, False], ids=["batch-statistics", "running-statistics"])
def test_a_folded_mask_is_the_multiply_after_batchnorm(train: bool) -> None:
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.train(train)
    x = torch.randn(6, 3, 5, 5)
    mask = torch.rand(8)
    mask[2] = 0.0  # a removed channel too
    runs = []
    for fold in (True, False):
        m = copy.deepcopy(model)
        runs.append(_pass(m, mask.clone().requires_grad_(), x, fold))
    folded, reference = runs
    for key in folded:
        torch.testing.assert_close(folded[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_detach_restores_the_class_forward_and_the_parameters() -> None:
    model = _Net()
    x = torch.randn(2, 3, 5, 5)
    graph = PruningGraph(model, x, num_classes=4)
    keys = set(model.state_dict())
    weight = model.bn.weight
    masks = ChannelMasks(graph, [torch.zeros(8)])
    masks.attach()
    assert not torch.equal(model(x), masks.detach() or model(x))
    assert "forward" not in vars(model.bn)
    assert set(model.state_dict()) == keys and model.bn.weight is weight
    assert isinstance(model.bn.weight, nn.Parameter)
