"""Channel masks applied beside the model, after normalisation (the model's code is not edited).

A mask is one vector per group (``values[g]``, shape ``(group.size,)``): 1 keeps a channel, 0 removes
it, anything between scales it (soft masks for S2H-style methods; gradients flow into ``values``).
Masks act on the outputs of the group's BatchNorms, and on conv/linear outputs that no BatchNorm of the
group follows: a scale applied before BN would be undone by BN. A mask on the whole output of an affine
BatchNorm is folded into its affine parameters (``BN(x) * m`` computed as BN with weight ``w * m`` and
bias ``b * m``): the same function and gradients without a full-size multiply and its backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .groups import NORMS, ChannelGroup, PruningGraph, Slot


class ChannelMasks:
    """Per-group mask vectors and the forward hooks that apply them to a model."""

    def __init__(self, graph: PruningGraph, values: Sequence[torch.Tensor] | None = None):
        self.graph = graph
        self.values: list[torch.Tensor] = (
            list(values) if values is not None else [torch.ones(g.size) for g in graph.groups]
        )
        self._points = mask_points(graph)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._folded: list[nn.Module] = []  # BatchNorms whose forward folds the mask in

    @classmethod
    def from_keep(cls, graph: PruningGraph, keep_idx: Sequence[torch.Tensor]) -> ChannelMasks:
        """Binary masks keeping root channels ``keep_idx[g]`` of every group."""
        values = []
        for g, idx in zip(graph.groups, keep_idx, strict=True):
            v = torch.zeros(g.size)
            v[idx] = 1.0
            values.append(v)
        return cls(graph, values)

    def keep_indices(self) -> list[torch.Tensor]:
        """Root channel indices with a non-zero mask, per group."""
        return [torch.nonzero(v.detach() != 0).flatten() for v in self.values]

    def attach(self) -> None:
        for name, slots in self._points.items():
            module = self.graph.modules[name]
            if _foldable(module, slots):
                module.forward = self._folded_forward(module, slots[0][0])  # the instance's, not the class's
                self._folded.append(module)
            else:
                self._handles.append(module.register_forward_hook(self._hook(slots, module)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._folded:
            del module.forward  # back to the class's forward
        self._folded.clear()

    def _folded_forward(self, module: nn.Module, group: int):
        """``module``'s own forward with weight ``w * m`` and bias ``b * m`` for group ``group``'s mask
        ``m``: equal to ``BN(x) * m`` in every mode (batch or running statistics), in value and gradient.
        The scaled tensors stand in for the parameters only for the call (as ``torch.func``'s
        ``functional_call`` does), so checkpoints and optimisers see the parameters unchanged."""
        forward = type(module).forward
        params = module._parameters

        def folded(x: torch.Tensor) -> torch.Tensor:
            weight, bias = params["weight"], params["bias"]
            m = self.values[group].to(device=weight.device, dtype=weight.dtype)
            params["weight"], params["bias"] = weight * m, bias * m
            try:
                return forward(module, x)
            finally:
                params["weight"], params["bias"] = weight, bias

        return folded

    @contextmanager
    def applied(self) -> Iterator[ChannelMasks]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def _hook(self, slots: list[tuple[int, Slot]], module: nn.Module):
        dim = -1 if isinstance(module, nn.Linear) else 1
        # the common case, one group covering the whole output in order: the group's vector is the scale
        whole = len(slots) == 1 and _identity(slots[0][1], _width(module))
        indices: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # moved once per device

        def hook(_m, _inp, out: torch.Tensor) -> torch.Tensor:
            shape = [1] * out.dim()
            shape[dim] = -1
            if whole:
                g = slots[0][0]
                return out * self.values[g].to(device=out.device, dtype=out.dtype).view(shape)
            if out.device not in indices:
                indices[out.device] = [
                    (slot.module_idx.to(out.device), slot.root_idx.to(out.device)) for _, slot in slots
                ]
            scale = torch.ones(out.shape[dim], device=out.device, dtype=out.dtype)
            for (g, _slot), (module_idx, root_idx) in zip(slots, indices[out.device], strict=True):
                src = self.values[g].to(device=out.device, dtype=out.dtype)[root_idx]
                scale = scale.index_copy(0, module_idx, src)
            return out * scale.view(shape)

        return hook


def _foldable(module: nn.Module, slots: list[tuple[int, Slot]]) -> bool:
    """An affine BatchNorm whose whole output, in order, is one group's: its mask folds into the affine."""
    return (
        isinstance(module, NORMS)
        and module.affine
        and len(slots) == 1
        and _identity(slots[0][1], _width(module))
    )


def _width(module: nn.Module) -> int | None:
    for attr in ("num_features", "out_channels", "out_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


def _identity(slot: Slot, width: int | None) -> bool:
    """Whether ``slot`` maps root channel i to module channel i for the module's whole width."""
    n = len(slot.module_idx)
    return (
        width == n
        and torch.equal(slot.module_idx, torch.arange(n))
        and torch.equal(slot.root_idx, torch.arange(n))
    )


def mask_points(graph: PruningGraph) -> dict[str, list[tuple[int, Slot]]]:
    """Module name -> the (group, slot) pairs whose mask applies to that module's output."""
    points: dict[str, list[tuple[int, Slot]]] = {}
    for g in graph.groups:
        normed = _layers_followed_by_norm(graph, g)
        for slot in g.outputs:
            module = graph.modules[slot.module]
            if isinstance(module, NORMS) or slot.module not in normed:
                points.setdefault(slot.module, []).append((g.index, slot))
    return points


def _layers_followed_by_norm(graph: PruningGraph, g: ChannelGroup) -> set[str]:
    """Names of the group's output layers whose every consumer is a BatchNorm of the same group."""
    norms = {graph.modules[s.module] for s in g.outputs if isinstance(graph.modules[s.module], NORMS)}
    followed = set()
    for slot in g.outputs:
        node = graph.dg.module2node.get(graph.modules[slot.module])
        if node is not None and node.outputs and all(n.module in norms for n in node.outputs):
            followed.add(slot.module)
    return followed
