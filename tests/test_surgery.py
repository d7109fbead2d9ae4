"""Groups, masks and physical removal agree: same logits, and MACs predicted from keep counts are exact."""

import pytest
import torch
from torch import nn

from pruning_core.groups import PruningGraph, top_channels
from pruning_core.macs import count_macs
from pruning_core.masks import ChannelMasks
from pruning_core.spec import CIFAR_MODELS
from pruning_core.surgery import remove_channels
from pruning_core.zoo import build_model

TORCHVISION = ["resnet18", "mobilenet_v2", "vgg11_bn", "densenet121", "efficientnet_b0", "regnet_x_400mf"]
CASES = [(n, 32) for n in CIFAR_MODELS] + [(f"tv:{n}", 64) for n in TORCHVISION]


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics, so a channel that survives by mistake changes the logits."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize(("name", "size"), CASES, ids=[c[0] for c in CASES])
def test_masked_equals_physically_pruned(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, size, size)
    graph = PruningGraph(model, x, num_classes=10)
    assert graph.groups, "no prunable groups found"
    keep = [top_channels(g, torch.rand(g.size), max(g.ch_groups, g.size // 2)) for g in graph.groups]

    with torch.no_grad(), ChannelMasks.from_keep(graph, keep).applied():
        masked = model(x)
    with torch.no_grad():
        dense = model(x)
    predicted = graph.cost.macs([len(k) for k in keep])
    remove_channels(graph, keep)
    with torch.no_grad():
        pruned = model(x)

    assert (masked - dense).abs().max() > 1e-3, "masks had no effect"
    assert (masked - pruned).abs().max().item() < 1e-4
    assert count_macs(model, x) == predicted < graph.dense_macs
    assert pruned.shape == (2, 10), "the classifier head must keep one output per class"


def test_head_excluded_by_role_even_when_a_conv() -> None:
    """A 1x1-conv head (SqueezeNet-style) keeps its class outputs; a hidden layer as wide as the class
    count is still prunable."""
    model = nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1),
        nn.BatchNorm2d(10),
        nn.ReLU(),
        nn.Conv2d(10, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    graph = PruningGraph(model, torch.randn(1, 3, 8, 8), num_classes=10)
    roots = {g.root for g in graph.groups}
    assert roots == {"0", "3"}
    assert graph.heads == [model[6]]


def test_frozen_parameters_still_pruned() -> None:
    """Torch-Pruning finds no dependencies when parameters do not require grad; we must not care."""
    model = build_model("resnet20", 10, 3).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    graph = PruningGraph(model, x, num_classes=10)
    keep = [torch.arange(max(1, g.size // 2)) for g in graph.groups]
    dense = count_macs(model, x)
    remove_channels(graph, keep)
    assert count_macs(model, x) < dense * 0.4
    assert not any(p.requires_grad for p in model.parameters())


def test_grouped_conv_keeps_whole_blocks() -> None:
    model = build_model("tv:regnet_x_400mf", 10, 3).eval()
    graph = PruningGraph(model, torch.randn(1, 3, 64, 64), num_classes=10)
    grouped = [g for g in graph.groups if g.ch_groups > 1]
    assert grouped
    g = grouped[0]
    idx = top_channels(g, torch.rand(g.size), g.size // 2)
    assert len(idx) % g.ch_groups == 0
    positions = (idx % g.block).reshape(g.ch_groups, -1)
    assert (positions == positions[0]).all(), "each block must keep the same positions"
