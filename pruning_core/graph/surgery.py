"""Physical removal of channels, and the architecture description that rebuilds a pruned model.

``remove_channels`` turns keep decisions into a smaller ``nn.Module`` (Torch-Pruning does the tensor
surgery). ``describe`` / ``rebuild`` round-trip the pruned shapes through plain JSON, so a pruned model
can be loaded from safetensors with no pickled code: the dense model is built from the registry and its
layers are resized to the recorded shapes (and stages of residual blocks cut to their recorded depth).
``permute_channels`` reorders groups' channels in a copy that computes the same function (TAS sorts each
group by importance, so that its "first k channels" are the k most important).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..models.zoo import build_model
from .blocks import depths, keep_blocks
from .groups import NORMS, ChannelGroup, PruningGraph, Slot, all_trainable
from .macs import count_macs

ARCH_FORMAT = "pruning-core/architecture-v1"


def remove_channels(graph: PruningGraph, keep_idx: Sequence[torch.Tensor]) -> nn.Module:
    """Remove every root channel not in ``keep_idx[g]`` from ``graph.model``, in place.

    Returns the same (now smaller) module. Any optimizer holding its old parameters must be rebuilt.
    Raises if channels were due to go but the counted MACs did not drop (Torch-Pruning skips silently
    in some situations, e.g. parameters that do not require grad).
    """
    model = graph.model
    before = count_macs(model, graph.example)
    removed_any = False
    with all_trainable(model):
        for g, keep in zip(graph.groups, keep_idx, strict=True):
            drop = sorted(set(range(g.size)) - set(keep.tolist()))
            if not drop:
                continue
            if len(drop) == g.size:
                raise ModelError(f"refusing to remove every channel of group {g.root}")
            graph.tp_group(g, drop).prune(record_history=False)
            removed_any = True
    if removed_any and count_macs(model, graph.example) >= before:
        raise ModelError("channel removal left the MACs unchanged; the dependency graph did not apply")
    return model


def keep_counts(keep_idx: Sequence[torch.Tensor]) -> list[int]:
    return [int(k.numel()) for k in keep_idx]


# --- architecture JSON ---


def _shape(m: nn.Module) -> dict[str, Any] | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return {
            "type": type(m).__name__,
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "groups": m.groups,
        }
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, NORMS):
        return {"type": type(m).__name__, "num_features": m.num_features}
    return None


def describe(
    model: nn.Module, model_name: str, num_classes: int, in_channels: int, image_size: int
) -> dict[str, Any]:
    """A JSON-able description of ``model``'s layer shapes (and, for a model with stages of residual
    blocks, how many blocks each stage holds), enough for ``rebuild``."""
    layers = {name: s for name, m in model.named_modules() if (s := _shape(m)) is not None}
    arch: dict[str, Any] = {
        "format": ARCH_FORMAT,
        "model": {"name": model_name, "num_classes": num_classes, "in_channels": in_channels},
        "input": {"channels": in_channels, "size": image_size},
        "layers": layers,
    }
    if stages := depths(model):
        arch["blocks"] = stages
    return arch


def rebuild(arch: dict[str, Any]) -> nn.Module:
    """Build the model an architecture description names, cut to its recorded blocks per stage (a file
    without ``blocks`` keeps them all) and resized to its recorded layer shapes.

    Parameters are freshly allocated (uninitialised); load a state dict afterwards.
    """
    if arch.get("format") != ARCH_FORMAT:
        raise ModelError(f"unsupported architecture format {arch.get('format')!r}; expected {ARCH_FORMAT}")
    meta = arch["model"]
    model = build_model(meta["name"], meta["num_classes"], meta["in_channels"])
    keep_blocks(model, arch.get("blocks", {}))
    modules = dict(model.named_modules())
    for name, shape in arch["layers"].items():
        if name not in modules or _shape(modules[name]) is None:
            raise ModelError(f"architecture names layer {name!r} that {meta['name']} does not have")
        if _shape(modules[name]) != shape:
            _resize(modules[name], shape)
    return model


@torch.no_grad()
def _resize(m: nn.Module, s: dict[str, Any]) -> None:
    """Give ``m`` the recorded shape with new (empty) parameters of the right size."""
    if isinstance(m, nn.modules.conv._ConvNd):
        m.in_channels, m.out_channels, m.groups = s["in_channels"], s["out_channels"], s["groups"]
        _new_param(m, "weight", (m.out_channels, m.in_channels // m.groups, *m.kernel_size))
        _new_param(m, "bias", (m.out_channels,))
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = s["in_features"], s["out_features"]
        _new_param(m, "weight", (m.out_features, m.in_features))
        _new_param(m, "bias", (m.out_features,))
    else:  # BatchNorm
        m.num_features = n = s["num_features"]
        for p in ("weight", "bias"):
            _new_param(m, p, (n,))
        for b in ("running_mean", "running_var"):
            if getattr(m, b) is not None:
                setattr(m, b, torch.empty(n))


def _new_param(m: nn.Module, attr: str, shape: tuple[int, ...]) -> None:
    if getattr(m, attr, None) is not None:
        setattr(m, attr, nn.Parameter(torch.empty(shape)))


# --- reordering channels ---

_OUT_TENSORS = ("weight", "bias", "running_mean", "running_var")


def permutable(graph: PruningGraph, g: ChannelGroup) -> bool:
    """Whether ``permute_channels`` can reorder group ``g``: ungrouped channels, and every consumer a
    plain (groups = 1) conv, a depthwise conv (its filters are permuted as outputs) or a linear layer."""
    if g.ch_groups > 1:
        return False
    for s in g.inputs:
        m = graph.modules[s.module]
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups not in (1, m.in_channels):
            return False
    return True


def _source_index(slot: Slot, order: torch.Tensor, length: int) -> torch.Tensor:
    """Per index of a module dimension of ``length``, where its new value comes from: the module index
    carrying root channel r takes the one carrying ``order[r]`` (several per root channel after a
    flatten, matched in order); indices outside the slot stay."""
    src = torch.arange(length)
    by_root: dict[int, list[int]] = {}
    for mi, ri in zip(slot.module_idx.tolist(), slot.root_idx.tolist(), strict=True):
        by_root.setdefault(ri, []).append(mi)
    for r, targets in by_root.items():
        for t, s in zip(targets, by_root[int(order[r])], strict=True):
            src[t] = s
    return src


@torch.no_grad()
def permute_channels(graph: PruningGraph, orders: Sequence[torch.Tensor | None]) -> nn.Module:
    """A copy of ``graph.model`` whose group g has its root channels in ``orders[g]`` (a permutation of
    ``range(group.size)``: new channel i is old channel ``orders[g][i]``; None leaves the group as it
    is), applied to every layer that produces the group's channels and every layer that consumes them,
    so the copy computes the same function. ``graph.model`` is left untouched. Groups must be
    ``permutable``."""
    model = copy.deepcopy(graph.model)
    modules = dict(model.named_modules())
    for g, order in zip(graph.groups, orders, strict=True):
        if order is None:
            continue
        if not permutable(graph, g):
            raise ValueError(f"group {g.root} cannot be reordered (grouped channels)")
        for slots, out_dim in ((g.outputs, True), (g.inputs, False)):
            for slot in slots:
                m = modules[slot.module]
                depthwise = isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
                if not out_dim and depthwise:
                    continue  # a depthwise conv's one input per filter moves with its output slot
                names = _OUT_TENSORS if out_dim else ("weight",)
                dim = 0 if out_dim else 1
                for name in names:
                    t = getattr(m, name, None)
                    if t is None or t.dim() <= dim:
                        continue
                    src = _source_index(slot, order.cpu(), t.shape[dim]).to(t.device)
                    t.copy_(t.index_select(dim, src))
    return model
