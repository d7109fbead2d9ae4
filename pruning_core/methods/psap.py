"""PSAP (arXiv 2303.11881): protective self-adaptive pruning, an iterative soft prune-train loop.

The paper's full text and code are not public; its abstract states the mechanism **[paper]**: filters
are pruned iteratively during training, each layer's pruning ratio is adapted before every prune step
from the layer's own weight sparsity ratio, and a protective reconstruction driven by gradients keeps
important filters from being pruned and lets pruned-but-useful filters recover. The rules that make it
run are **[ours]**, each an option of ``PSAPOptions`` (see ``../shared/docs/METHODS.md`` section 3):

1. Soft filter pruning per coupled group (``filters.GroupFilters``): a prune step zeroes the
   lowest-norm filters (the producing layers' output slices); BatchNorm and the consumers stay, so a
   zeroed filter still receives gradients. Unprotected zeroed filters have their gradients masked and
   are zeroed again after every optimizer step: they stay exactly zero through momentum and weight decay.
2. Sparsity ratio of a group: the fraction of its filter weights below ``sparsity_eps`` times their
   mean magnitude (zeroed filters count whole).
3. Adaptive ratios: ``p_g = clip(s * max(S_g, 0.001), 0, max_ratio)`` with the one scale ``s``
   bisected so that the step's MAC target is met (``budget.counts_for_ratios``); ``adaptive: false`` gives every group the
   same ratio (uniform soft filter pruning, the ablation). Step targets tighten from the dense MACs to
   the job's target over the first ``ramp`` of the steps (geometric or linear), then hold.
4. Protection: per channel an EMA of a scale-free gradient signal (``GroupFilters.grad_signal``: the
   filter's gradient norm times the batch std its BatchNorm divides by; the raw norm of a zeroed filter
   in front of a BatchNorm is ~150x a live one's and would protect them all). A zeroed filter whose EMA
   exceeds ``pulse_factor`` times the mean EMA of its group's kept filters is protected: its gradient
   is no longer masked but tempered (``GroupFilters.temper_grads_``: times its std over the median std
   of the layer's live channels, at most 1, so its first steps are a live filter's size; untempered, the
   regrowing channels jumped back at full strength and the trained network lost 5-10 points), it
   regrows, and the next prune step spares it (unless the target cannot be met otherwise). A step
   clears the protections. ``pulse_factor`` 2: on digits ResNet-20 the signal of zeroed filters stays
   below about twice the kept mean (99th percentile 1.7-1.9), so 2 marks outliers (~0.5% of zeroed
   filters per step); at 1.5, 5-7% were protected per step and the final top-1 fell from 97.1 to 92.8
   (three seeds, target 0.3), as the last step then cuts live filters instead. A zeroed filter whose
   BatchNorm shift keeps the following ReLU at zero gets no gradient at all and cannot pulse.
   Ties among zeroed filters (all at norm 0) go by the signal's EMA; a zeroed filter that a later
   step keeps (its group's ratio fell) restarts from zero with its gradient tempered the same way.
   A group with no conv/linear filter to zero (say a transposed conv's) keeps all its channels.
5. The last prune step is the final cut: the zeroed filters are removed physically (the masked network,
   zeroed channels cut after their BatchNorm, equals the pruned one), BatchNorm statistics are
   re-estimated, and the pruned network trains on for the last ``settle`` of the epochs (at least
   one) [ours: a step at the very end (``settle: 0``) re-selects filters that no epoch then trains,
   and the zeroed channels' constant BatchNorm shift, which the soft network used, is cut with them:
   on digits at target 0.25 the masked network scored 98.1% before that last step and 88.3% after].
   ``finetune_epochs`` of fine-tuning may follow as a phase of their own (none by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..budget import counts_for_ratios
from ..engine import EpochAction, EpochEnd, StepContext
from ..evaluation import View
from ..filters import GroupFilters
from ..groups import ChannelGroup, PruningGraph, top_channels
from ..masks import ChannelMasks
from ..spec import PSAPOptions
from ..surgery import remove_channels
from .base import METHODS, Method, Phase

SPARSITY_FLOOR = 1e-3  # a group with no sparse weight still gets a (small) share of every step


def settle_epochs(epochs: int, settle: float) -> int:
    """Epochs the physically pruned network trains after the final cut: ``settle`` of them, at least
    one (and at least one epoch before the cut)."""
    return min(max(1, math.ceil(settle * epochs)), max(1, epochs - 1))


def step_epochs(epochs: int, interval: int, settle: float = 0.0) -> list[int]:
    """The epochs (0-based) at whose end a prune step runs: every ``interval``-th before the settling
    epochs, and the last of those (the final cut)."""
    cut = epochs - 1 - (settle_epochs(epochs, settle) if settle else 0)
    marks = [e for e in range(cut + 1) if (e + 1) % interval == 0]
    return marks if marks and marks[-1] == cut else [*marks, cut]


def step_target(k: int, steps: int, target: float, options: PSAPOptions) -> float:
    """Remaining MAC ratio after prune step ``k`` (1-based) of ``steps``: tightening over the first
    ``ramp`` of the steps, then the target."""
    ramp = max(1, math.ceil(options.ramp * steps))
    x = min(k, ramp) / ramp
    if options.schedule == "linear":
        return 1.0 - (1.0 - target) * x
    return target**x


def allocate(
    graph: PruningGraph,
    sparsity: list[float],
    target_macs: int,
    options: PSAPOptions,
    min_channels: int = 1,
    fixed: Sequence[bool] = (),
    round_to: int = 1,
    latency_rates: Sequence[float] | None = None,
) -> list[int]:
    """Keep counts per group for one prune step: pruning ratios proportional to the groups' sparsity
    ratios (at least ``SPARSITY_FLOOR``; equal ones if not ``adaptive``), clipped to ``max_ratio``,
    scaled to fit ``target_macs``, counts multiples of ``round_to`` (channels) in groups that wide.
    ``fixed`` groups (no filters to zero) keep every channel. ``latency_rates`` (``target.allocation:
    latency``) divide each group's ratio: a group whose channels cost more time than their MACs suggest
    is pruned more."""
    weights = [max(s, SPARSITY_FLOOR) for s in sparsity] if options.adaptive else [1.0] * len(sparsity)
    if latency_rates is not None:
        weights = [w / r for w, r in zip(weights, latency_rates, strict=True)]
    weights = [0.0 if fixed and fixed[g] else w for g, w in enumerate(weights)]
    return counts_for_ratios(
        graph,
        weights,
        target_macs,
        max_ratio=options.max_ratio,
        min_channels=min_channels,
        round_to=round_to,
    )


def _rank(norm: torch.Tensor, pulse: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """A keep score per channel (higher is kept first): protected channels above all, then by filter
    norm, ties (zeroed filters, all at norm 0) by the gradient signal's EMA."""
    order = torch.argsort(pulse, stable=True)
    order = order[torch.argsort(norm[order], stable=True)]  # by norm, then by signal
    score = torch.empty(len(norm))
    score[order] = torch.arange(len(norm), dtype=torch.float)
    return score + protected.float() * len(norm)


def _zeroed(g: ChannelGroup, score: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool (size,): the channels a step zeroes, all but the ``keep`` best-scored (the same positions
    in every block of a grouped conv)."""
    z = torch.ones(g.size, dtype=torch.bool)
    z[top_channels(g, score, keep)] = False
    return z


class _Masked(nn.Module):
    """The network as it would be pruned now: the model with its zeroed channels cut after their
    BatchNorm (the masks applied for the forward only)."""

    def __init__(self, model: nn.Module, masks: ChannelMasks):
        super().__init__()
        self.model, self.masks = model, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.masks.applied():
            return self.model(x)


@METHODS.register("psap")
class PSAP(Method):
    options: PSAPOptions

    def __init__(self, options: PSAPOptions, ctx) -> None:
        super().__init__(options, ctx)
        self.graph: PruningGraph | None = None
        self.filters: GroupFilters | None = None
        self.zeroed: list[torch.Tensor] = []  # per group, bool (size,): zeroed at the last step
        self.protected: list[torch.Tensor] = []  # per group, bool (size,): pulsed since the last step
        self.ema: list[torch.Tensor] = []  # per group, (size,): EMA of the gradient signal
        self.returning: list[torch.Tensor] = []  # per group, bool: zeroed before the last step, kept by it
        self.steps_done = 0
        self._active: list[int] = []  # groups with zeroed channels
        self._returning_groups: list[int] = []  # groups with channels a step brought back
        self._marks = step_epochs(ctx.spec.schedule.epochs, options.interval, options.settle)

    # --- phases ---
    def phases(self) -> list[Phase]:
        out = [Phase("psap", self.ctx.spec.schedule.epochs)]
        if self.options.finetune_epochs:
            out.append(Phase("finetune", self.options.finetune_epochs))
        return out

    def start_phase(self, phase: Phase, model: nn.Module) -> nn.Module:
        if phase.name == "psap":
            self._attach(model, None)
            self._check_reachable()
            return model
        return self._remove(model) if self.filters is not None else model

    def _check_reachable(self) -> None:
        """Fail before training, not at the end of the ramp, if every group at ``max_ratio`` cannot
        reach the target (raises ``TargetError``)."""
        assert self.graph is not None
        n = len(self.graph.groups)
        o, target = self.options, self.ctx.spec.target
        allocate(
            self.graph,
            [1.0] * n,
            self.ctx.target_macs,
            o,
            target.min_channels,
            self._fixed(),
            self.ctx.round_to,
        )

    def _fixed(self) -> list[bool]:
        assert self.filters is not None
        return [not self.filters.has_filters(g) for g in range(len(self.filters.slots))]

    def finalize(self, model: nn.Module) -> nn.Module:
        return self._remove(model) if self.filters is not None else model

    def _attach(self, model: nn.Module, state: dict[str, Any] | None) -> None:
        self.graph = self.ctx.graph(model)
        self.filters = GroupFilters(self.graph)
        self.filters.attach()
        device = self.ctx.device
        sizes = [g.size for g in self.graph.groups]
        if state is None:
            self.zeroed = [torch.zeros(n, dtype=torch.bool, device=device) for n in sizes]
            self.protected = [torch.zeros(n, dtype=torch.bool, device=device) for n in sizes]
            self.returning = [torch.zeros(n, dtype=torch.bool, device=device) for n in sizes]
            self.ema = [torch.zeros(n, device=device) for n in sizes]
            self.steps_done = 0
        else:
            self.zeroed = [t.to(device) for t in state["zeroed"]]
            self.protected = [t.to(device) for t in state["protected"]]
            self.returning = [t.to(device) for t in state["returning"]]
            self.ema = [t.to(device) for t in state["ema"]]
            self.steps_done = int(state["steps_done"])
        self._index_groups()
        self.ctx.details.setdefault("prune_epochs", [e + 1 for e in self._marks])
        self.ctx.details.setdefault("groups", [g.root for g in self.graph.groups])

    def _pruned(self) -> list[torch.Tensor]:
        """Per group, bool: the channels pruned now (zeroed and not protected)."""
        return [z & ~p for z, p in zip(self.zeroed, self.protected, strict=True)]

    def _remove(self, model: nn.Module) -> nn.Module:
        assert self.graph is not None and self.filters is not None
        keep = [torch.nonzero(~m.cpu()).flatten() for m in self._pruned()]
        self.filters.detach()
        graph, self.graph, self.filters = self.graph, None, None
        self.ctx.details["kept_channels"] = {g.root: len(k) for g, k in zip(graph.groups, keep, strict=True)}
        return remove_channels(graph, keep)

    # --- every step ---
    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        if self.filters is None:
            return
        o = self.options
        signal = self.filters.grad_signal()
        torch._foreach_mul_(self.ema, o.grad_ema)
        torch._foreach_add_(self.ema, signal, alpha=1.0 - o.grad_ema)
        if not self.steps_done:  # nothing zeroed yet: only the signal's EMA runs
            return
        active = self._active
        if o.protect:
            for g in active:
                ema, zeroed = self.ema[g], self.zeroed[g]
                kept = ~zeroed
                ref = (ema * kept).sum() / kept.sum().clamp(min=1)
                self.protected[g] |= zeroed & (ema > o.pulse_factor * ref)
        pruned = self._pruned()
        self.filters.mask_grads_(pruned, active)
        # groups with regrowing filters: a step's returning ones, and any protected since (one sync)
        pulsed = (
            torch.stack([self.protected[g].any() for g in active]).tolist() if o.protect and active else []
        )
        regrowing = [g for g, p in zip(active, pulsed, strict=True) if p] if pulsed else []
        regrowing = sorted(set(regrowing) | set(self._returning_groups))
        if regrowing:
            masks = [(z & p) | r for z, p, r in zip(self.zeroed, self.protected, self.returning, strict=True)]
            self.filters.temper_grads_(masks, [~m for m in pruned], regrowing)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        if self.filters is not None and self.steps_done:
            self.filters.zero_(self._pruned(), self._active)

    def _index_groups(self) -> None:
        """The groups with zeroed and with returning channels, on the host: set when the masks change
        (a prune step, a resume), so a training step needs no sync to skip the others."""
        self._active = [g for g, m in enumerate(self.zeroed) if bool(m.any())]
        self._returning_groups = [g for g, m in enumerate(self.returning) if bool(m.any())]

    # --- per epoch ---
    def eval_views(self, model: nn.Module) -> dict[str, View]:
        if self.graph is None:
            return super().eval_views(model)
        masks = ChannelMasks(self.graph, [(~m).float() for m in self._pruned()])
        return {"pruned": View(_Masked(model, masks), recalibrate_bn=True), "soft": View(model)}

    def current_macs(self, model: nn.Module) -> int:
        if self.graph is None:
            return super().current_macs(model)
        return int(self.graph.cost.macs([int((~m).sum()) for m in self._pruned()]))

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> EpochEnd:
        if self.filters is None or epoch not in self._marks:
            return EpochEnd()
        metrics = self._prune_step()
        if epoch == self._marks[-1] and self.options.settle > 0:  # the final cut: remove, train on
            return EpochEnd(EpochAction.PRUNE, metrics)
        return EpochEnd(metrics=metrics)

    def prune_now(self, model: nn.Module) -> nn.Module:
        return self._remove(model)

    @torch.no_grad()
    def _prune_step(self) -> dict[str, Any]:
        """Zero the lowest-norm unprotected filters of every group to this step's MAC target."""
        assert self.graph is not None and self.filters is not None
        o, graph = self.options, self.graph
        self.steps_done += 1
        ratio = step_target(self.steps_done, len(self._marks), self.ctx.spec.target.macs_ratio, o)
        sparsity = self.filters.sparsity(o.sparsity_eps)
        target = int(ratio * self.ctx.dense_macs)
        min_channels, step = self.ctx.spec.target.min_channels, self.ctx.round_to
        counts = allocate(
            graph, sparsity, target, o, min_channels, self._fixed(), step, self.ctx.latency_rates
        )
        norms = self.filters.norms()
        was = [z.cpu() for z in self.zeroed]
        protected = [p.cpu() for p in self.protected]
        ema = [e.cpu() for e in self.ema]
        zeroed = [
            _zeroed(g, _rank(norm, pulse, spared), keep)
            for g, norm, spared, pulse, keep in zip(graph.groups, norms, protected, ema, counts, strict=True)
        ]
        back = [w & ~z for w, z in zip(was, zeroed, strict=True)]
        self.zeroed = [z.to(self.ctx.device) for z in zeroed]
        self.returning = [b.to(self.ctx.device) for b in back]
        self.protected = [torch.zeros_like(z) for z in self.zeroed]
        self.filters.zero_(self.zeroed)
        self._index_groups()
        return {
            "step_target": ratio,
            "step_macs_ratio": float(graph.cost.macs([int((~z).sum()) for z in zeroed]))
            / self.ctx.dense_macs,
            "layer_ratios": [float(z.float().mean()) for z in zeroed],
            "sparsity_ratios": sparsity,
            "protected": float(sum(int(p.sum()) for p in protected)),
            # kept again after being zeroed: regrown (a protected filter that grew) or restored (zero,
            # kept because the group's ratio fell; it restarts from zero, its gradient tempered)
            "regrown": float(sum(int((b & (n > 0)).sum()) for b, n in zip(back, norms, strict=True))),
            "restored": float(sum(int((b & (n == 0)).sum()) for b, n in zip(back, norms, strict=True))),
            "zeroed": float(sum(int(z.sum()) for z in zeroed)),
        }

    # --- resume ---
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.filters is not None:
            state["psap"] = {
                "zeroed": [t.cpu().clone() for t in self.zeroed],
                "protected": [t.cpu().clone() for t in self.protected],
                "returning": [t.cpu().clone() for t in self.returning],
                "ema": [t.cpu().clone() for t in self.ema],
                "steps_done": self.steps_done,
            }
        return state

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        if self.filters is not None:
            self.filters.detach()
            self.graph, self.filters = None, None
        if "psap" in state:
            self._attach(model, state["psap"])
