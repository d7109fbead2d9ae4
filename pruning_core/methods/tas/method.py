"""TAS (Dong & Yang, NeurIPS 2019): transformable architecture search of width and depth, then KD.

Phase ``search`` turns the full-width model into TAS's search network with hooks (the model's code is not
edited). Per searchable coupled group: width candidates (the group's first k channels, one logit each in
``alpha``) and one BatchNorm per candidate. Every forward samples two candidates per group from the
Gumbel-softmax at temperature tau, normalises the group's pre-BatchNorm features with each candidate's
BatchNorm on its first k channels, brings both to the wider one (``align``: the paper's channel-wise
interpolation from scratch; from trained weights zero-padding, so that channel j stays channel j for the
next layer) and sums them weighted by their renormalised probabilities (zeros beyond). Per stage of residual blocks: depth
candidates (logits ``beta``); the stage's output is the Gumbel-softmax-weighted sum of the outputs after
each candidate depth. Weights (SGD, the schedule) learn from the cross-entropy on one half of the
training data; then the architecture (Adam, constant LR) learns from the other half, from the
cross-entropy plus ``cost_weight`` times the piecewise log expected-MAC loss, whose sign the argmax
architecture's MACs choose. Tau decays by a cosine each epoch.

Before the search, each reorderable group's channels are sorted by importance (``sort_channels``; the
group magnitude ``magnitude`` ranks by, one permutation for the group's layers and consumers, the
function unchanged): from trained weights a candidate's first k channels are then the k most important.

Phase ``kd`` builds the architecture for real: the last argmax (or the best in-band epoch's), stepped
into ``[target - TARGET_BAND, target]`` where it lies outside (``Supernet.fit``), i.e. the dense model
with the stages cut to their depths and every group cut to its first k channels, initialised at random,
from the teacher (its channels sorted likewise) or from the searched supernet (``init``), trained with
KD from the dense teacher (or cross-entropy alone with ``kd: false``). Groups whose channels are not
the whole output of plain layers (a slice of a concatenation) keep their width; models without stages
of residual blocks are searched in width only; the report says which.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...graph.blocks import find_stages, keep_blocks
from ...graph.budget import TARGET_BAND, fit_levels, group_step
from ...graph.groups import NORMS, ChannelGroup, PruningGraph
from ...graph.importance import magnitude
from ...graph.masks import mask_points
from ...graph.surgery import permutable, permute_channels, remove_channels
from ...models.zoo import build_model
from ...training.batches import Batch, Streams
from ...training.engine import EpochEnd, StepContext, StepOutput
from ...training.evaluation import View
from ...training.optim import OptimizerConfig, ParamSet
from ..base import METHODS, Method, Phase
from .options import TASOptions
from .space import (
    StageLayers,
    align_channels,
    cost_loss,
    gumbel_probs,
    layer_weights,
    sample_pairs,
    stage_layers,
    tau_at,
    width_candidates,
)

SPEND = 0.01  # [ours] the found network's MACs: within this share of the dense MACs under the target


@dataclass
class _Point:
    """A module whose output a searched group's candidates replace, and its candidate BatchNorms."""

    module: str
    norms: nn.ModuleList | None  # one BatchNorm per candidate width; None: a conv/linear output


class Supernet(nn.Module):
    """TAS's search network over a full-width model: architecture logits, candidate BatchNorms, hooks.

    ``mode``: "search" (sample per forward), "argmax" (the argmax architecture, deterministic), or
    "off" (the plain model). A module so its candidate BatchNorms move, train/eval and checkpoint with it.
    """

    def __init__(
        self,
        graph: PruningGraph,
        options: TASOptions,
        min_channels: int,
        round_to: int = 1,
        min_share: float = 0.0,
        align: str = "interpolate",
    ):
        super().__init__()
        self.graph, self.mode, self.tau = graph, "search", options.tau_max
        self.align = align  # "interpolate" | "pad": how two candidates' outputs meet (tas_space)
        points = mask_points(graph)
        self.searched: list[ChannelGroup] = []
        self.fixed: dict[str, str] = {}  # group root -> why its width is not searched
        self.widths: list[list[int]] = []
        self.points: list[list[_Point]] = []
        self.norms = nn.ModuleList()
        for g in graph.groups:
            why = _why_fixed(graph, g, points)
            if why:
                self.fixed[g.root] = why
                continue
            step = group_step(g.size, 1, round_to) if g.ch_groups == 1 else 1  # grouped: exact widths
            least = max(1, min_channels, math.ceil(min_share * g.size - 1e-9))  # the width floor
            cands = width_candidates(g.size, options.width_ratios, least=least, step=step)
            group_points = []
            for module, _slot in points_of(points, g):
                m = graph.modules[module]
                norms = nn.ModuleList([_like(m, c) for c in cands]) if isinstance(m, NORMS) else None
                if norms is not None:
                    self.norms.append(norms)
                group_points.append(_Point(module, norms))
            self.searched.append(g)
            self.widths.append(cands)
            self.points.append(group_points)
        self.stages: list[StageLayers] = (
            stage_layers(graph, find_stages(graph.model)) if options.depth else []
        )
        self.alpha = nn.ParameterList([nn.Parameter(1e-3 * torch.randn(len(c))) for c in self.widths])
        self.beta = nn.ParameterList([nn.Parameter(1e-3 * torch.randn(len(s.depths))) for s in self.stages])
        self._pairs: list[tuple[list[int], torch.Tensor]] = []
        self._depth_w: list[torch.Tensor] = []
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # --- sampling ---
    def sample(self) -> None:
        """Draw this forward's architecture: two widths per group, depth weights per stage."""
        if self.mode == "argmax":
            self._pairs = [([int(a.argmax())], a.new_ones(1)) for a in self.alpha]
            self._depth_w = [F.one_hot(b.argmax(), len(b)).to(b.dtype) for b in self.beta]
            return
        self._pairs = sample_pairs(list(self.alpha), self.tau)
        self._depth_w = [gumbel_probs(b, self.tau) for b in self.beta]

    # --- hooks ---
    def attach(self) -> None:
        modules = self.graph.modules
        for gi, points in enumerate(self.points):
            for p in points:
                self._handles.append(modules[p.module].register_forward_hook(self._width_hook(gi, p)))
        for si, sl in enumerate(self.stages):
            seq = modules[sl.stage.name]
            for d in sl.depths:
                self._handles.append(seq[d - 1].register_forward_hook(self._capture(f"{si}:{d}")))
            self._handles.append(seq.register_forward_hook(self._depth_hook(si)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _width_hook(self, gi: int, point: _Point):
        def hook(_m, inputs, out: torch.Tensor) -> torch.Tensor:
            if self.mode == "off":
                return out
            picked, weights = self._pairs[gi]
            widths = [self.widths[gi][j] for j in picked]
            top = max(widths)
            total = None
            for j, c, w in zip(picked, widths, weights, strict=True):
                if point.norms is None:
                    part = out[:, :c]
                else:  # the candidate BatchNorm in the model's mode (they are not the model's modules)
                    norm = point.norms[j].train(_m.training)
                    part = norm(inputs[0][:, :c])
                part = align_channels(part, top, self.align) * w
                total = part if total is None else total + part
            pad = [0, 0] * (out.dim() - 2) + [0, out.shape[1] - top]
            return F.pad(total, pad)

        return hook

    def _capture(self, key: str):
        def hook(_m, _inputs, out: torch.Tensor) -> None:
            if self.mode != "off":
                self._captured[key] = out

        return hook

    def _depth_hook(self, si: int):
        def hook(_m, _inputs, out: torch.Tensor) -> torch.Tensor:
            if self.mode == "off":
                return out
            sl, weights = self.stages[si], self._depth_w[si]
            total = sum(self._captured.pop(f"{si}:{d}") * w for d, w in zip(sl.depths, weights, strict=True))
            return total

        return hook

    # --- cost ---
    def keep_counts(self, widths: list | torch.Tensor) -> list | torch.Tensor:
        """Keep counts for every graph group, from the searched groups' widths (full for fixed ones)."""
        searched = {g.index: i for i, g in enumerate(self.searched)}
        if isinstance(widths, torch.Tensor):
            full = torch.tensor(
                [float(g.size) for g in self.graph.groups], dtype=widths.dtype, device=widths.device
            )
            idx = torch.tensor([g.index for g in self.searched], device=widths.device)
            return full.index_put((idx,), widths) if len(idx) else full
        return [widths[searched[g.index]] if g.index in searched else g.size for g in self.graph.groups]

    def expected_macs(self) -> torch.Tensor:
        """E[MACs]: softmax widths (no Gumbel), previous layers' expected widths as inputs, every block
        weighted by the probability that its stage keeps it."""
        e = (
            torch.stack(
                [
                    a.softmax(0) @ torch.tensor(c, dtype=a.dtype, device=a.device)
                    for a, c in zip(self.alpha, self.widths, strict=True)
                ]
            )
            if self.widths
            else torch.zeros(0)
        )
        keep = self.keep_counts(e.double())
        weights = layer_weights(self.graph, self.stages, [b.softmax(0).double() for b in self.beta])
        return self.graph.cost.macs(keep, weights)

    def argmax(self) -> tuple[list[int], dict[str, int]]:
        """The argmax architecture: width per searched group, blocks per stage."""
        widths = [c[int(a.argmax())] for a, c in zip(self.alpha, self.widths, strict=True)]
        depths = {
            sl.stage.name: sl.depths[int(b.argmax())] for sl, b in zip(self.stages, self.beta, strict=True)
        }
        return widths, depths

    def argmax_macs(self, widths: list[int] | None = None, depths: dict[str, int] | None = None) -> int:
        """MACs of the argmax architecture (or of the one given), exactly as built."""
        if widths is None or depths is None:
            widths, depths = self.argmax()
        onehots = [
            F.one_hot(torch.tensor(sl.depths.index(depths[sl.stage.name])), len(sl.depths)).double()
            for sl in self.stages
        ]
        weights = layer_weights(self.graph, self.stages, onehots)
        return round(float(self.graph.cost.macs(self.keep_counts(widths), weights)))

    def fit(
        self, widths: list[int], depths: dict[str, int], low: float, high: float
    ) -> tuple[list[int], dict[str, int], int]:
        """Step an architecture into ``[low, high]`` MACs (a job's result must meet its target band, and a
        short search may end outside it): ``budget.fit_levels`` over every group's width candidates and
        every stage's depth candidates, the logits as the preference. Above ``high``, each step lowers
        the width or depth whose logit drop per MAC saved is least (what the search minds least); below
        ``low``, it raises the one whose logit rise per MAC added is largest. Returns widths, depths and
        MACs (outside the band only when no step is left)."""
        choices = [*self.widths, *(sl.depths for sl in self.stages)]
        logits = [*self.alpha, *self.beta]
        at = [c.index(w) for c, w in zip(self.widths, widths, strict=True)]
        at += [sl.depths.index(depths[sl.stage.name]) for sl in self.stages]

        def arch(levels: list[int]) -> tuple[list[int], dict[str, int]]:
            n = len(self.widths)
            ws = [c[i] for c, i in zip(self.widths, levels[:n], strict=True)]
            rest = levels[n:]
            return ws, {sl.stage.name: sl.depths[i] for sl, i in zip(self.stages, rest, strict=True)}

        at, macs = fit_levels(
            at,
            [len(c) for c in choices],
            lambda i, j: float(logits[i][j].detach()),
            lambda states: [self.argmax_macs(*arch(st)) for st in states],
            low,
            high,
        )
        widths, depths = arch(at)
        return widths, depths, round(macs)


def points_of(points: dict[str, list], g: ChannelGroup) -> list[tuple[str, Any]]:
    return [(module, slot) for module, pairs in points.items() for gi, slot in pairs if gi == g.index]


def _why_fixed(graph: PruningGraph, g: ChannelGroup, points: dict[str, list]) -> str | None:
    """Why a group's width cannot be searched by taking first channels of whole layer outputs."""
    if g.ch_groups > 1:
        return "a grouped convolution ties its channels in blocks"
    mine = points_of(points, g)
    if not mine:
        return "no layer output carries it"
    for module, slot in mine:
        if len(points[module]) > 1:
            return f"{module} carries several groups (a concatenation)"
        m = graph.modules[module]
        width = (
            m.num_features
            if isinstance(m, NORMS)
            else getattr(m, "out_channels", getattr(m, "out_features", 0))
        )
        if (
            width != g.size
            or not torch.equal(slot.module_idx, torch.arange(g.size))
            or not torch.equal(slot.root_idx, torch.arange(g.size))
        ):
            return f"{module}'s output is not the group's channels in order"
    return None


def _like(norm: nn.Module, channels: int) -> nn.Module:
    """A BatchNorm of ``norm``'s kind and settings over its first ``channels`` channels, starting from
    its affine parameters and statistics there [ours: the official code starts every candidate's
    BatchNorm afresh, as it searches from scratch; here the search starts from the dense weights]."""
    new = type(norm)(
        channels,
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    state = {k: v[:channels].clone() if v.dim() else v.clone() for k, v in norm.state_dict().items()}
    new.load_state_dict(state)
    return new.to(next(iter(norm.buffers()), torch.zeros(0)).device)


class _Argmax(nn.Module):
    """The search network in its argmax architecture, as a module of its own (for evaluation)."""

    def __init__(self, model: nn.Module, supernet: Supernet):
        super().__init__()
        self.model, self.supernet = model, supernet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.supernet.mode
        self.supernet.mode = "argmax"
        try:
            self.supernet.sample()
            return self.model(x)
        finally:
            self.supernet.mode = mode


@METHODS.register("tas")
class TAS(Method):
    options: TASOptions

    def __init__(self, options: TASOptions, ctx) -> None:
        super().__init__(options, ctx)
        self.supernet: Supernet | None = None
        self._best: dict[str, Any] = {}  # the best-top-1 search epoch whose argmax was within the band

    def _in_band(self, ratio: float) -> bool:
        """Whether a network at ``ratio`` of the dense MACs may be the job's result: within
        ``budget.TARGET_BAND`` under the target (the search's own tolerance t may be wider)."""
        target = self.ctx.spec.target.macs_ratio
        return target - TARGET_BAND <= ratio <= target

    def align(self) -> str:
        """How the search aligns two candidates' outputs: the option, ``auto`` resolved to ``pad`` when the
        search starts from trained weights (given, or trained first), else the paper's interpolation."""
        if self.options.align != "auto":
            return self.options.align
        s = self.ctx.spec
        return "pad" if s.model.weights or s.schedule.dense_epochs else "interpolate"

    def wants_teacher(self) -> bool:
        return self.options.kd or self.options.init == "teacher"

    def supervised_loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The found network's loss: KD from the teacher when ``kd`` (a teacher loaded only for
        ``init: teacher`` teaches nothing), else cross-entropy."""
        if not self.options.kd:
            return F.cross_entropy(logits, y)
        return super().supervised_loss(logits, x, y)

    def phases(self) -> list[Phase]:
        return [
            Phase("search", self.options.search_epochs, Streams((0.5, 0.5), "zip")),
            Phase("kd", self.ctx.spec.schedule.epochs),
        ]

    def start_phase(self, phase: Phase, model: nn.Module) -> nn.Module:
        if phase.name == "search":
            if self.options.sort_channels:
                model = sort_by_importance(self.ctx.graph(model)).to(self.ctx.device)
            self._attach(model, None)
            return model
        return self._build(model)

    def _attach(self, model: nn.Module, state: dict[str, Any] | None) -> None:
        graph = self.ctx.graph(model)
        t = self.ctx.spec.target
        net = Supernet(graph, self.options, t.min_channels, self.ctx.round_to, t.min_width, self.align())
        net = net.to(self.ctx.device)
        if state is not None:
            net.load_state_dict(state)
        net.attach()
        self.supernet = net
        d = self.ctx.details
        d.setdefault("searched_groups", len(net.searched))
        d.setdefault("fixed_groups", net.fixed)
        d.setdefault("width_candidates", net.widths)
        if not net.stages:
            why = (
                "depth search is off"
                if not self.options.depth
                else "the model has no stages of residual blocks"
            )
            d.setdefault("depth_search", f"none: {why}; width only")
        else:
            d.setdefault("depth_search", {sl.stage.name: sl.depths for sl in net.stages})

    def _choose(self, net: Supernet) -> tuple[list[int], dict[str, int], int, str]:
        """The architecture to build (``_searched``), stepped up to within ``SPEND`` of the dense MACs
        under the target where it lies lower and the candidates allow, in the logits' order of
        preference (``Supernet.fit``): a network in the band's lower half leaves MACs unspent that the
        user's budget allowed, and a comparison at equal MACs needs them spent (measured: the last
        argmax at 0.482 for a target of 0.5, beside `magnitude` at 0.500)."""
        widths, depths, predicted, chosen = self._searched(net)
        spend = self.ctx.target_macs - SPEND * self.ctx.dense_macs
        if predicted >= spend:
            return widths, depths, predicted, chosen
        grown, deeper, macs = net.fit(widths, depths, spend, self.ctx.target_macs)
        if not predicted < macs <= self.ctx.target_macs:
            return widths, depths, predicted, chosen
        ratio = predicted / self.ctx.dense_macs
        return (
            grown,
            deeper,
            macs,
            f"{chosen}; stepped up from {ratio:.3f} of the dense MACs toward the target",
        )

    def _searched(self, net: Supernet) -> tuple[list[int], dict[str, int], int, str]:
        """The architecture the search chose: widths, depths, its MACs and where it came from. The last
        epoch's argmax if within [target - TARGET_BAND, target]; else, as the official code's "best"
        architecture, the in-band epoch the search scored best; else (none was in band) the last argmax,
        stepped into the band (``Supernet.fit``). The search's own band (tolerance t) steers the cost loss
        only: a result at target - t would spend less than the budget allows."""
        widths, depths = net.argmax()
        predicted = net.argmax_macs()
        ratio = predicted / self.ctx.dense_macs
        if self._in_band(ratio):
            return widths, depths, predicted, "last epoch"
        if self._best:
            widths, depths = self._best["widths"], self._best["depths"]
            chosen = f"epoch {self._best['epoch'] + 1} (the last epoch's was outside the band)"
            return widths, depths, net.argmax_macs(widths, depths), chosen
        low = self.ctx.target_macs - TARGET_BAND * self.ctx.dense_macs
        above = predicted > self.ctx.target_macs
        widths, depths, predicted = net.fit(widths, depths, low, self.ctx.target_macs)
        where = (
            "down to the target where the logits mind least"
            if above
            else "up into the band where the logits favour most"
        )
        chosen = (
            f"last epoch ({ratio:.3f} of the dense MACs: no epoch's argmax was within {TARGET_BAND} under the "
            "target), "
            f"stepped {where}; the search needs more epochs (search_epochs) or a faster architecture LR "
            "(arch_lr)"
        )
        return widths, depths, predicted, chosen

    def _build(self, model: nn.Module) -> nn.Module:
        """The argmax architecture, physically: fewer blocks, first k channels per group."""
        net = self.supernet
        assert net is not None
        widths, depths, predicted, chosen = self._choose(net)
        net.detach()
        self.supernet = None
        source = self._source(model, net, widths)
        example = self.ctx.example
        by_root = dict(zip((g.root for g in net.searched), widths, strict=True))
        keep_blocks(source, depths)
        graph = PruningGraph(source, example, self.ctx.num_classes, self.ctx.graph_timeout_s)
        keep = [torch.arange(_width_for(g, by_root, net)) for g in graph.groups]
        built = remove_channels(graph, keep)
        self.ctx.details.update(
            widths={g.root: int(k.numel()) for g, k in zip(graph.groups, keep, strict=True)},
            depths=depths,
            predicted_macs=predicted,
            architecture_from=chosen,
        )
        return built.to(self.ctx.device)

    def _source(self, model: nn.Module, net: Supernet, widths: list[int]) -> nn.Module:
        """The full network the found one is cut from (on the CPU), by ``init``: random weights (the
        same whether or not the search was resumed); the teacher's, its channels sorted by importance
        as the search's were; or the searched supernet's, each group's BatchNorms those of its chosen
        width candidate."""
        spec, example = self.ctx.spec, self.ctx.example
        if self.options.init == "supernet":
            source = copy.deepcopy(model).cpu()
            _take_candidate_norms(source, net, widths)
            return source
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            source = build_model(spec.model.name, self.ctx.num_classes, example.shape[1])
        if self.options.init == "teacher" and self.ctx.teacher is not None:
            source.load_state_dict(copy.deepcopy(self.ctx.teacher).cpu().state_dict())
            if self.options.sort_channels:
                source = sort_by_importance(PruningGraph(source, example, self.ctx.num_classes))
        return source

    # --- training ---
    def param_sets(self, model: nn.Module) -> list[ParamSet]:
        weights = [p for p in model.parameters() if p.requires_grad]
        if self.supernet is None:
            return [ParamSet("weights", weights)]
        o = self.options
        arch = OptimizerConfig("adam", lr=o.arch_lr, betas=o.arch_betas, weight_decay=o.arch_weight_decay)
        return [
            ParamSet("weights", weights + list(self.supernet.norms.parameters())),
            ParamSet("arch", [*self.supernet.alpha, *self.supernet.beta], arch, lr_rule="constant"),
        ]

    def training_step(
        self, model: nn.Module, batch: Batch | tuple[Batch, ...], ctx: StepContext
    ) -> StepOutput:
        if self.supernet is None:
            return super().training_step(model, batch, ctx)
        net, o = self.supernet, self.options
        (x_w, y_w), (x_a, y_a) = batch
        net.tau = tau_at(ctx.epoch, o.search_epochs, o.tau_max, o.tau_min)
        net.sample()
        with ctx.autocast():
            loss_w = F.cross_entropy(model(x_w), y_w)
        ctx.backward(loss_w, "weights")
        ctx.update("weights")
        net.sample()
        with ctx.autocast():
            ce_a = F.cross_entropy(model(x_a), y_a)
        expected = net.expected_macs()
        dense = self.ctx.dense_macs
        current = net.argmax_macs()
        cost = cost_loss(expected, current, self.ctx.target_macs, o.tolerance * dense)
        ctx.backward(ce_a + o.cost_weight * cost.float(), "arch")
        return StepOutput(loss_w.detach(), {"arch_ce": ce_a.detach(), "cost_loss": cost.detach()})

    # --- per epoch ---
    def eval_views(self, model: nn.Module) -> dict[str, View]:
        if self.supernet is None:
            return super().eval_views(model)
        return {"argmax": View(_Argmax(model, self.supernet))}

    def current_macs(self, model: nn.Module) -> int:
        return self.supernet.argmax_macs() if self.supernet is not None else super().current_macs(model)

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, float]) -> EpochEnd:
        net = self.supernet
        if net is None:
            return EpochEnd()
        dense = self.ctx.dense_macs
        with torch.no_grad():
            widths, depths = net.argmax()
            ratio = net.argmax_macs() / dense
            if self._in_band(ratio) and metrics["top1"] >= self._best.get("top1", -1.0):
                self._best = {"top1": metrics["top1"], "epoch": epoch, "widths": widths, "depths": depths}
            numbers: dict[str, Any] = {
                "tau": net.tau,
                "expected_macs_ratio": float(net.expected_macs()) / dense,
                "argmax_macs_ratio": ratio,
                "searched_widths": [float(w) for w in widths],
            }
            if depths:
                numbers["searched_depths"] = [float(d) for d in depths.values()]
        return EpochEnd(metrics=numbers)

    # --- resume ---
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["best"] = dict(self._best)
        if self.supernet is not None:
            state["supernet"] = {k: v.detach().cpu().clone() for k, v in self.supernet.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        self._best = dict(state.get("best", {}))
        if self.supernet is not None:
            self.supernet.detach()
            self.supernet = None
        if "supernet" in state:
            self._attach(model, state["supernet"])


def _width_for(g: ChannelGroup, by_root: dict[str, int], net: Supernet) -> int:
    """A built group's width: its searched width (matched by root layer, else by any output layer the
    search knew), or its full width."""
    if g.root in by_root:
        return min(g.size, by_root[g.root])
    for searched, width in zip(net.searched, by_root.values(), strict=True):
        names = {s.module for s in searched.outputs}
        if any(s.module in names for s in g.outputs):
            return min(g.size, width)
    return g.size


def sort_by_importance(graph: PruningGraph) -> nn.Module:
    """A copy of ``graph.model`` computing the same function, each reorderable group's channels sorted
    by the group magnitude ``magnitude`` ranks them by (most important first), one permutation for every
    layer of the group and its consumers: TAS's candidates keep a group's first k channels, which from
    trained weights would be an arbitrary subset (the official search trains from scratch, where
    training makes the first channels the important ones)."""
    scores = magnitude(graph)
    orders = [
        s.argsort(descending=True, stable=True) if permutable(graph, g) else None
        for g, s in zip(graph.groups, scores, strict=True)
    ]
    return permute_channels(graph, orders)


@torch.no_grad()
def _take_candidate_norms(model: nn.Module, net: Supernet, widths: list[int]) -> None:
    """Copy into ``model``'s BatchNorms, over each searched group's first k channels, the affine
    parameters and statistics of the candidate BatchNorm of its chosen width k (``init: supernet``:
    the search trained those, not the model's own)."""
    modules = dict(model.named_modules())
    for cands, points, k in zip(net.widths, net.points, widths, strict=True):
        j = cands.index(k)
        for p in points:
            if p.norms is None:
                continue
            target, chosen = modules[p.module], p.norms[j]
            for name, value in chosen.state_dict().items():
                mine = getattr(target, name)
                if value.dim():
                    mine[:k].copy_(value.to(mine.device))
