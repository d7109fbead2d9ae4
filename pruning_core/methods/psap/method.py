"""PSAP (arXiv 2303.11881): protective self-adaptive pruning, an iterative soft prune-train loop.

The paper's full text and code are not public; its abstract states the mechanism **[paper]**: filters
are pruned iteratively during training, each layer's pruning ratio is adapted before every prune step
from the layer's own weight sparsity ratio, and a protective reconstruction driven by gradients keeps
important filters from being pruned and lets pruned-but-useful filters recover ("avoid unrecoverable
information loss"). The rules that make it run are **[ours]**, each an option of ``PSAPOptions`` (see
``../shared/docs/METHODS.md`` section 3):

1. Soft filter pruning per coupled group (``filters.GroupFilters``): a prune step zeroes the chosen
   filters, the conv/linear rows **and** their BatchNorm weight and bias, so the network that trains
   is the network that would be cut (a zeroed filter before a live BatchNorm still emits ReLU(beta);
   a random-init ResNet-20 with half its filters zeroed that way gave logits 72 % apart from the cut
   one). Zeroed filters stay trainable (``reconstruct``): nothing masks their gradients. Where a
   gradient reaches them they regrow (the optimizer's momentum moves them off zero, a channel summed
   into a residual stream passes gradient to its BatchNorm shift); a channel whose ReLU sees exactly
   zero gets none, so its filter stays at zero until a step keeps it again, and that step puts back the
   values the filter had when it was zeroed (``GroupFilters.save_``/``restore_``): nothing a step
   removed is lost before the final cut. ``reconstruct: false`` freezes zeroed filters (gradients
   masked, re-zeroed after every optimizer step), the ablation.
2. Sparsity ratio of a group, read from the weights before each step (``filters.sparsity``): the share
   of its filters whose norm is below ``sparsity_eps`` times the median norm of its live filters (those
   the last step did not zero), so zeroed filters that regrew do not count and live ones that shrank by
   themselves do; never from a mask.
3. Adaptive ratios: ``p_g = clip(s * max(S_g, 0.001), 0, max_ratio)`` with the one scale ``s``
   bisected so that the step's MAC target is met (``budget.counts_for_ratios``, with the job's width
   floor); ``adaptive: false`` gives every group the same ratio (uniform soft filter pruning, the
   ablation). Step targets tighten from the dense MACs to the job's target over the first ``ramp`` of
   the steps (geometric or linear), then hold.
4. Protection, before the cut: per channel an EMA of a scale-free gradient signal
   (``GroupFilters.signal``: the gradient of the loss at the channel's output activation, where its
   consumers read it, over the group's mean at that step). It is defined for zeroed channels too (a
   zeroed filter's own gradient is zero, and the raw gradient of a filter zeroed in front of a
   BatchNorm in train mode is ~150x a live one's, since BN divides a constant channel by sqrt(eps)).
   A channel whose EMA stands above ``pulse_factor`` is exempt from the step's cut, a small-norm live
   filter and a zeroed one alike (the zeroed one comes back). Then channels rank by filter norm, ties
   (zeroed filters) by the signal.
5. The last prune step is the final cut: the zeroed filters are removed physically (the network as
   trained, zeroed channels included, equals the pruned one), BatchNorm statistics are re-estimated,
   and the pruned network trains on for the last ``settle`` of the epochs (at least one)
   [ours: a step at the very end (``settle: 0``) re-selects filters that no epoch then trains].
   ``finetune_epochs`` of fine-tuning may follow as a phase of their own (none by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...graph.budget import counts_for_ratios, top_up
from ...graph.filters import GroupFilters, sparsity
from ...graph.groups import ChannelGroup, PruningGraph, top_channels
from ...graph.masks import ChannelMasks
from ...graph.surgery import remove_channels
from ...training.engine import EpochAction, EpochEnd, StepContext
from ...training.evaluation import View
from ..base import METHODS, Method, Phase
from .options import PSAPOptions

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
    *,
    min_share: float = 0.0,
) -> list[int]:
    """Keep counts per group for one prune step: pruning ratios proportional to the groups' sparsity
    ratios (at least ``SPARSITY_FLOOR``; equal ones if not ``adaptive``), clipped to ``max_ratio``,
    scaled to fit ``target_macs``, counts multiples of ``round_to`` (channels) in groups that wide, then
    widened by a channel step where the budget still allows (``budget.top_up``).
    ``fixed`` groups (no filters to zero) keep every channel. ``latency_rates`` (``target.allocation:
    latency``) divide each group's ratio: a group whose channels cost more time than their MACs suggest
    is pruned more."""
    weights = [max(s, SPARSITY_FLOOR) for s in sparsity] if options.adaptive else [1.0] * len(sparsity)
    if latency_rates is not None:
        weights = [w / r for w, r in zip(weights, latency_rates, strict=True)]
    weights = [0.0 if fixed and fixed[g] else w for g, w in enumerate(weights)]
    counts = counts_for_ratios(
        graph,
        weights,
        target_macs,
        max_ratio=options.max_ratio,
        min_channels=min_channels,
        round_to=round_to,
        min_share=min_share,
    )
    return top_up(
        graph, counts, target_macs, round_to=round_to, min_channels=min_channels, min_share=min_share
    )


def _rank(norm: torch.Tensor, signal: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """A keep score per channel (higher is kept first): protected channels above all, then by filter
    norm, ties (zeroed filters, all at norm 0) by the gradient signal's EMA."""
    order = torch.argsort(signal, stable=True)
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
    BatchNorm (the masks applied for the forward only; a zeroed channel that regrew since the last step
    counts as cut until a step keeps it)."""

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
        self.zeroed: list[torch.Tensor] = []  # per group, bool (size,): zeroed by the last step
        self.ema: list[torch.Tensor] = []  # per group, (size,): EMA of the signal over its group mean
        self.bank: dict[str, torch.Tensor] = {}  # zeroed channels' values before the step that zeroed them
        self.steps_done = 0
        self._active: list[int] = []  # groups with zeroed channels
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
        self._allocate([1.0] * len(self.graph.groups), self.ctx.target_macs)

    def _allocate(self, sparsity: list[float], target_macs: int) -> list[int]:
        assert self.graph is not None and self.filters is not None
        fixed = [not self.filters.has_filters(g) for g in range(len(self.filters.slots))]
        t = self.ctx.spec.target
        return allocate(
            self.graph,
            sparsity,
            target_macs,
            self.options,
            t.min_channels,
            fixed,
            self.ctx.round_to,
            self.ctx.latency_rates,
            min_share=t.min_width,
        )

    def finalize(self, model: nn.Module) -> nn.Module:
        return self._remove(model) if self.filters is not None else model

    def _attach(self, model: nn.Module, state: dict[str, Any] | None) -> None:
        self.graph = self.ctx.graph(model)
        self.filters = GroupFilters(self.graph)
        if self.options.protect:
            self.filters.attach()
        device = self.ctx.device
        sizes = [g.size for g in self.graph.groups]
        if state is None:
            self.zeroed = [torch.zeros(n, dtype=torch.bool, device=device) for n in sizes]
            self.ema = [torch.ones(n, device=device) for n in sizes]
            self.bank, self.steps_done = {}, 0
        else:
            self.zeroed = [t.to(device) for t in state["zeroed"]]
            self.ema = [t.to(device) for t in state["ema"]]
            # a checkpoint from before reconstruction has no bank: its zeroed filters come back at zero
            self.bank = {k: t.to(device) for k, t in state.get("bank", {}).items()}
            self.steps_done = int(state["steps_done"])
        self._active = [g for g, m in enumerate(self.zeroed) if bool(m.any())]
        self.ctx.details.setdefault("prune_epochs", [e + 1 for e in self._marks])
        self.ctx.details.setdefault("groups", [g.root for g in self.graph.groups])
        self.ctx.details.setdefault("reconstruct", self.options.reconstruct)

    def _remove(self, model: nn.Module) -> nn.Module:
        assert self.graph is not None and self.filters is not None
        keep = [torch.nonzero(~m.cpu()).flatten() for m in self.zeroed]
        self.filters.detach()
        graph, self.graph, self.filters, self.bank = self.graph, None, None, {}
        self.ctx.details["kept_channels"] = {g.root: len(k) for g, k in zip(graph.groups, keep, strict=True)}
        return remove_channels(graph, keep)

    # --- every step ---
    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        if self.filters is None:
            return
        o = self.options
        if o.protect:
            # relative to the group's mean at this step: free of the loss scale and the LR's drift
            signal = [s / s.mean().clamp_min(1e-30) for s in self.filters.signal()]
            torch._foreach_mul_(self.ema, o.grad_ema)
            torch._foreach_add_(self.ema, signal, alpha=1.0 - o.grad_ema)
        if self._active and not o.reconstruct:  # the ablation: zeroed filters are frozen
            self.filters.mask_grads_(self.zeroed, self._active)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        if self.filters is not None and self._active and not self.options.reconstruct:
            self.filters.zero_(self.zeroed, self._active)  # through momentum and weight decay

    # --- per epoch ---
    def eval_views(self, model: nn.Module) -> dict[str, View]:
        if self.graph is None:
            return super().eval_views(model)
        masks = ChannelMasks(self.graph, [(~m).float() for m in self.zeroed])
        return {"pruned": View(_Masked(model, masks), recalibrate_bn=True), "soft": View(model)}

    def current_macs(self, model: nn.Module) -> int:
        if self.graph is None:
            return super().current_macs(model)
        return int(self.graph.cost.macs([int((~m).sum()) for m in self.zeroed]))

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
        """Zero the lowest-norm unprotected filters of every group to this step's MAC target; bring back
        the ones it keeps that were zeroed before."""
        assert self.graph is not None and self.filters is not None
        o, graph = self.options, self.graph
        self.steps_done += 1
        ratio = step_target(self.steps_done, len(self._marks), self.ctx.spec.target.macs_ratio, o)
        was = [z.cpu() for z in self.zeroed]
        norms = self.filters.norms()
        sparse = sparsity(norms, [~w for w in was], o.sparsity_eps)
        counts = self._allocate(sparse, int(ratio * self.ctx.dense_macs))
        ema = [e.cpu() for e in self.ema]
        protected = [
            e > o.pulse_factor if o.protect else torch.zeros_like(w) for e, w in zip(ema, was, strict=True)
        ]
        zeroed = [
            _zeroed(g, _rank(norm, signal, spared), keep)
            for g, norm, signal, spared, keep in zip(graph.groups, norms, ema, protected, counts, strict=True)
        ]
        back = [w & ~z for w, z in zip(was, zeroed, strict=True)]
        # kept again: a filter that regrew trains on from where it is; one still at zero gets back the
        # values it had when it was zeroed (nothing a step removed is lost before the final cut)
        self.filters.restore_(self.bank, [b & (n == 0) for b, n in zip(back, norms, strict=True)])
        self.filters.save_(self.bank, [z & ~w for z, w in zip(zeroed, was, strict=True)])
        self.filters.zero_(zeroed)
        self.zeroed = [z.to(self.ctx.device) for z in zeroed]
        self._active = [g for g, z in enumerate(zeroed) if bool(z.any())]
        return {
            "step_target": ratio,
            "step_macs_ratio": float(graph.cost.macs([int((~z).sum()) for z in zeroed]))
            / self.ctx.dense_macs,
            "layer_ratios": [float(z.float().mean()) for z in zeroed],
            "sparsity_ratios": sparse,
            # exempt from the cut by their gradient signal: among the live filters, and among the
            # zeroed ones (these come back)
            "protected": float(sum(int((p & ~z).sum()) for p, z in zip(protected, zeroed, strict=True))),
            # kept again after being zeroed: regrown (trained back from zero since the last step) or
            # restored (still at zero: its saved values put back)
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
                "ema": [t.cpu().clone() for t in self.ema],
                "bank": {k: t.cpu().clone() for k, t in self.bank.items()},
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
