"""``plan(model, example_input, target=...)`` and ``apply(model, plan)``: pruning for your own loop.

For training loops the service does not run (detection, segmentation, your own loss and data):
``plan`` decides what to keep and ``apply`` physically prunes, with the pieces a job uses and nothing
else: the coupled groups (``groups.PruningGraph``, with ``ignored_layers`` kept whole), a one-shot
importance (``importance``: the ``magnitude`` method's group L2 norm by default), the jobs' allocator
(``budget.select_by_rates`` at the MAC target, channel step and width floor of a ``TargetSpec``) and
the jobs' surgery (``surgery.remove_channels``). The result lands in the band every job promises,
``[target - budget.TARGET_BAND, target]`` of the dense MACs, counted by ``macs.count_macs``.

The methods that decide while they train (``s2h``, ``tas``, ``psap``, ``epi``) have no plan: they need
the engine's training loop (``pruning_core.prune`` or a job).

Neither function modifies the module it is given: ``plan`` works on a deep copy (it also prunes that
copy once, so the plan's "after" numbers are counted, not estimated), and ``apply`` returns a new,
physically smaller deep copy. BatchNorm statistics of the result are those of the dense network;
your own training (or a few batches in train mode) re-estimates them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import ValidationError
from torch import nn

from ..graph.budget import check_reachable, select_by_rates
from ..graph.groups import ChannelGroup, PruningGraph
from ..graph.importance import STATIC, Scores, magnitude
from ..graph.macs import count_params, measure
from ..graph.surgery import remove_channels
from ..settings import get_settings
from ..spec import CHANNEL_STEP_DEFAULTS, METHODS, TargetSpec, describe_errors
from .runner import check_target

# One-shot criteria ``plan`` accepts: the ``magnitude`` method's scores, and every static importance.
CRITERIA: dict[str, Callable[[PruningGraph], Scores]] = {
    "magnitude": lambda graph: magnitude(graph, p=2),
    **{name: STATIC.get(name) for name in STATIC.names()},
}
TRAINING_METHODS = tuple(m for m in METHODS if m not in CRITERIA)  # s2h, tas, psap, epi


@dataclass(frozen=True)
class GroupPlan:
    """One coupled channel group: what it holds and what the plan keeps of it."""

    root: str  # the layer whose output channels index the group
    layers: tuple[str, ...]  # every module whose outputs carry these channels (convs, BatchNorms, ...)
    channels: int  # dense width
    keep: tuple[int, ...]  # kept root channel indices, sorted

    @property
    def kept(self) -> int:
        """Channels the group keeps."""
        return len(self.keep)


@dataclass(frozen=True)
class Plan:
    """What ``plan`` decided: per group the channels kept, and the network's cost before and after
    (MACs per sample, params), counted on a copy pruned to the plan."""

    method: str
    target_macs_ratio: float  # remaining MACs / dense MACs asked for
    round_to: int  # the channel step the widths follow (groups at least 4 steps wide)
    min_width: float  # the width floor: no group below this share of its dense width
    groups: tuple[GroupPlan, ...]
    ignored: tuple[str, ...]  # ignored_layers, by name: their output channels are kept
    excluded: Mapping[str, str]  # root layer -> why its group cannot be pruned safely (kept whole)
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    example: torch.Tensor = field(repr=False, compare=False)  # (1, ...) CPU: traces the model in apply

    @property
    def macs_ratio(self) -> float:
        """Remaining MACs / dense MACs of the pruned network."""
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float:
        """Remaining params / dense params."""
        return self.params_after / self.params_before

    def apply(self, model: nn.Module) -> nn.Module:
        """A physically pruned deep copy of ``model`` (the module the plan was made for); see ``apply``."""
        return apply(model, self)

    def summary(self) -> str:
        """A readable table: one line per group (root, width before -> after), then the totals."""
        rows = [f"{'group':<40} {'channels':>8} {'kept':>6}"]
        rows += [f"{g.root:<40} {g.channels:>8} {g.kept:>6}" for g in self.groups]
        rows.append(
            f"MACs {_si(self.macs_before)} -> {_si(self.macs_after)} ({self.macs_ratio:.3f}, target "
            f"{self.target_macs_ratio:g}); params {_si(self.params_before)} -> {_si(self.params_after)} "
            f"({self.params_ratio:.3f})"
        )
        if self.ignored:
            rows.append(f"ignored (kept whole): {', '.join(self.ignored)}")
        rows += [f"left out (kept whole): {root}: {why}" for root, why in self.excluded.items()]
        head = f"{self.method} plan, {len(self.groups)} groups, channel step {self.round_to}"
        return "\n".join([head, *rows])

    def __str__(self) -> str:
        return self.summary()


def plan(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    target: float | Mapping[str, object] | TargetSpec = 0.5,
    method: str = "magnitude",
    ignored_layers: Sequence[nn.Module | str] = (),
) -> Plan:
    """What pruning ``model`` to ``target`` would keep, per coupled channel group.

    ``example_input``: one batch of what the model eats (N x C x H x W; only its first sample is used).
    ``target``: remaining MACs / dense MACs in (0, 1], or a ``TargetSpec`` (or its mapping) for the width
    floor (``min_width``), channel step (``round_to``; default the step jobs use on the model's device
    type) and ``min_channels``. ``method``: a one-shot criterion, ``magnitude`` (the ``magnitude``
    method's group L2 norm) or one of ``importance.STATIC`` (``l1``, ``l2``, ``bn_scale``,
    ``neuron_l2``). ``ignored_layers``: modules of ``model``, or their names, whose output channels
    must stay (every group that would prune them is kept whole). ``model`` is not modified.
    Raises a one-line ``ValueError`` for a method or layer it does not know, ``TargetError`` for an
    unreachable target.
    """
    score = _criterion(method)
    spec = _target(target)
    work = copy.deepcopy(model)
    ignored = _ignored(model, ignored_layers)
    example = _example(work, example_input)
    graph = _graph(work, example, [dict(work.named_modules())[n] for n in ignored])
    device = next(work.parameters()).device
    round_to = spec.round_to if spec.round_to is not None else CHANNEL_STEP_DEFAULTS.get(device.type, 1)
    check_reachable(graph, spec.macs_ratio, spec.min_channels, round_to, spec.min_width)
    keep = select_by_rates(
        graph,
        score(graph),
        None,
        int(spec.macs_ratio * graph.dense_macs),
        min_channels=spec.min_channels,
        round_to=round_to,
        min_share=spec.min_width,
    )
    before = measure(work, example)
    groups = tuple(_group_plan(g, k) for g, k in zip(graph.groups, keep, strict=True))
    after = measure(remove_channels(graph, keep), example)
    check_target(spec.macs_ratio, after.macs / before.macs, method)
    return Plan(
        method=method,
        target_macs_ratio=spec.macs_ratio,
        round_to=round_to,
        min_width=spec.min_width,
        groups=groups,
        ignored=tuple(ignored),
        excluded=dict(graph.excluded),
        macs_before=before.macs,
        macs_after=after.macs,
        params_before=before.params,
        params_after=after.params,
        example=example.detach().cpu(),
    )


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """A physically pruned deep copy of ``model``: every group's channels outside ``plan``'s keep
    indices removed (``surgery.remove_channels``), in the mode (train/eval) and on the device of
    ``model``, which is left untouched. Its counted MACs equal ``plan.macs_after``. Raises
    ``ValueError`` when ``model``'s groups are not the plan's (a plan made for another network)."""
    work = copy.deepcopy(model)
    example = plan.example.to(next(work.parameters()).device)
    graph = _graph(work, example, [dict(work.named_modules())[n] for n in _ignored(work, plan.ignored)])
    found = [(g.root, g.size) for g in graph.groups]
    planned = [(g.root, g.channels) for g in plan.groups]
    if found != planned:
        raise ValueError(
            f"apply(): this plan was made for another network: its groups are {len(planned)} "
            f"(first {planned[:1]}), this model's {len(found)} (first {found[:1]})"
        )
    pruned = remove_channels(graph, [torch.tensor(g.keep, dtype=torch.long) for g in plan.groups])
    if count_params(pruned) != plan.params_after:
        raise ValueError("apply(): the pruned model's parameters differ from the plan's (another network?)")
    return pruned


def _criterion(method: str) -> Callable[[PruningGraph], Scores]:
    """The one-shot scorer ``method`` names; a one-line ValueError for a training or unknown method."""
    if method in CRITERIA:
        return CRITERIA[method]
    if method in TRAINING_METHODS:
        raise ValueError(
            f"plan(): {method!r} decides what to keep while it trains, so it has no plan: run it with "
            "pruning_core.prune(...) or as a job"
        )
    raise ValueError(
        f"plan(): unknown method {method!r}; one-shot criteria: {', '.join(CRITERIA)} "
        f"({', '.join(TRAINING_METHODS)} train: pruning_core.prune or a job)"
    )


def _target(target: float | Mapping[str, object] | TargetSpec) -> TargetSpec:
    """``target`` as a ``TargetSpec`` (a number: the MAC ratio); one-line ValueError when invalid or
    when it asks for what only a job does (a measured speed-up, the latency allocation)."""
    if isinstance(target, TargetSpec):
        spec = target
    else:
        body = dict(target) if isinstance(target, Mapping) else {"macs_ratio": target}
        try:
            spec = TargetSpec.model_validate(body)
        except ValidationError as err:
            raise ValueError(f"plan(): target: {describe_errors(err)[0]}") from None
    if spec.speedup is not None or spec.allocation != "macs":
        raise ValueError(
            "plan(): a speed-up target or the latency allocation is timed on the job's device; give "
            "target as a MAC ratio here, or use pruning_core.prune / a job"
        )
    return spec


def _ignored(model: nn.Module, layers: Sequence[nn.Module | str]) -> list[str]:
    """The names in ``model`` of ``layers`` (modules of it, or names); one-line ValueError otherwise."""
    names = {m: n for n, m in model.named_modules()}
    known = set(names.values())
    out = []
    for layer in layers:
        name = layer if isinstance(layer, str) else names.get(layer)
        if name is None or name not in known or name == "":
            shown = layer if isinstance(layer, str) else type(layer).__name__
            raise ValueError(f"plan(): ignored_layers: {shown!r} is not a submodule of the model")
        out.append(name)
    return list(dict.fromkeys(out))


def _example(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """The first sample of ``example_input`` (1 x ...), on ``model``'s device."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        got = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input)
        raise ValueError(f"plan(): example_input must be a batch tensor (N, C, ...); got {got}")
    return example_input[:1].detach().to(next(model.parameters()).device)


def _graph(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module]) -> PruningGraph:
    """The model's dependency graph with ``ignored`` kept whole; classifier heads are found from the
    width of the output's dimension 1 (none for an output that is not a tensor)."""
    with torch.no_grad():
        was_training = model.training
        out = model.eval()(example)
        model.train(was_training)
    classes = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() >= 2 else 0
    return PruningGraph(model, example, classes, get_settings().graph_timeout_s, ignored)


def _group_plan(g: ChannelGroup, keep: torch.Tensor) -> GroupPlan:
    layers = tuple(dict.fromkeys(s.module for s in g.outputs))
    return GroupPlan(g.root, layers, g.size, tuple(int(i) for i in keep.tolist()))


def _si(n: int) -> str:
    """``n`` with a k/M/G suffix, 3 significant digits."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)
