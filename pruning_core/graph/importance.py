"""Channel importance per coupled group, in one place: every method scores channels through here.

Each scorer returns one ``(group.size,)`` tensor per group, comparable across groups in one global
ranking (``budget.select_to_budget``) without the widest or deepest layers dominating: most are
**mean-normalised within the group** (a score of 1 is the group's average channel); ``neuron_l2``
divides by the square root of the parameters per neuron instead.

- ``magnitude``: group L1/L2 norm: every coupled tensor slice of a channel (its filter, its BatchNorm
  scale, the consumers' input slices), Torch-Pruning's ``GroupMagnitudeImportance``.
- ``neuron_l2``: ``||W_n||_2 / sqrt(parameters per neuron)`` of each channel's producing filters, not
  normalised per group (EPI's magnitude criterion: the parameter count makes layers comparable).
- ``bn_scale``: |gamma| of the group's BatchNorms (network slimming), Torch-Pruning's
  ``BNScaleImportance``; a group with no BatchNorm falls back to its L1 magnitude.
- ``TaylorAccumulator``: first-order Taylor, ``(sum over the channel's coupled parameters of g * w)^2``
  per step (Molchanov et al. 2019, the criterion EPI uses), summed over the steps it is fed. Our own
  code rather than Torch-Pruning's ``GroupTaylorImportance``: that one scores a single step's
  ``|g * w|`` and looks the group up in the graph on every call, too slow to run after every backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..registry import Registry
from .filters import GroupFilters  # the one definition of a group's filters
from .groups import PruningGraph, Slot

Scores = list[torch.Tensor]  # one (group.size,) float tensor per group, on the CPU


def normalise(scores: Scores) -> Scores:
    """Each group's scores divided by their mean (all-zero groups stay zero)."""
    return [s / s.mean() if s.mean() > 0 else s for s in scores]


def _tp_scores(graph: PruningGraph, importance: Any) -> list[torch.Tensor | None]:
    with torch.no_grad():
        out = []
        for g in graph.groups:
            s = importance(graph.tp_group(g, list(range(g.size))))
            out.append(None if s is None else s.detach().cpu().float())
        return out


def magnitude(graph: PruningGraph, p: int = 2) -> Scores:
    """Group L_p magnitude of every channel (p = 1 or 2), mean-normalised per group."""
    imp = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer="mean")
    return [
        s if s is not None else torch.ones(g.size)
        for s, g in zip(_tp_scores(graph, imp), graph.groups, strict=True)
    ]


def bn_scale(graph: PruningGraph) -> Scores:
    """|gamma| of the group's BatchNorms, mean-normalised; L1 magnitude where a group has none."""
    scores = _tp_scores(graph, tp.importance.BNScaleImportance(group_reduction="mean", normalizer="mean"))
    if any(s is None for s in scores):
        fallback = magnitude(graph, p=1)
        scores = [s if s is not None else f for s, f in zip(scores, fallback, strict=True)]
    return scores  # type: ignore[return-value]


def neuron_l2(graph: PruningGraph) -> Scores:
    """Per channel ``||W_n||_2 / sqrt(P)``: the L2 norm of the neuron's filter (its rows in the conv and
    linear layers that produce the group, averaged over them) over the square root of the parameters
    per neuron of that layer, so that layers compare globally without per-group normalisation (EPI's
    magnitude criterion). Channels of a group without such a layer score 1."""
    out = []
    with torch.no_grad():
        for g, slots in zip(graph.groups, GroupFilters(graph).slots, strict=True):
            total = torch.zeros(g.size)
            for slot in slots:
                w = slot.module.weight.detach()[slot.rows].float().flatten(1).cpu()
                total.index_add_(0, slot.roots, w.norm(dim=1) / w.shape[1] ** 0.5)
            out.append(total / len(slots) if slots else torch.ones(g.size))
    return out


STATIC: Registry[Callable[[PruningGraph], Scores]] = Registry("importance")
STATIC.add("l1", lambda graph: magnitude(graph, p=1))
STATIC.add("l2", lambda graph: magnitude(graph, p=2))
STATIC.add("bn_scale", bn_scale)
STATIC.add("neuron_l2", neuron_l2)


# --- first-order Taylor, accumulated over steps ---


def _per_channel(module: nn.Module, name: str, out_dim: bool) -> torch.Tensor | None:
    """sum(g * w) of parameter ``name`` of ``module`` per output (or input) channel; None if no grad."""
    w = getattr(module, name, None)
    if w is None or w.grad is None:
        return None
    gw = (w.detach() * w.grad.detach()).float()
    if gw.dim() == 1:  # BatchNorm scale/shift, biases
        return gw if out_dim else None
    if out_dim:
        return gw.flatten(1).sum(1)
    if isinstance(module, nn.Linear):
        return gw.sum(0)
    # conv weight (out, in/groups, *k): the input channel j*(in/groups)+c of group j
    groups = getattr(module, "groups", 1)
    per = gw.reshape(groups, gw.shape[0] // groups, gw.shape[1], -1).sum((1, 3))
    return per.flatten()


class TaylorAccumulator:
    """Accumulates ``(sum of g * w over a channel's coupled parameters)^2`` per channel and step.

    Call ``accumulate()`` after a backward, on unscaled gradients (a method's ``after_backward``);
    ``scores()`` gives the normalised sums. Build a new one after any physical pruning.
    """

    def __init__(self, graph: PruningGraph):
        self.graph = graph
        device = next(graph.model.parameters()).device  # sums stay beside the gradients: no sync per step
        self.sums = [torch.zeros(g.size, device=device) for g in graph.groups]
        self.steps = 0
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _slot_terms(self, slot: Slot, out_dim: bool) -> torch.Tensor | None:
        module = self.graph.modules[slot.module]
        names = ("weight", "bias") if out_dim else ("weight",)
        total = None
        for name in names:
            v = _per_channel(module, name, out_dim)
            if v is not None:
                total = v if total is None else total + v
        return total

    def _indices(self, slot: Slot, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's (module, root) index tensors on ``device``, moved once, not every step."""
        key = (id(slot), device)
        if key not in self._on_device:
            self._on_device[key] = (slot.module_idx.to(device), slot.root_idx.to(device))
        return self._on_device[key]

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add this step's squared per-channel sums; a group whose sum is not finite is skipped."""
        for g, acc in zip(self.graph.groups, self.sums, strict=True):
            contrib = torch.zeros_like(acc)
            for slots, out_dim in ((g.outputs, True), (g.inputs, False)):
                for slot in slots:
                    v = self._slot_terms(slot, out_dim)
                    if v is not None:
                        module_idx, root_idx = self._indices(slot, v.device)
                        contrib.index_add_(0, root_idx, v[module_idx].to(acc.dtype))
            contrib = contrib.pow(2)
            acc += torch.where(contrib.isfinite().all(), contrib, torch.zeros_like(contrib))
        self.steps += 1

    def scores(self) -> Scores:
        return normalise([s.detach().cpu() for s in self.sums])

    def reset(self) -> None:
        for s in self.sums:
            s.zero_()
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [s.detach().cpu().clone() for s in self.sums], "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = [s.to(a.device) for s, a in zip(state["sums"], self.sums, strict=True)]
        self.steps = state["steps"]
