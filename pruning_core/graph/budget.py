"""Turning channel scores or per-group ratios into keep decisions that meet a MAC budget, and the
differentiable MAC cost of fractional widths.

- ``select_to_budget``: the one global allocator. Every channel of every group is ranked by its score
  and the keep threshold is bisected until the MACs predicted by the graph's cost model fit the budget
  (the magnitude baseline; EPI's "what would pruning to the target keep now").
- ``select_by_rates``: the same, each group's pruned share then divided by a per-group rate (the latency
  allocation, ``layer_times.latency_rates``) and rescaled to the budget.
- ``counts_for_ratios``: per-group pruning ratios (e.g. PSAP's, from each layer's sparsity) scaled by one
  factor, found by bisection, clipped per group, so that the keep counts fit the budget.
- ``soft_macs``: the graph's MAC expression on fractional widths, as a tensor with gradients (S2H's and
  TAS's resource losses); equal to the integer count at integer widths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import TargetError
from .groups import PruningGraph, top_channels

# Where every method's returned network must lie, as a share of the dense MACs: [target - band, target].
TARGET_BAND = 0.02


def min_macs(graph: PruningGraph, min_channels: int = 1, round_to: int = 1, min_share: float = 0.0) -> int:
    """The fewest MACs the graph can reach: every group at its minimum width (in its channel step)."""
    return int(graph.cost.macs(floors(graph, min_channels, round_to, min_share)))


def check_reachable(
    graph: PruningGraph, macs_ratio: float, min_channels: int = 1, round_to: int = 1, min_share: float = 0.0
) -> None:
    """Refuse, before any training, a target below what removing channels can reach."""
    floor = min_macs(graph, min_channels, round_to, min_share) / graph.dense_macs
    if macs_ratio < floor:
        step = f", widths in steps of {round_to} (target.round_to)" if round_to > 1 else ""
        share = f", at least {min_share:g} of each group's width (target.min_width)" if min_share else ""
        raise TargetError(
            f"target macs_ratio {macs_ratio:g} is unreachable: this model keeps at least {floor:.3f} of its "
            f"MACs (layers that cannot be pruned, {min_channels} channel(s) per group minimum{share}{step})"
        )


# A group keeps at least this many candidate widths under the channel step: narrower groups take a finer
# step (a divisor of ``round_to``). With step 8 everywhere, the 16-channel groups of a CIFAR ResNet could
# only be 8 or 16 wide and magnitude landed ResNet-20 at 0.43 of its MACs for a target of 0.5.
MIN_WIDTH_CHOICES = 4


def group_step(size: int, ch_groups: int, round_to: int) -> int:
    """A group's keep-count step (channels): its channel grouping (grouped convolutions keep their own
    blocks), else the largest divisor of ``round_to`` that still leaves the group ``MIN_WIDTH_CHOICES``
    widths (``round_to`` itself in groups at least 4x that wide; 1 in narrow groups)."""
    if ch_groups > 1:
        return ch_groups
    fits = [d for d in range(2, round_to + 1) if round_to % d == 0 and size >= MIN_WIDTH_CHOICES * d]
    return max(fits, default=1)


def _steps(graph: PruningGraph, round_to: int) -> list[int]:
    return [group_step(g.size, g.ch_groups, round_to) for g in graph.groups]


def floors(
    graph: PruningGraph, min_channels: int = 1, round_to: int = 1, min_share: float = 0.0
) -> list[int]:
    """The fewest channels each group of ``graph`` may keep (the width floor every allocator honours):
    ``min_channels`` (at least one per channel block), and at least ``min_share`` of the group's width in
    ``graph`` (its dense width: allocators run on the dense graph), rounded up to the group's channel
    step, never above the group's size."""
    return _floors(graph, min_channels, _steps(graph, round_to), min_share)


def _floors(graph: PruningGraph, min_channels: int, step: list[int], min_share: float = 0.0) -> list[int]:
    """``floors`` with the groups' steps given: rounded up to the step, so a group pruned to its floor
    still has a hardware-friendly width."""
    lows = graph.min_keep(min_channels)
    return [
        min(g.size, -(-max(lo, math.ceil(min_share * g.size - 1e-9)) // r) * r)
        for g, lo, r in zip(graph.groups, lows, step, strict=True)
    ]


def _counts(scores: Sequence[torch.Tensor], threshold: float, floor: list[int], step: list[int]) -> list[int]:
    counts = []
    for s, lo, r in zip(scores, floor, step, strict=True):
        k = int((s >= threshold).sum())
        k = -(-k // r) * r  # round up to the group's step
        counts.append(min(len(s), max(lo, k)))
    return counts


def select_to_budget(
    graph: PruningGraph,
    scores: Sequence[torch.Tensor],
    target_macs: int,
    *,
    min_channels: int = 1,
    round_to: int = 1,
    min_share: float = 0.0,
) -> list[torch.Tensor]:
    """Keep indices per group: the highest-scoring channels globally, as many as fit ``target_macs``.

    scores[g]: (group.size,) comparable across groups (normalise them first). Returns the largest keep
    set whose predicted MACs are <= target_macs. Counts are multiples of ``round_to`` (and of a group's
    channel grouping) where the group is large enough, and no group keeps fewer than ``floors``.
    """
    step = _steps(graph, round_to)
    floor = _floors(graph, min_channels, step, min_share)
    if graph.cost.macs(floor) > target_macs:
        raise TargetError(f"cannot reach {target_macs} MACs; the minimum is {graph.cost.macs(floor)}")
    cands = torch.cat([s.detach().flatten().float() for s in scores]).unique().sort().values
    lo, hi = 0, len(cands)  # invariant: threshold cands[hi] (or +inf) fits, cands[lo-1] may not
    while lo < hi:
        mid = (lo + hi) // 2
        if graph.cost.macs(_counts(scores, cands[mid].item(), floor, step)) <= target_macs:
            hi = mid
        else:
            lo = mid + 1
    threshold = cands[lo].item() if lo < len(cands) else float("inf")
    counts = _fill(graph, scores, _counts(scores, threshold, floor, step), step, target_macs, floor)
    return [top_channels(g, s, k) for g, s, k in zip(graph.groups, scores, counts, strict=True)]


def select_by_rates(
    graph: PruningGraph,
    scores: Sequence[torch.Tensor],
    rates: Sequence[float] | None,
    target_macs: int,
    *,
    min_channels: int = 1,
    round_to: int = 1,
    min_share: float = 0.0,
) -> list[torch.Tensor]:
    """Keep indices per group: the MAC allocation (``select_to_budget``) reshaped by per-group rates
    (``None``, or all 1: the MAC allocation itself).

    Each group's pruned share under the MAC allocation is divided by its rate (``rates[g] > 0``; below 1:
    prune more of it, e.g. ``layer_times.latency_rates``), and the shares are rescaled together to meet
    ``target_macs`` (``counts_for_ratios``), then topped up to the budget. The scores decide each group's
    share and which channels it keeps; a rate only moves the share in proportion. (Weighing the scores
    themselves by the rates moved whole groups: mean-normalised scores have a narrow spread, so a rate of
    1.3 against 1.0 took one of a ResNet-20's groups from 64 channels to 8.)
    """
    if rates is not None and (len(rates) != len(graph.groups) or any(r <= 0 for r in rates)):
        raise ValueError(
            f"need one positive rate per group: the graph has {len(graph.groups)} groups, got {len(rates)} "
            "rates (measured for another network?)"
        )
    floor = {"min_channels": min_channels, "round_to": round_to, "min_share": min_share}
    base = select_to_budget(graph, scores, target_macs, **floor)
    if rates is None or all(r == 1.0 for r in rates):
        return base
    shares = [(g.size - len(k)) / g.size / r for g, k, r in zip(graph.groups, base, rates, strict=True)]
    counts = counts_for_ratios(graph, shares, target_macs, max_ratio=1.0, **floor)
    steps = _steps(graph, round_to)
    counts = _fill(graph, scores, counts, steps, target_macs, _floors(graph, min_channels, steps, min_share))
    return [top_channels(g, s, k) for g, s, k in zip(graph.groups, scores, counts, strict=True)]


def top_up(
    graph: PruningGraph,
    counts: list[int],
    target_macs: int,
    *,
    round_to: int = 1,
    min_channels: int = 1,
    min_share: float = 0.0,
) -> list[int]:
    """``counts`` widened one channel step at a time while the budget allows, cheapest MACs first: a
    ratio allocation moves every group's width together, so with coarse steps (grouped convolutions)
    one scale can stop well under the budget (and into the band at finer steps, see ``_fill``)."""
    steps = _steps(graph, round_to)
    ones = [torch.ones(g.size) for g in graph.groups]
    return _fill(graph, ones, counts, steps, target_macs, _floors(graph, min_channels, steps, min_share))


def _fill(
    graph: PruningGraph,
    scores: Sequence[torch.Tensor],
    counts: list[int],
    step: list[int],
    target_macs: int,
    floor: list[int] | None = None,
) -> list[int]:
    """``_top_up`` in the groups' channel steps; where that leaves the MACs below the band every job
    must land in (``TARGET_BAND``), in single channels (a grouped convolution's blocks); and where even
    that does not reach it, one group narrowed by up to a channel step (not below ``floor``) before the
    top-up, the best such trade kept. On a small network the steps can skip the band (a 16- and
    32-channel CNN at step 8 reaches 0.386 or 0.515 of its MACs, nothing between; one channel of its
    wide layer is 2.3 % of them), and the target is the promise, the step a speed preference. A trade
    of one channel is not always enough: from (11, 22) channels at 0.479 that CNN reaches the band at
    (13, 19), three of the wide layer's channels given for two of the narrow one's."""
    counts = _top_up(graph, scores, counts, step, target_macs)
    low = target_macs - TARGET_BAND * graph.dense_macs
    if graph.cost.macs(counts) >= low:
        return counts
    fine = [g.ch_groups for g in graph.groups]
    counts = _top_up(graph, scores, counts, fine, target_macs)
    best, best_macs = counts, graph.cost.macs(counts)
    lows = floor or [f for f in fine]
    for g, (k, lo, r, coarse) in enumerate(zip(counts, lows, fine, step, strict=True)):
        for d in range(r, max(r, coarse) + 1, r):  # narrower by one fine step, ..., one channel step
            if best_macs >= low or k - d < lo:
                break
            trial = _top_up(graph, scores, [*counts[:g], k - d, *counts[g + 1 :]], fine, target_macs)
            m = graph.cost.macs(trial)
            if m > best_macs:
                best, best_macs = trial, m
    return best


def _top_up(
    graph: PruningGraph, scores: Sequence[torch.Tensor], counts: list[int], step: list[int], target_macs: int
) -> list[int]:
    """Widen groups by one step at a time while the budget allows: one threshold rounded up to each
    group's step leaves MACs unspent (up to a step of every group). Each round takes the step with the most
    score per MAC it adds (the channels it would bring back, best first), so the counts end as close
    under ``target_macs`` as the steps allow."""
    ranked = [s.detach().flatten().float().sort(descending=True).values for s in scores]
    counts = list(counts)
    macs = graph.cost.macs(counts)
    while True:
        best, best_gain, best_macs = -1, -1.0, macs
        for g, (k, r, top) in enumerate(zip(counts, step, ranked, strict=True)):
            if k >= len(top):
                continue
            trial = [*counts[:g], min(len(top), k + r), *counts[g + 1 :]]
            m = graph.cost.macs(trial)
            if m > target_macs:
                continue
            gain = float(top[k : trial[g]].clamp_min(0).sum()) / max(1.0, float(m - macs))
            if gain > best_gain:
                best, best_gain, best_macs = g, gain, m
        if best < 0:
            return counts
        counts[best] = min(len(ranked[best]), counts[best] + step[best])
        macs = best_macs


def _ratio_counts(
    graph: PruningGraph,
    ratios: Sequence[float],
    scale: float,
    max_ratio: float,
    floor: list[int],
    step: list[int],
) -> list[int]:
    counts = []
    for g, r, lo, k in zip(graph.groups, ratios, floor, step, strict=True):
        p = min(max_ratio, max(0.0, scale * r))
        keep = g.size - int(p * g.size)
        keep = -(-keep // k) * k  # round up to the group's step: never prune more than the ratio says
        counts.append(min(g.size, max(lo, keep)))
    return counts


def counts_for_ratios(
    graph: PruningGraph,
    ratios: Sequence[float],
    target_macs: int,
    *,
    max_ratio: float = 0.9,
    min_channels: int = 1,
    round_to: int = 1,
    min_share: float = 0.0,
    iters: int = 60,
) -> list[int]:
    """Keep counts per group from relative pruning ratios scaled to meet ``target_macs``.

    ``ratios[g] >= 0`` says how strongly group g should be pruned relative to the others. Group g prunes
    ``clip(s * ratios[g], 0, max_ratio)`` of its channels, and the scale ``s`` is bisected to the smallest
    value whose predicted MACs are <= ``target_macs`` (so as much as possible is kept). Raises
    ``TargetError`` when even every group at ``max_ratio`` does not fit.
    """
    if len(ratios) != len(graph.groups) or any(r < 0 for r in ratios):
        raise ValueError("need one non-negative ratio per group")
    step = _steps(graph, round_to)
    floor = _floors(graph, min_channels, step, min_share)
    if graph.cost.macs(_ratio_counts(graph, ratios, 0.0, max_ratio, floor, step)) <= target_macs:
        return _ratio_counts(graph, ratios, 0.0, max_ratio, floor, step)
    positive = [r for r in ratios if r > 0]
    hi = max_ratio / min(positive) if positive else 0.0
    if (
        not positive
        or graph.cost.macs(_ratio_counts(graph, ratios, hi, max_ratio, floor, step)) > target_macs
    ):
        raise TargetError(
            f"cannot reach {target_macs} MACs with per-group pruning ratios of at most {max_ratio:g}"
        )
    lo = 0.0  # invariant: scale lo does not fit, scale hi fits
    for _ in range(iters):
        mid = (lo + hi) / 2
        if graph.cost.macs(_ratio_counts(graph, ratios, mid, max_ratio, floor, step)) <= target_macs:
            hi = mid
        else:
            lo = mid
    return _ratio_counts(graph, ratios, hi, max_ratio, floor, step)


def soft_macs(graph: PruningGraph, widths: torch.Tensor) -> torch.Tensor:
    """MACs per sample for fractional keep counts ``widths`` (G,), differentiable with respect to them.

    The graph's own cost expression (``CostModel.macs``) evaluated on tensors: each layer's MACs use its
    groups' (expected) widths for its input and output channels. Equal to the integer prediction, and to
    the count after physical removal, at integer widths.
    """
    if widths.shape != (len(graph.groups),):
        raise ValueError(f"need one width per group ({len(graph.groups)}), got shape {tuple(widths.shape)}")
    return graph.cost.macs(widths)


# --- landing on the target ---


def fit_levels(
    at: Sequence[int],
    sizes: Sequence[int],
    preference: Callable[[int, int], float],
    macs_of: Callable[[list[list[int]]], list[float]],
    low: float,
    high: float,
) -> tuple[list[int], float]:
    """Step knobs along their levels until the predicted MACs lie in ``[low, high]``.

    Knob i stands at level ``at[i]`` of ``sizes[i]`` levels, ordered by increasing MACs (a group's
    widths, a stage's depths); ``preference(i, level)`` is how much the method wants knob i at that level
    (higher: keep); ``macs_of(states)`` predicts the MACs of each list of levels (one call per round, so
    a caller can evaluate them together). Above ``high`` each round lowers the knob that loses the least
    preference per MAC saved; below ``low`` it raises the knob that gains the most preference per MAC
    added without passing ``high``; a step that lands in the band is taken first, and going down one that
    stays above it before one that jumps below. Returns the levels and their MACs, outside the band only
    when no step is left (every knob at an end, or every rise past ``high``).
    """
    at = list(at)
    macs = macs_of([at])[0]
    while macs > high or macs < low:
        down = macs > high
        moves = [(i, at[i] + (-1 if down else 1)) for i in range(len(at))]
        moves = [(i, j) for i, j in moves if 0 <= j < sizes[i]]
        trials = [[*at[:i], j, *at[i + 1 :]] for i, j in moves]
        best: dict[
            int, tuple[float, list[int], float]
        ] = {}  # by how a move ends: 0 in band, 1 above, 2 below
        for (i, j), trial, m in zip(moves, trials, macs_of(trials) if trials else [], strict=True):
            if (m >= macs) if down else (m <= macs or m > high):
                continue
            score = (preference(i, j) - preference(i, at[i])) / abs(m - macs)  # per MAC
            where = 0 if low <= m <= high else 1 if m > high else 2
            if where not in best or score > best[where][0]:
                best[where] = (score, trial, m)
        if not best:
            break
        # A step that lands in the band ends the fit; going down, a smaller step that stays above it comes
        # before one that jumps below (a wide group's step can be larger than the band).
        _, at, macs = best[min(best)]
    return at, macs


def width_levels(
    graph: PruningGraph, counts: Sequence[int], min_channels: int, round_to: int, min_share: float = 0.0
) -> list[list[int]]:
    """Per group, the keep counts a fit may choose: from the floor (``_floors``, the width floor
    included) up in the group's step (``_steps``), the full width, and the current count (raised to the
    floor)."""
    step = _steps(graph, round_to)
    floor = _floors(graph, min_channels, step, min_share)
    return [
        sorted({*range(lo, g.size + 1, r), g.size, max(lo, min(g.size, int(k)))})
        for g, lo, r, k in zip(graph.groups, floor, step, counts, strict=True)
    ]


def _log_share(preference: torch.Tensor) -> torch.Tensor:
    """(size + 1,) float64: entry k is ``log`` of the share of ``preference``'s sum that its k largest
    values hold (0 at the full width; an all-zero group is free to cut).

    A share, so that groups of any width and scale compare; a log, so that each further channel a group
    gives up costs more than the last (diminishing returns): with plain sums, about equal preferences
    within a group and a cost that is linear in its width, the group whose channels cost the most MACs
    went down to its floor before any other moved (measured: ResNet-20's first residual group, 14
    channels to 1, after an epoch of S2H; top-1 at chance)."""
    top = preference.detach().flatten().double().clamp_min(0).sort(descending=True).values
    kept = torch.cat([top.new_zeros(1), top.cumsum(0)])
    eps = 1e-12 * max(float(kept[-1]), 1.0)
    return ((kept + eps) / (kept[-1] + eps)).log()


def fit_widths(
    graph: PruningGraph,
    counts: Sequence[int],
    preference: Sequence[torch.Tensor],
    target_macs: int,
    *,
    band: float = TARGET_BAND,
    min_channels: int = 1,
    round_to: int = 1,
    min_share: float = 0.0,
) -> list[int]:
    """Keep counts per group moved from ``counts`` into ``[target_macs - band * dense, target_macs]``.

    preference[g]: (group.size,) how much the method wants each channel of group g kept (>= 0; S2H: its
    soft keep-probabilities times the channels' importance); keeping k channels is worth the log of the
    share of the group's preference its k largest hold (``_log_share``). Steps go through
    ``fit_levels`` over ``width_levels``, so they keep the channel step and the floors (a count below its
    floor is raised to it first). Counts already in the band (and above their floors) come back unchanged.
    """
    levels = width_levels(graph, counts, min_channels, round_to, min_share)
    worth = [_log_share(p) for p in preference]

    def macs_of(states: list[list[int]]) -> list[float]:
        keep = torch.tensor([[lv[s] for lv, s in zip(levels, st, strict=True)] for st in states])
        return torch.vmap(graph.cost.layer_macs)(keep.double()).sum(1).tolist()

    at = [lv.index(max(lv[0], min(lv[-1], int(k)))) for lv, k in zip(levels, counts, strict=True)]
    low = target_macs - band * graph.dense_macs
    at, _ = fit_levels(
        at,
        [len(lv) for lv in levels],
        lambda g, s: float(worth[g][levels[g][s]]),
        macs_of,
        low,
        target_macs,
    )
    return [lv[s] for lv, s in zip(levels, at, strict=True)]
