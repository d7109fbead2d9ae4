"""The filters of every coupled group, for methods that prune softly by zeroing them (PSAP).

A group's *filters* are the output-channel slices of the conv and linear layers whose outputs carry the
group's channels (weight rows and bias entries; several layers per channel where a residual sum couples
them). Zeroing a channel also zeroes its BatchNorms' weight and bias: a zeroed filter in front of a live
BatchNorm still emits the constant ReLU(beta), which the physically pruned network does not have, so the
network that trained would not be the network that is cut. The consumers' input slices are left alone.

``GroupFilters`` reads and edits them per group, in root-channel order:

- ``norms()``: L2 norm per channel over all its filter slices;
- ``sparsity(norms, live, eps)``: the share of a group's filters whose norm is below ``eps`` times the
  median norm of its live filters, read from the weights;
- ``zero_(masks)`` / ``mask_grads_(masks)``: zero the filters and BatchNorm affine entries (or their
  gradients) of the masked channels;
- ``save_(masks)`` / ``restore_(masks)``: keep the masked channels' values before a zeroing, and put
  them back (PSAP's reconstruction of a pruned filter that proved useful);
- ``attach()`` / ``signal()``: the gradient of the loss at each channel's output activation, read where
  the consumers take it in (see ``signal``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .groups import NORMS, PruningGraph

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class _RowSlot:
    """One layer's slices that carry a group's channels: ``rows[i]`` (of dim 0 for producers and
    BatchNorms, dim 1 for consumers) is root channel ``roots[i]``."""

    name: str
    module: nn.Module
    rows: torch.Tensor  # LongTensor (n,), channel indices in the module
    roots: torch.Tensor  # LongTensor (n,), the group's channel of each row


class GroupFilters:
    """Per group, the filter slices of its producing layers, its BatchNorms and its consumers (build
    again after physical pruning)."""

    def __init__(self, graph: PruningGraph):
        self.graph = graph
        self.slots: list[list[_RowSlot]] = []  # producing conv/linear layers: the filters
        self.norm_slots: list[list[_RowSlot]] = []  # the group's BatchNorms
        self.input_slots: list[list[_RowSlot]] = []  # conv/linear layers that take the channels in
        for g in graph.groups:
            filters, norms = [], []
            for s in g.outputs:
                m = graph.modules[s.module]
                slot = _RowSlot(s.module, m, s.module_idx, s.root_idx)
                if isinstance(m, NORMS) and m.affine:
                    norms.append(slot)
                elif isinstance(m, LAYERS):
                    filters.append(slot)
            self.slots.append(filters)
            self.norm_slots.append(norms)
            self.input_slots.append(
                [
                    _RowSlot(s.module, graph.modules[s.module], s.module_idx, s.root_idx)
                    for s in g.inputs
                    if isinstance(graph.modules[s.module], LAYERS)
                ]
            )
        self._grad_sq: dict[str, torch.Tensor] = {}  # consumer -> per input channel sum of grad^2
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._masks: dict[tuple[str, int, torch.device], torch.Tensor] = {}

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

    def has_filters(self, group: int) -> bool:
        return bool(self.slots[group])

    # --- editing (every per-channel parameter of the group: filters, biases, BatchNorm affine) ---
    def _params(self, group: int) -> list[tuple[_RowSlot, str, nn.Parameter]]:
        out = []
        for s in [*self.slots[group], *self.norm_slots[group]]:
            for name in ("weight", "bias"):
                p = getattr(s.module, name, None)
                if isinstance(p, torch.Tensor):
                    out.append((s, name, p))
        return out

    def _row_mask(self, s: _RowSlot, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bool, broadcastable to ``t``: the rows (dim 0) of ``t`` that carry a masked channel of ``s``."""
        per_row = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
        per_row[s.rows.to(t.device)] = mask.to(t.device)[s.roots.to(t.device)]
        return per_row.view(-1, *([1] * (t.dim() - 1)))

    @torch.no_grad()
    def zero_(self, masks: Sequence[torch.Tensor], only: Sequence[int] | None = None) -> None:
        """Zero the filters and BatchNorm weight and bias of the channels where ``masks[g]`` (bool,
        (size,), any device) is true; ``only``: just these groups (the others have nothing masked)."""
        for g in range(len(self.slots)) if only is None else only:
            for s, _, p in self._params(g):
                p.data.masked_fill_(self._row_mask(s, p.data, masks[g]), 0.0)

    @torch.no_grad()
    def mask_grads_(self, masks: Sequence[torch.Tensor], only: Sequence[int] | None = None) -> None:
        """Zero the gradients of the masked channels' parameters (frozen pruning: nothing regrows)."""
        for g in range(len(self.slots)) if only is None else only:
            for s, _, p in self._params(g):
                if p.grad is not None:
                    p.grad.masked_fill_(self._row_mask(s, p.grad, masks[g]), 0.0)

    @torch.no_grad()
    def save_(self, bank: dict[str, torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        """Copy the masked channels' current parameter values into ``bank`` (``module.param`` -> a tensor
        of the parameter's shape; entries are made on first use)."""
        for g in range(len(self.slots)):
            if not bool(masks[g].any()):
                continue
            for s, name, p in self._params(g):
                key = f"{s.name}.{name}"
                kept = bank.setdefault(key, torch.zeros_like(p.data))
                kept.copy_(torch.where(self._row_mask(s, p.data, masks[g]), p.data, kept))

    @torch.no_grad()
    def restore_(self, bank: dict[str, torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        """Put the masked channels' values saved in ``bank`` back into the parameters."""
        for g in range(len(self.slots)):
            if not bool(masks[g].any()):
                continue
            for s, name, p in self._params(g):
                kept = bank.get(f"{s.name}.{name}")
                if kept is not None:
                    p.data.copy_(torch.where(self._row_mask(s, p.data, masks[g]), kept.to(p.device), p.data))

    # --- the gradient signal ---
    def attach(self) -> None:
        """Record, at every training backward, the gradient of the loss at each consumer's input (the
        group's output activations, what ``signal`` reads)."""
        seen = set()
        for slots in self.input_slots:
            for s in slots:
                if s.name not in seen:
                    seen.add(s.name)
                    self._handles.append(s.module.register_forward_pre_hook(self._record(s.name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._grad_sq.clear()

    def _record(self, name: str):
        def keep(grad: torch.Tensor) -> None:
            dims = [0, *range(2, grad.dim())]
            sq = grad.detach().float().pow(2).sum(dims)
            self._grad_sq[name] = self._grad_sq[name] + sq if name in self._grad_sq else sq

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if module.training and isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(keep)

        return hook

    @torch.no_grad()
    def signal(self) -> list[torch.Tensor]:
        """Per group, (size,) on the model's device: the norm of the loss's gradient at each channel's
        output activation over the last backward(s), summed over its consumers, then cleared.

        Read at the consumers' input rather than at the filter: a zeroed channel (filter and BatchNorm
        affine at zero) emits zeros, its ReLU passes no gradient and its filter gets none, yet the
        gradient at its activation says how much the loss would move if it came back. It does not
        depend on the channel's own weights (scale-free: a small live filter and a zeroed one compare
        with the group's others). Channels without a consumer that saw a gradient get 0."""
        device = next(iter(self.graph.model.parameters())).device
        out = []
        for g, slots in zip(self.graph.groups, self.input_slots, strict=True):
            sq = torch.zeros(g.size, device=device)
            for s in slots:
                per_in = self._grad_sq.get(s.name)
                if per_in is not None:
                    rows, roots = s.rows.to(per_in.device), s.roots.to(per_in.device)
                    sq.index_add_(0, roots.to(device), per_in[rows].to(device))
            out.append(sq.sqrt())
        self._grad_sq.clear()
        return out


def sparsity(norms: Sequence[torch.Tensor], live: Sequence[torch.Tensor], eps: float) -> list[float]:
    """Per group: the share of its filters whose norm is below ``eps`` times the median norm of its
    ``live`` ones (bool (size,); all of them where none is live), read from the weights as trained:
    a zeroed filter that regrew past that is not sparse, a live one that shrank by itself is."""
    out = []
    for n, alive in zip(norms, live, strict=True):
        alive = alive.cpu()
        ref = n[alive] if bool(alive.any()) else n
        median = float(ref.median()) if ref.numel() else 0.0
        out.append(float((n < eps * median).float().mean()) if median > 0 else 0.0)
    return out


def _rows_sq(s: _RowSlot) -> torch.Tensor:
    w = s.module.weight.detach()[s.rows].float().flatten(1).pow(2).sum(1)
    if s.module.bias is not None:
        w = w + s.module.bias.detach()[s.rows].float().pow(2)
    return w
