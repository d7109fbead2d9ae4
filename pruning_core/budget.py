"""Turning channel scores into keep decisions that meet a MAC budget.

The one global allocator: every channel of every group is ranked by its score, and the keep threshold
is bisected until the MACs predicted by the graph's cost model fit the budget. Used by the magnitude
baseline and by any method that needs "what would pruning to the target keep now" (EPI).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import TargetError
from .groups import PruningGraph, top_channels


def min_macs(graph: PruningGraph, min_channels: int = 1) -> int:
    """The fewest MACs the graph can reach: every group at its minimum width."""
    return int(graph.cost.macs(graph.min_keep(min_channels)))


def check_reachable(graph: PruningGraph, macs_ratio: float, min_channels: int = 1) -> None:
    """Refuse, before any training, a target below what removing channels can reach."""
    floor = min_macs(graph, min_channels) / graph.dense_macs
    if macs_ratio < floor:
        raise TargetError(
            f"target macs_ratio {macs_ratio:g} is unreachable: this model keeps at least {floor:.3f} of its "
            f"MACs (layers that cannot be pruned, {min_channels} channel(s) per group minimum)"
        )


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
) -> list[torch.Tensor]:
    """Keep indices per group: the highest-scoring channels globally, as many as fit ``target_macs``.

    scores[g]: (group.size,) comparable across groups (normalise them first). Returns the largest keep
    set whose predicted MACs are <= target_macs. Counts are multiples of ``round_to`` (and of a group's
    channel grouping) where the group is large enough.
    """
    floor = graph.min_keep(min_channels)
    step = [g.ch_groups if g.ch_groups > 1 else (round_to if g.size >= round_to else 1) for g in graph.groups]
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
    counts = _counts(scores, threshold, floor, step)
    return [top_channels(g, s, k) for g, s, k in zip(graph.groups, scores, counts, strict=True)]
