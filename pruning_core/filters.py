"""The filters of every coupled group, for methods that prune softly by zeroing them (PSAP).

A group's *filters* are the output-channel slices of the conv and linear layers whose outputs carry the
group's channels (weight rows and bias entries; several layers per channel where a residual sum couples
them). BatchNorms and the consumers' input slices are not filters: soft filter pruning zeroes the
producing weights and keeps everything else trainable, so a zeroed filter still receives gradients and
can regrow.

``GroupFilters`` reads and edits them per group, in root-channel order:

- ``norms()``: L2 norm per channel over all its filter slices;
- ``sparsity(eps)``: the fraction of a group's filter weights below ``eps`` times their mean magnitude;
- ``zero_(masks)`` / ``mask_grads_(masks)``: zero the weights (or gradients) of the masked channels;
- ``temper_grads_(masks, live)``: scale regrowing filters' gradients down to a live filter's size;
- ``attach()`` / ``grad_signal()``: record each BatchNorm-fed layer's batch std in the forward, and a
  per-channel gradient norm that is comparable between zeroed and live filters (see its docstring;
  the raw gradient norm is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .groups import NORMS, PruningGraph
from .masks import _layers_followed_by_norm


@dataclass
class _FilterSlot:
    """One layer's rows that carry a group's channels: ``rows[i]`` is root channel ``roots[i]``."""

    name: str
    module: nn.Module
    rows: torch.Tensor  # LongTensor (n,), output-channel indices in the module
    roots: torch.Tensor  # LongTensor (n,), the group's channel of each row
    norm_eps: float | None  # eps of the BatchNorm right after the layer, None if there is none
    identity: bool  # row i is root channel i for every row of the layer: no indexing needed


class GroupFilters:
    """Per group, the filter slices of its producing layers (build again after physical pruning)."""

    def __init__(self, graph: PruningGraph):
        self.graph = graph
        self.slots: list[list[_FilterSlot]] = []
        for g in graph.groups:
            normed = _layers_followed_by_norm(graph, g)
            slots = []
            for s in g.outputs:
                m = graph.modules[s.module]
                if isinstance(m, NORMS) or not isinstance(m, nn.Conv2d | nn.Conv1d | nn.Linear):
                    continue
                eps = _next_norm_eps(graph, m) if s.module in normed else None
                n = m.weight.shape[0]
                identity = (
                    len(s.module_idx) == n == g.size
                    and torch.equal(s.module_idx, torch.arange(n))
                    and torch.equal(s.root_idx, torch.arange(n))
                )
                slots.append(_FilterSlot(s.module, m, s.module_idx, s.root_idx, eps, identity))
            self.slots.append(slots)
        self._std: dict[str, torch.Tensor] = {}  # layer -> per-row std of its output, last forward
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._indices: dict[tuple[str, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    # --- reading ---
    @torch.no_grad()
    def norms(self) -> list[torch.Tensor]:
        """Per group, (size,): the L2 norm of each channel's filter slices (weights and biases), CPU."""
        out = []
        for g, slots in zip(self.graph.groups, self.slots, strict=True):
            sq = torch.zeros(g.size)
            for s in slots:
                sq.index_add_(0, s.roots, _rows_sq(s).cpu())
            out.append(sq.sqrt())
        return out

    @torch.no_grad()
    def sparsity(self, eps: float) -> list[float]:
        """Per group: the fraction of its filter weights with ``|w| < eps * mean|w|`` (zeroed filters
        count whole). A group without filters gets 0."""
        out = []
        for slots in self.slots:
            w = [s.module.weight.detach()[s.rows].abs().flatten().float() for s in slots]
            if not w:
                out.append(0.0)
                continue
            flat = torch.cat(w)
            out.append(float((flat < eps * flat.mean()).float().mean()))
        return out

    # --- editing ---
    def has_filters(self, group: int) -> bool:
        return bool(self.slots[group])

    @torch.no_grad()
    def zero_(self, masks: Sequence[torch.Tensor], only: Sequence[int] | None = None) -> None:
        """Zero the filter weights and biases of the channels where ``masks[g]`` (bool, (size,), on any
        device) is true; ``only``: just these groups (the others have nothing masked). Multiplies
        rather than indexes by the mask: no host sync on a GPU."""
        self._scale(masks, False, only)

    @torch.no_grad()
    def mask_grads_(self, masks: Sequence[torch.Tensor], only: Sequence[int] | None = None) -> None:
        """Zero the gradients of the masked channels' filters (so momentum does not build up there)."""
        self._scale(masks, True, only)

    def _scale(self, masks: Sequence[torch.Tensor], grads: bool, only: Sequence[int] | None) -> None:
        for g in range(len(self.slots)) if only is None else only:
            mask = masks[g]
            for s in self.slots[g]:
                for p in (s.module.weight, s.module.bias):
                    t = None if p is None else (p.grad if grads else p.data)
                    if t is not None:
                        self._mul_rows(s, t, (~mask.to(t.device)).to(t.dtype))

    def _mul_rows(self, s: _FilterSlot, t: torch.Tensor, per_root: torch.Tensor) -> None:
        """``t``'s rows (dim 0) of slot ``s`` times ``per_root`` (one factor per group channel), in place."""
        shape = (-1, *([1] * (t.dim() - 1)))
        if s.identity:
            t.mul_(per_root.view(shape))
            return
        rows, roots = self._on(s, t.device)
        t[rows] = t[rows] * per_root[roots].view(shape)

    @torch.no_grad()
    def temper_grads_(
        self, masks: Sequence[torch.Tensor], live: Sequence[torch.Tensor], only: Sequence[int] | None = None
    ) -> None:
        """Scale the gradients of the masked channels' filters by ``min(1, std / median std of the live
        channels)`` of their layer's output (the std their BatchNorm divides by). A zeroed filter that
        starts to regrow has a gradient hundreds of times a live one's (its std is sqrt(eps));
        tempered, its first steps are the size of a live filter's and it comes back gradually. Layers
        without a BatchNorm after them are left alone (their gradients have no such factor)."""
        for g in range(len(self.slots)) if only is None else only:
            mask, alive = masks[g], live[g]
            for s in self.slots[g]:
                std, grad = self._std.get(s.name), s.module.weight.grad
                if std is None or not std.numel() or grad is None:
                    continue
                rows, roots = self._on(s, grad.device)
                row_std = std[rows]
                on = alive.to(grad.device)[roots]
                # the median of the live rows' std, without a host sync: the dead rows sort last
                ref = torch.where(on, row_std, torch.full_like(row_std, float("inf"))).sort().values
                median = ref[(on.sum() - 1).clamp(min=0) // 2]
                factor = (row_std / median).clamp(max=1.0)
                factor = torch.where(mask.to(grad.device)[roots], factor, torch.ones_like(factor))
                grad[rows] = grad[rows] * factor.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))

    def _on(self, s: _FilterSlot, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's (rows, roots) index tensors on ``device``, moved once."""
        key = (s.name, id(s), device)
        if key not in self._indices:
            self._indices[key] = (s.rows.to(device), s.roots.to(device))
        return self._indices[key]

    # --- the gradient signal ---
    def attach(self) -> None:
        """Record, at every training forward, the batch std of each layer's output that a BatchNorm
        normalises (what ``grad_signal`` scales by)."""
        for slots in self.slots:
            for s in slots:
                if s.norm_eps is not None and s.name not in self._std:
                    self._std[s.name] = torch.ones(0)
                    self._handles.append(s.module.register_forward_hook(self._record(s.name, s.norm_eps)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._std.clear()

    def _record(self, name: str, eps: float):
        def hook(module: nn.Module, _inp, out: torch.Tensor) -> None:
            if module.training:
                dims = [0, *range(2, out.dim())]
                self._std[name] = (out.detach().var(dim=dims, unbiased=False).float() + eps).sqrt()

        return hook

    @torch.no_grad()
    def grad_signal(self) -> list[torch.Tensor]:
        """Per group, (size,) on the model's device: each channel's filter-gradient norm, scale-free.

        A BatchNorm in train mode divides its input channel by the batch std, so the gradient reaching
        a filter is the gradient at the normalised output times gamma/std. For a zeroed filter the
        channel is constant, std is sqrt(eps) and its raw gradient is hundreds of times that of a live
        filter (measured here: ~150x) though nothing about it is more important. Multiplying by the std
        recorded in the forward cancels that factor: what remains is the gradient the filter would get
        with its output normalised, comparable between zeroed and live filters. Layers without a
        BatchNorm after them are read raw (no such division). Channels of a gradient-less layer get 0.
        """
        out = []
        device = next(iter(self.graph.model.parameters())).device
        for g, slots in zip(self.graph.groups, self.slots, strict=True):
            sq = torch.zeros(g.size, device=device)
            for s in slots:
                grad = s.module.weight.grad
                if grad is None:
                    continue
                per_row = grad.flatten(1).float().pow(2).sum(1)  # (out,) every row of the layer
                if s.module.bias is not None and s.module.bias.grad is not None:
                    per_row = per_row + s.module.bias.grad.float().pow(2)
                std = self._std.get(s.name)
                if std is not None and std.numel():
                    per_row = per_row * std.pow(2)
                if s.identity:
                    sq += per_row.to(device)
                else:
                    rows, roots = self._on(s, grad.device)
                    sq.index_add_(0, roots.to(device), per_row[rows].to(device))
            out.append(sq.sqrt())
        return out


def _rows_sq(s: _FilterSlot) -> torch.Tensor:
    w = s.module.weight.detach()[s.rows].float().flatten(1).pow(2).sum(1)
    if s.module.bias is not None:
        w = w + s.module.bias.detach()[s.rows].float().pow(2)
    return w


def _next_norm_eps(graph: PruningGraph, module: nn.Module) -> float | None:
    node = graph.dg.module2node.get(module)
    if node is None or not node.outputs:
        return None
    norm = node.outputs[0].module
    return float(norm.eps) if isinstance(norm, NORMS) else None
