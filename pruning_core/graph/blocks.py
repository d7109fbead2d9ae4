"""Stages of residual blocks, and the removal of whole blocks (depth pruning: TAS's depth search).

A *stage* is an ``nn.Sequential`` of ResNet blocks in which every block after the first has an identity
shortcut (same input and output shape), so the stage computes a shallower function with only its first
k blocks (k >= 1). Stages are found by block type: the zoo's CIFAR ``BasicBlock`` (empty shortcut) and
torchvision's ``BasicBlock``/``Bottleneck`` (no ``downsample``). Other models have no stages: they
are pruned in width only, and a method says so in its report.

``keep_blocks`` truncates stages in place; ``surgery.describe`` records every stage's block count, so
``surgery.rebuild`` (``load_pruned``, checkpoints) re-creates a network with fewer blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from ..errors import ModelError


@dataclass(frozen=True)
class Stage:
    """A stage: the module path of its ``nn.Sequential`` and how many blocks it holds."""

    name: str
    blocks: int


def _identity_checks() -> dict[type, Callable[[nn.Module], bool]]:
    """Block type -> whether a block of it adds its input unchanged (an identity shortcut)."""
    from ..models.zoo import BasicBlock

    checks: dict[type, Callable[[nn.Module], bool]] = {BasicBlock: lambda b: len(b.shortcut) == 0}
    try:
        from torchvision.models import resnet
    except ImportError:  # torchvision is optional for the zoo's own models
        return checks
    for cls in (resnet.BasicBlock, resnet.Bottleneck):
        checks[cls] = lambda b: b.downsample is None
    return checks


def find_stages(model: nn.Module) -> list[Stage]:
    """The model's stages, in module order: ``nn.Sequential`` modules made only of known residual
    blocks, every one after the first with an identity shortcut."""
    checks = _identity_checks()
    stages = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or len(m) == 0:
            continue
        blocks = list(m)
        if not all(type(b) in checks for b in blocks):
            continue
        if all(checks[type(b)](b) for b in blocks[1:]):
            stages.append(Stage(name, len(blocks)))
    return stages


def keep_blocks(model: nn.Module, depths: Mapping[str, int]) -> nn.Module:
    """Keep the first ``depths[stage]`` blocks of each named stage (in place; returns ``model``).
    Parameter names of the kept blocks do not change."""
    stages = {s.name: s for s in find_stages(model)}
    for name, k in depths.items():
        if name not in stages:
            raise ModelError(f"{name!r} is not a stage of residual blocks of this model")
        if not 1 <= k <= stages[name].blocks:
            raise ModelError(f"stage {name!r} has {stages[name].blocks} blocks; cannot keep {k}")
        if k == stages[name].blocks:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = model.get_submodule(name)
        setattr(parent, child, nn.Sequential(*list(old)[:k]))
    return model


def depths(model: nn.Module) -> dict[str, int]:
    """Blocks per stage, ``{stage name: count}`` (empty for a model without stages)."""
    return {s.name: s.blocks for s in find_stages(model)}
