"""Groups, masks and physical removal agree: same logits, and MACs predicted from keep counts are exact."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.errors import GraphError
from pruning_core.graph.groups import PruningGraph, top_channels
from pruning_core.graph.macs import count_macs
from pruning_core.graph.masks import ChannelMasks
from pruning_core.graph.surgery import permutable, permute_channels, remove_channels
from pruning_core.models.zoo import build_model
from pruning_core.spec import CIFAR_MODELS

CASES = [(n, 32) for n in CIFAR_MODELS]  # torchvision's models: tests/test_torchvision_models.py


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


class _Coupled(nn.Module):
    """stem -> BN -> mid -> ``after`` -> head: the stem's group is plain; the mid's passes ``after``."""

    def __init__(self, after: str):
        super().__init__()
        self.after = after
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.ln = nn.LayerNorm(16)
        self.layer_scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(F.relu(self.bn(self.stem(x))))
        if self.after == "groupnorm":
            x = self.gn(x)
        elif self.after == "layernorm":
            x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif self.after == "parameter":
            x = x * self.layer_scale
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize(
    ("after", "why"), [("groupnorm", "GroupNorm"), ("layernorm", "LayerNorm"), ("parameter", "nn.Parameter")]
)
def test_groups_masking_cannot_model_are_left_out(after: str, why: str) -> None:
    """The rest of the model still prunes, exactly; the left-out group says why."""
    torch.manual_seed(0)
    model = _Coupled(after).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 8, 8)
    graph = PruningGraph(model, x, num_classes=10)
    assert [g.root for g in graph.groups] == ["stem"]
    assert why in graph.excluded["mid"] and "\n" not in graph.excluded["mid"]
    keep = [torch.arange(4)]
    with torch.no_grad(), ChannelMasks.from_keep(graph, keep).applied():
        masked = model(x)
    remove_channels(graph, keep)
    with torch.no_grad():
        assert (model(x) - masked).abs().max().item() < 1e-5
    assert count_macs(model, x) == graph.cost.macs([4])


class _Refused(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        n, c, h, w = x.shape
        if self.kind == "attention":
            t = x.flatten(2)
            x = (
                (torch.softmax(t.transpose(1, 2) @ t, -1) @ t.transpose(1, 2))
                .transpose(1, 2)
                .reshape(n, c, h, w)
            )
        elif self.kind == "functional":
            return F.linear(x.mean((2, 3)), self.fc.weight, self.fc.bias)
        elif self.kind == "shuffle":
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        elif self.kind == "nothing left":
            x = F.group_norm(x, 1)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("attention", "matrix products outside conv/linear layers (matmul in the model's forward"),
        ("functional", "applies layer 'fc' outside its module"),
        ("shuffle", "reshapes the channel dimension ((1, 8, 6, 6) -> (1, 2, 4, 6, 6)"),
        ("nothing left", "nothing in this model can be pruned safely"),
        ("too small", "the model does not run on 3x2x2 inputs"),
    ],
)
def test_unsupported_models_are_refused_in_one_line(kind: str, why: str) -> None:
    size = 2 if kind == "too small" else 6
    model = _Refused(kind).eval()
    if kind == "too small":
        model.conv.padding = (0, 0)
    with pytest.raises(GraphError) as info:
        PruningGraph(model, torch.randn(2, 3, size, size), num_classes=10)
    assert why in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "size"), [("resnet20", 16), ("vgg16_bn", 32), ("tv:mobilenet_v2", 32), ("tv:densenet121", 32)]
)
def test_permuting_channels_keeps_the_logits_and_leaves_the_model(name: str, size: int) -> None:
    """Every reorderable group reversed (residual sums, depthwise convs, concatenations, a flatten into
    the classifier): the copy computes the same logits, the original keeps its weights."""
    torch.manual_seed(0)
    model = build_model(name, 10, 3).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, size, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = PruningGraph(model, x[:1], 10)
    orders = [torch.randperm(g.size) if permutable(graph, g) else None for g in graph.groups]
    assert sum(o is not None for o in orders) >= len(orders) // 2
    permuted = permute_channels(graph, orders).eval()
    assert torch.allclose(permuted(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    moved = [k for k, v in permuted.state_dict().items() if v.dim() and not torch.equal(v, before[k])]
    assert len(moved) > len(before) // 4, "the channels really moved"
