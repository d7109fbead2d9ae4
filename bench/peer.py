"""The external peer: Torch-Pruning's own pruner, run directly, bisected to the MAC target.

Torch-Pruning's ``BasePruner`` (``MetaPruner`` before 1.5) takes a channel ratio, not a MAC budget, so
the ratio is bisected, rebuilding from the dense weights at every try, until our counter
(``pruning_core.graph.macs.count_macs``) gives the largest MACs that fit ``target x dense``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from pruning_core.graph.macs import count_macs

RATIO_TOL = 1e-4  # bisection stops when the ratio interval is this narrow


@dataclass(frozen=True)
class PeerResult:
    model: nn.Module
    macs: int
    pruning_ratio: float
    tries: int


def classifier_heads(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """The linear layers that emit the class scores: ignored by the pruner, as in Torch-Pruning's examples."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def tp_prune(model: nn.Module, example: torch.Tensor, num_classes: int, ratio: float) -> nn.Module:
    """Prune ``model`` in place with Torch-Pruning's global group-L2 magnitude pruner at ``ratio``."""
    if ratio <= 0:
        return model
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=classifier_heads(model, num_classes),
    )
    pruner.step()
    return model


def prune_to_macs(
    build: Callable[[], nn.Module], example: torch.Tensor, num_classes: int, target_macs: int, hi: float = 0.9
) -> PeerResult:
    """Bisect the pruning ratio for the largest MACs <= ``target_macs``; ``build`` returns a fresh dense model."""
    tries = 0

    def attempt(ratio: float) -> tuple[nn.Module, int]:
        nonlocal tries
        tries += 1
        model = tp_prune(build().eval(), example, num_classes, ratio)
        return model, count_macs(model, example)

    best = attempt(hi)
    if best[1] > target_macs:
        raise RuntimeError(f"Torch-Pruning at ratio {hi} still has {best[1]} MACs > target {target_macs}")
    lo, best_ratio = 0.0, hi
    while hi - lo > RATIO_TOL:
        mid = (lo + hi) / 2
        model, macs = attempt(mid)
        if macs <= target_macs:
            hi, best, best_ratio = mid, (model, macs), mid
        else:
            lo = mid
    return PeerResult(best[0], best[1], best_ratio, tries)
