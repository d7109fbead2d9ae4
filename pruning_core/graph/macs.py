"""The one MAC and params counter: integer multiply-accumulates of conv and linear layers.

MACs are counted for one input sample (batch size 1). Params count every parameter of the model.
``layer_geometry`` records the per-layer factors that ``groups.CostModel`` uses to predict MACs from
channel keep counts before any surgery.

Only conv and linear modules are counted. Matrix products between activations (attention) and layers
applied through their weights rather than their module would be missed, so ``groups.PruningGraph``
refuses models that do either (it watches for the torch functions below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# torch functions (by name) whose MACs the counter does not see: matrix products, and attention kernels.
MATRIX_PRODUCTS = frozenset(
    {
        "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "einsum",
        "scaled_dot_product_attention", "multi_head_attention_forward", "_native_multi_head_attention",
    }
)  # fmt: skip
# torch functions a COUNTED module calls with its own weight; seen elsewhere, the layer is used functionally.
LAYER_FUNCTIONS = frozenset({"linear", "conv1d", "conv2d", "conv3d"})


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer's MACs depend on besides its channel counts.

    MACs = out_channels * (in_channels / groups) * positions, where ``positions`` is
    kernel volume x output positions (conv) or the number of rows a linear layer sees.
    """

    name: str
    in_channels: int
    out_channels: int
    groups: int
    positions: int

    @property
    def macs(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * self.positions


def _geometry(name: str, m: nn.Module, out: torch.Tensor) -> LayerGeometry:
    if isinstance(m, nn.Linear):
        rows = out.numel() // out.shape[-1] // out.shape[0]
        return LayerGeometry(name, m.in_features, m.out_features, 1, rows)
    kernel = 1
    for k in m.kernel_size:
        kernel *= k
    spatial = out[0, 0].numel()
    return LayerGeometry(name, m.in_channels, m.out_channels, m.groups, kernel * spatial)


@torch.no_grad()
def layer_geometry(model: nn.Module, example: torch.Tensor) -> dict[str, LayerGeometry]:
    """Run one forward on ``example`` (N x C x H x W, N >= 1) and record every conv/linear layer.

    A layer called several times (weight sharing) is counted once per call, under ``name``,
    ``name#1``, ...
    """
    names = {m: n for n, m in model.named_modules()}
    found: dict[str, LayerGeometry] = {}

    def hook(m: nn.Module, _inp, out: torch.Tensor) -> None:
        name = names[m]
        key, i = name, 0
        while key in found:
            i += 1
            key = f"{name}#{i}"
        found[key] = _geometry(name, m, out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COUNTED)]
    was_training = model.training
    try:
        model.eval()
        model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Integer MACs of all conv and linear layers for one sample shaped like ``example[0]``."""
    return sum(g.macs for g in layer_geometry(model, example).values())


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int


def measure(model: nn.Module, example: torch.Tensor) -> Cost:
    """MACs (per sample) and params of ``model``."""
    return Cost(count_macs(model, example), count_params(model))
