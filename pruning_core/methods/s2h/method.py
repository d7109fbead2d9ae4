"""S2H (S2HPruner, NeurIPS 2024): soft-to-hard distillation, one stage, no fine-tuning.

Every step forwards the same batch through two networks that share the weights: the *soft* network
(channels scaled by a relaxed keep-probability) and the *hard* network it stands for (binary masks on
the expected width's most important channels). Losses, in the official code's order:

- performance loss on the soft output (cross-entropy, or KD from the dense teacher when the job's
  ``kd.enabled``: the dense weights given or trained first), into the weights and the mask logits;
- gap loss, decoupled: ``KL(sg(s) || h)`` through the hard branch, which keeps the chosen channels and
  applies no mask (the official demo's hard forward), so into the weights only (``hard_grad: ste``
  multiplies by a straight-through mask instead, which also reaches the logits); ``KL(s || sg(h))``
  into the mask logits only, so the gap never pulls the weights toward the soft network;
- resource loss ``c * (M / M_dense - target)^2`` on the hard network's MACs (straight-through ceil, so
  the loss sees the integer widths and its gradient the expected ones), into the mask logits only.

The logits train with SGD at the weights' current LR (``mask_lr_scale`` times it); per group, the task
gradient is scaled to the gap gradient's norm and the resource gradient balanced against their sum, and
it fades out once the hard network is within ``flops_relax`` of the target (the official "default"
fusion). The result is the hard network with the jointly trained weights, physically pruned, BatchNorm
statistics re-estimated by the runner. Its widths are stepped into ``[target - TARGET_BAND, target]``
where the search's expected widths missed (a short run, a large model): ``budget.fit_widths``, giving up
first the channels of least soft keep-probability x L1 importance per MAC; then fixed there for the last
``fit_epochs``, which train the hard network at those widths with the mask logits frozen (the official
code freezes its masks for its last hard epochs).

Per coupled group (``groups.ChannelGroup``) of C channels in ``ch_groups`` blocks of P positions (P = C
unless a grouped convolution ties blocks together), widths are counted in positions: candidates
``d, 2d, ..., P`` (K of them, one logit each), ``p = softmax(u / T)``; the position of importance rank
r is kept with probability ``sum of p_j over candidates wider than r`` (a reverse cumulative sum:
non-increasing, the first block always 1); the expected width ``E = p . widths`` is rounded up to a
multiple of d (``N``). Importance is the L1 norm of the group's filters, recomputed every step, or
ranked once when the search starts (``rank_order: fixed``, the official code's ``fix_l1_order``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...graph.budget import fit_widths, group_step
from ...graph.groups import NORMS, ChannelGroup, PruningGraph
from ...graph.masks import ChannelMasks
from ...graph.surgery import remove_channels
from ...training.batches import Batch
from ...training.engine import EpochEnd, StepContext, StepOutput
from ...training.evaluation import View
from ...training.losses import kl_divergence
from ...training.optim import OptimizerConfig, ParamSet
from ..base import METHODS, Method, Phase
from .options import S2HOptions

MIN_CANDIDATES, MAX_CANDIDATES = 8, 16


def width_step(positions: int, divisor: int | None = None) -> int:
    """d for a group of ``positions``: a divisor of it. ``divisor`` given: the largest divisor of
    ``positions`` not above it. Otherwise the one giving the most candidates in [8, 16], else the fewest
    above 16, else (narrow groups) 1."""
    divisors = [d for d in range(1, positions + 1) if positions % d == 0]
    if divisor is not None:
        return max(d for d in divisors if d <= divisor)
    counts = {positions // d: d for d in divisors}
    inside = [k for k in counts if MIN_CANDIDATES <= k <= MAX_CANDIDATES]
    if inside:
        return counts[max(inside)]
    above = [k for k in counts if k > MAX_CANDIDATES]
    return counts[min(above)] if above else 1


@dataclass
class _Space:
    """One group's width search: candidate widths (positions) and which positions each keeps."""

    group: ChannelGroup
    step: int  # d, positions
    widths: torch.Tensor  # (K,) float, positions, increasing; the last is P
    cover: torch.Tensor  # (K, P) float: candidate j keeps importance rank r < widths[j]
    filters: list[tuple[str, torch.Tensor, torch.Tensor]]  # (module, module_idx, root_idx) with weights

    @property
    def positions(self) -> int:
        return self.group.block


def _filters(graph: PruningGraph, g: ChannelGroup) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The group's output slots whose module has filters (conv/linear): what its L1 importance reads."""
    return [
        (s.module, s.module_idx, s.root_idx)
        for s in g.outputs
        if not isinstance(graph.modules[s.module], NORMS)
        and getattr(graph.modules[s.module], "weight", None) is not None
    ]


def space_step(positions: int, divisor: int | None = None, unit: int = 1) -> int:
    """d (positions) for a group of ``positions``: ``width_step`` counted in units of ``unit`` channels
    (the job's channel step), so every candidate but the full width is a multiple of ``unit``."""
    if unit <= 1 or positions < unit:
        return width_step(positions, divisor)
    return unit * width_step(positions // unit, None if divisor is None else max(1, divisor // unit))


def build_spaces(
    graph: PruningGraph, divisor: int | None, min_channels: int, round_to: int = 1, min_share: float = 0.0
) -> list[_Space]:
    """One width search per group: candidates d, 2d, ... and the full width (positions), none below the
    width floor (``min_channels``, ``min_share`` of the group)."""
    spaces = []
    for g in graph.groups:
        p = g.block
        d = space_step(p, divisor, group_step(p, 1, round_to) if g.ch_groups == 1 else 1)  # grouped: exact
        least = max(-(-max(1, min_channels) // g.ch_groups), math.ceil(min_share * p - 1e-9))  # kept by all
        widths = [w for w in range(d, p + 1, d) if w >= least]
        widths = [*widths, p] if not widths or widths[-1] != p else widths  # p need not be a multiple
        w = torch.tensor(widths, dtype=torch.float32)
        cover = (w.unsqueeze(1) > torch.arange(p).unsqueeze(0)).float()
        spaces.append(_Space(g, d, w, cover, _filters(graph, g)))
    return spaces


def max_init_logits(space: _Space, temperature: float) -> torch.Tensor:
    """Logits whose full-width candidate has probability (P - d) / P, the others equal (``max_init``)."""
    k = len(space.widths)
    u = torch.zeros(k)
    if k > 1:
        keep = (space.positions - space.step) / space.positions
        u[-1] = temperature * math.log((k - 1) * keep / (1.0 - keep))
    return u


class _CeilTo(torch.autograd.Function):
    """Forward: round up to a multiple of ``step`` within [low, high]; backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: float, low: float, high: float) -> torch.Tensor:
        return (torch.ceil(x / step - 1e-6) * step).clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


@dataclass
class StepMasks:
    """The masks of one step, per group: soft ``(C,)``, hard as used ``(C,)`` (binary; a constant, or
    with ``hard_grad: ste`` a straight-through mask whose gradient reaches the soft one), expected and
    hard widths (positions; hard is differentiable straight-through), and the importance rank of each
    position."""

    soft: list[torch.Tensor]
    hard: list[torch.Tensor]
    expected: torch.Tensor  # (G,)
    hard_widths: torch.Tensor  # (G,)
    ranks: list[torch.Tensor]


class WidthSearch:
    """The learnable widths of every group, and the masks they give; applied to the model with hooks."""

    def __init__(
        self,
        graph: PruningGraph,
        options: S2HOptions,
        min_channels: int,
        device: torch.device,
        round_to: int = 1,
        min_share: float = 0.0,
    ):
        self.graph, self.options = graph, options
        self.spaces = build_spaces(graph, options.width_divisor, min_channels, round_to, min_share)
        init = max_init_logits if options.max_init else (lambda s, t: torch.zeros(len(s.widths)))
        self.logits = [init(s, options.temperature).to(device).requires_grad_() for s in self.spaces]
        # on the device once, not every step
        self._dev = {id(s): (s.widths.to(device), s.cover.to(device)) for s in self.spaces}
        self._filters_dev = [
            [(name, mi.to(device), ri.to(device)) for name, mi, ri in s.filters] for s in self.spaces
        ]
        self.masks = ChannelMasks(graph)
        self.masks.attach()
        # Hard widths (positions) fixed once the search is over and they were stepped into the band.
        self.fitted: torch.Tensor | None = None
        # ``rank_order: fixed``: each group's ranks, taken at the first step and kept (saved for resume).
        self.fixed_ranks: list[torch.Tensor] | None = None

    def probs(self) -> list[torch.Tensor]:
        return [F.softmax(u / self.options.temperature, dim=0) for u in self.logits]

    @torch.no_grad()
    def l1(self) -> list[torch.Tensor]:
        """Per group, the L1 norm of each channel's filters (C,): the importance the hard mask ranks by."""
        out = []
        for s, u, filters in zip(self.spaces, self.logits, self._filters_dev, strict=True):
            l1 = torch.zeros(s.group.size, device=u.device)
            for name, module_idx, root_idx in filters:
                w = self.graph.modules[name].weight
                per = w.detach().abs().flatten(1).sum(1).float() if w.dim() > 1 else w.detach().abs().float()
                l1.index_add_(0, root_idx, per[module_idx])
            out.append(l1)
        return out

    @torch.no_grad()
    def ranks(self) -> list[torch.Tensor]:
        """Per group, the importance rank of each position (0 = largest L1 of the group's filters): now,
        or with ``rank_order: fixed`` as the first call found them."""
        if self.options.rank_order == "step":
            return self.l1_ranks()
        if self.fixed_ranks is None:
            self.fixed_ranks = self.l1_ranks()
        return self.fixed_ranks

    @torch.no_grad()
    def l1_ranks(self) -> list[torch.Tensor]:
        """Per group, the rank of each position by the current L1 norms of the group's filters."""
        out = []
        for s, l1 in zip(self.spaces, self.l1(), strict=True):
            order = l1.reshape(s.group.ch_groups, s.positions).sum(0).argsort(descending=True, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order), device=order.device)
            out.append(rank)
        return out

    def step_masks(self) -> StepMasks:
        """This step's soft and hard masks and widths, differentiable in the logits."""
        ranks = self.ranks()
        soft, hard, expected, hard_w = [], [], [], []
        ste = self.options.hard_grad == "ste"
        for i, (s, p, rank) in enumerate(zip(self.spaces, self.probs(), ranks, strict=True)):
            widths, cover = self._dev[id(s)]
            e = p @ widths
            n = _CeilTo.apply(e, float(s.step), float(s.widths[0]), float(s.positions))  # CPU: no sync
            if self.fitted is not None:
                n = self.fitted[i]
            w = (p @ cover)[rank]  # soft keep-probability per position, (P,)
            m = (rank < n.detach()).to(w.dtype)
            # The official hard forward computes the kept channels only: a 0/1 constant, no gradient to u.
            soft.append(w.repeat(s.group.ch_groups))
            hard.append(((m - w).detach() + w if ste else m).repeat(s.group.ch_groups))
            expected.append(e)
            hard_w.append(n)
        return StepMasks(soft, hard, torch.stack(expected), torch.stack(hard_w), ranks)

    def channels(self, widths: torch.Tensor) -> torch.Tensor:
        """Positions per group -> channels per group (x ch_groups), for the cost model."""
        blocks = torch.tensor([s.group.ch_groups for s in self.spaces], device=widths.device)
        return widths * blocks.to(widths.dtype)

    def macs(self, widths: torch.Tensor) -> torch.Tensor:
        """MACs per sample at these widths (positions), differentiable."""
        return self.graph.cost.macs(self.channels(widths).double())

    @torch.no_grad()
    def hard_keep(self) -> list[torch.Tensor]:
        """Root channel indices the hard network keeps, per group (sorted)."""
        st = self.step_masks()
        keep = []
        for s, rank, n in zip(self.spaces, st.ranks, st.hard_widths, strict=True):
            pos = torch.nonzero(rank < n).flatten().cpu()
            blocks = torch.arange(s.group.ch_groups).unsqueeze(1) * s.positions
            keep.append((blocks + pos.unsqueeze(0)).flatten().sort().values)
        return keep

    def detach(self) -> None:
        self.masks.detach()


class _Branch(nn.Module):
    """The soft or the hard network as a module of its own (for evaluation): the shared model with
    that branch's masks set, computed without gradients."""

    def __init__(self, model: nn.Module, search: WidthSearch, hard: bool):
        super().__init__()
        self.model, self.search, self.hard = model, search, hard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            st = self.search.step_masks()
        self.search.masks.values = st.hard if self.hard else st.soft
        return self.model(x)


@METHODS.register("s2h")
class S2H(Method):
    options: S2HOptions

    def __init__(self, options: S2HOptions, ctx) -> None:
        super().__init__(options, ctx)
        self.search: WidthSearch | None = None
        self._parts: tuple[list, list, torch.Tensor] | None = None  # task, gap grads; resource loss
        self._init_norm: float | None = None  # the first step's logit gradient norm

    # --- phases ---
    def phases(self) -> list[Phase]:
        phases = [Phase("s2h", self.ctx.spec.schedule.epochs)]
        if self.options.finetune_epochs:
            phases.append(Phase("finetune", self.options.finetune_epochs))
        return phases

    def start_phase(self, phase: Phase, model: nn.Module) -> nn.Module:
        if phase.name == "s2h":
            self._attach(model, None)
            return model
        return self._prune(model)  # the optional fine-tuning trains the pruned hard network

    def finalize(self, model: nn.Module) -> nn.Module:
        return self._prune(model) if self.search is not None else model

    def _attach(self, model: nn.Module, logits: list[torch.Tensor] | None) -> None:
        graph = self.ctx.graph(model)
        spec = self.ctx.spec
        t = spec.target
        self.search = WidthSearch(
            graph, self.options, t.min_channels, self.ctx.device, self.ctx.round_to, t.min_width
        )
        if logits is not None:
            for u, saved in zip(self.search.logits, logits, strict=True):
                u.data.copy_(saved)
        self.ctx.details.setdefault("groups", len(graph.groups))
        self.ctx.details.setdefault("candidates", [len(s.widths) for s in self.search.spaces])
        self.ctx.details.setdefault("width_step", [s.step for s in self.search.spaces])

    @torch.no_grad()
    def fit_to_target(self) -> None:
        """Fix the hard widths, stepped into ``[target - TARGET_BAND, target]`` where the search's missed
        (``budget.fit_widths``: channels of least worth per MAC go first, or come back first); the hard
        network the job returns must meet its target whatever the run's length.

        A channel's worth is its soft keep-probability times its L1 importance (the hard mask's ranking),
        so that early in a search, when the keep-probabilities are about equal within a group, the
        weaker channels still go first; ``fit_widths`` compares each group's shares of it."""
        search = self.search
        assert search is not None
        st = search.step_masks()
        blocks = [s.group.ch_groups for s in search.spaces]
        counts = [int(n) * b for n, b in zip(st.hard_widths.tolist(), blocks, strict=True)]
        fitted = fit_widths(
            search.graph,
            counts,
            [w.cpu() * i.cpu() for w, i in zip(st.soft, search.l1(), strict=True)],
            self.ctx.target_macs,
            min_channels=self.ctx.spec.target.min_channels,
            round_to=self.ctx.round_to,
            min_share=self.ctx.spec.target.min_width,
        )
        if search.fitted is None:  # what the search itself ended at, and how many widths the fit moved
            self.ctx.details["search_macs_ratio"] = float(search.macs(st.hard_widths)) / self.ctx.dense_macs
            self.ctx.details["fitted_groups"] = sum(a != b for a, b in zip(fitted, counts, strict=True))
        positions = [k // b for k, b in zip(fitted, blocks, strict=True)]
        search.fitted = torch.tensor(positions, dtype=torch.float32, device=search.logits[0].device)

    def _fit_after(self) -> int:
        """The epochs of the search before the hard widths are fixed in the band: all but the last
        ``fit_epochs``, at least one."""
        epochs = self.ctx.spec.schedule.epochs
        return max(1, epochs - self.options.fit_epochs)

    def _prune(self, model: nn.Module) -> nn.Module:
        search = self.search
        assert search is not None
        self.fit_to_target()
        keep = search.hard_keep()
        with torch.no_grad():
            st = search.step_masks()
            ratio = float(search.macs(st.hard_widths)) / self.ctx.dense_macs
        search.detach()
        self.search = None
        self.ctx.details["hard_macs_ratio"] = ratio
        self.ctx.details["widths"] = [int(k.numel()) for k in keep]
        return remove_channels(search.graph, keep)

    # --- training ---
    def param_sets(self, model: nn.Module) -> list[ParamSet]:
        sets = super().param_sets(model)
        if self.search is None:
            return sets
        s = self.ctx.spec.schedule
        masks = OptimizerConfig(
            "sgd",
            lr=s.lr * self.options.mask_lr_scale,
            momentum=s.momentum,
            nesterov=s.nesterov and s.momentum > 0,
            weight_decay=0.0,  # [ours] no decay of the logits toward the uniform distribution
        )
        return [*sets, ParamSet("masks", self.search.logits, masks)]

    def training_step(
        self, model: nn.Module, batch: Batch | tuple[Batch, ...], ctx: StepContext
    ) -> StepOutput:
        if self.search is None:  # the optional fine-tuning phase
            return super().training_step(model, batch, ctx)
        x, y = batch
        o, search = self.options, self.search
        st = search.step_masks()
        with ctx.autocast():
            search.masks.values = st.soft
            soft = model(x)
            search.masks.values = st.hard
            hard = model(x)
            task = self.supervised_loss(soft, x, y)
        soft, hard = soft.float(), hard.float()
        ratio = search.macs(st.hard_widths) / self.ctx.dense_macs
        resource = o.resource_weight * (ratio - self.ctx.spec.target.macs_ratio) ** 2
        to_hard, to_soft = (o.gap_weight * g for g in gap_losses(soft, hard))
        gap_on = o.gap_weight > 0
        if search.fitted is not None:
            # Widths fixed in the band (``fit_epochs``): the hard network trains, the mask logits get no
            # gradient, so their set does not step (the official code freezes its masks here).
            ctx.backward(task + to_hard, "weights")
        elif o.balance == "norms":
            ctx.backward(task, retain_graph=True)
            task_g = ctx.take_grads("masks")
            gap_g: list = []
            if gap_on:
                ctx.backward(to_hard, retain_graph=True)
                ctx.backward(to_soft, "masks", retain_graph=True)
                gap_g = ctx.take_grads("masks")
            ctx.backward(resource.float(), "masks")
            self._parts = (task_g, gap_g, resource.detach())
        else:
            ctx.backward(task + to_hard, retain_graph=True)
            if gap_on:
                ctx.backward(to_soft, "masks", retain_graph=True)
            ctx.backward(resource.float(), "masks")
        with torch.no_grad():
            agree = (soft.argmax(1) == hard.argmax(1)).float().mean()
        loss = task.detach() + to_hard.detach() + to_soft.detach() + resource.detach().float()
        return StepOutput(
            loss,
            {
                "kl_soft_hard": kl_divergence(soft, hard).detach(),
                "resource_loss": resource.detach(),
                "agreement": agree,
            },
        )

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        if self._parts is None or "masks" not in ctx.stepping:
            return
        task_g, gap_g, resource = self._parts
        self._parts = None
        o = self.options
        parts = [g for g in (*task_g, *gap_g) if g is not None]
        if parts and not bool(torch.isfinite(torch.cat([g.flatten() for g in parts])).all()):
            for u in self.search.logits:  # an overflowed AMP step: the logits sit this one out
                u.grad = None
            return
        threshold = o.resource_weight * o.flops_relax**2
        fade = (resource / threshold).clamp(max=1.0) if threshold > 0 else torch.ones_like(resource)
        logits = self.search.logits
        grads = []
        for i, u in enumerate(logits):
            zero = torch.zeros_like(u)
            t = task_g[i] if task_g[i] is not None else zero
            k = gap_g[i] if gap_g and gap_g[i] is not None else zero
            r = u.grad if u.grad is not None else zero
            grads.append(balance(t, k, r, fade))
        self._normalise(grads)
        for u, g in zip(logits, grads, strict=True):
            u.grad = g

    def _normalise(self, grads: list[torch.Tensor]) -> None:
        """Divide the logits' gradients by the global norm of the first step's (in place), as the
        official code divides its mask LR by the initial gradient norm: the mask LR then means the
        first step's length, whatever the scale of the losses' gradients (which is tiny at a
        saturated ``max_init`` softmax)."""
        if self._init_norm is None:
            norm = float(torch.cat([g.flatten() for g in grads]).norm())
            if norm == 0.0:
                return
            self._init_norm = norm
        for g in grads:
            g.div_(self._init_norm)

    # --- per epoch ---
    def eval_views(self, model: nn.Module) -> dict[str, View]:
        if self.search is None:
            return super().eval_views(model)
        return {
            "hard": View(_Branch(model, self.search, hard=True), recalibrate_bn=True),
            "soft": View(_Branch(model, self.search, hard=False), recalibrate_bn=True),
        }

    def current_macs(self, model: nn.Module) -> int:
        if self.search is None:
            return super().current_macs(model)
        with torch.no_grad():
            return round(float(self.search.macs(self.search.step_masks().hard_widths)))

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> EpochEnd:
        if self.search is None:
            return EpochEnd()
        search = self.search
        with torch.no_grad():
            st = search.step_masks()
            dense = self.ctx.dense_macs
            numbers: dict[str, Any] = {
                "hard_macs_ratio": float(search.macs(st.hard_widths)) / dense,
                "expected_macs_ratio": float(search.macs(st.expected)) / dense,
                "top1_gap": metrics["top1_soft"] - metrics["top1_hard"],
                "expected_widths": search.channels(st.expected).tolist(),
            }
        if search.fitted is None and epoch + 1 >= self._fit_after():
            # The widths the job returns, fixed in the band now: the last ``fit_epochs`` train the hard
            # network at them (a fit far from the search's widths costs accuracy that training recovers),
            # and the hard network checked against the pruned one is the one in the band.
            self.fit_to_target()
        return EpochEnd(metrics=numbers)

    # --- resume ---
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.search is not None:
            state["logits"] = [u.detach().cpu().clone() for u in self.search.logits]
            if self.search.fitted is not None:
                state["fitted"] = self.search.fitted.cpu().clone()
            if self.search.fixed_ranks is not None:
                state["fixed_ranks"] = [r.cpu().clone() for r in self.search.fixed_ranks]
        state["init_norm"] = self._init_norm
        return state

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        self._init_norm = state.get("init_norm")
        if self.search is not None:
            self.search.detach()
            self.search = None
        if "logits" in state:
            self._attach(model, state["logits"])
            fitted = state.get("fitted")
            self.search.fitted = None if fitted is None else fitted.to(self.ctx.device)
            ranks = state.get("fixed_ranks")
            if ranks is not None:
                self.search.fixed_ranks = [r.to(self.ctx.device) for r in ranks]


def balance(
    task: torch.Tensor, gap: torch.Tensor, resource: torch.Tensor, fade: torch.Tensor
) -> torch.Tensor:
    """One group's logit gradient from its task, gap and resource gradients.

    The official "default" fusion: the task gradient is scaled to the gap gradient's norm and added to
    it (``d``); far from the target (``fade`` = 1) the smaller of ``d`` and the resource gradient ``r``
    is scaled up to the larger one's norm ``M``, so the MAC constraint weighs as much as the data; within
    ``flops_relax`` of it ``r`` fades to ``M * fade`` (``fade`` = resource loss / its value at
    ``flops_relax``). [ours] Where the official code would then scale ``d`` up to ``|r| / fade``, which
    grows without bound as the MACs approach the target, ``d`` stays at ``M``. Tensor operations only:
    no host synchronisation per group.
    """
    one = torch.ones_like(task.norm())
    tn, kn = task.norm(), gap.norm()
    d = gap + task * torch.where((tn > 0) & (kn > 0), kn / tn.clamp_min(1e-30), one)
    dn, rn = d.norm(), resource.norm()
    m = torch.maximum(dn, rn)
    d = d * torch.where(dn > 0, m / dn.clamp_min(1e-30), one)
    return d + resource * torch.where(rn > 0, m * fade.to(m.dtype) / rn.clamp_min(1e-30), one)


def gap_losses(soft: torch.Tensor, hard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S2H's decoupled gap loss on logits (N, K): ``KL(sg(s) || h)``, whose gradient reaches the hard
    output only (the hard network learns toward the soft one), and ``KL(s || sg(h))``, whose gradient
    reaches the soft output only (the caller sends it to the mask logits alone)."""
    return kl_divergence(soft.detach(), hard), kl_divergence(soft, hard.detach())
