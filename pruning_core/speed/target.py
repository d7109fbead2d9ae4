"""A measured speed-up as the job's target (``target.speedup``), turned into a MAC target on the job's
device before any training.

MACs are a poor proxy for time (BENCHMARKS.md "speed-cuda": half the MACs gave 1.08-1.59x on an H200),
so the runner asks the device. Candidate prunings of the dense network are made by the engine's global
allocator (``budget.select_by_rates`` on magnitude scores, in the job's channel step and allocation),
physically pruned and timed against the dense network as the report times them
(``latency.compare_latency``: paired rounds, BatchNorm folded, the device's memory format, at the job's
throughput batch). The remaining-MAC ratio is bisected to the largest one whose median measured speed-up
reaches the request; the method then runs to that ratio like any ``target.macs_ratio``, and the report
gives the requested and the achieved measured speed-up.

The search is written to the job's directory, so a resumed job prunes to the same ratio instead of
timing again (timings are noisy, the choice must not move under a checkpoint).

``check_allocation`` asks the device the same way whether ``target.allocation: latency`` pays: the
network pruned by the rates against the network pruned by MACs, same weights, same MAC target. The
job keeps the rates only where they measure faster (also written to the job's directory).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..artifacts.inference import memory_format, prepare_for_inference
from ..errors import TargetError
from ..graph.budget import min_macs, select_by_rates
from ..graph.groups import PruningGraph
from ..graph.importance import magnitude
from ..graph.surgery import remove_channels
from ..training.engine import reuse_or_make
from .latency import BatchTiming, Clock, compare_latency

FILE = "speed-target.json"
BISECTIONS = 5  # after the floor probe: the ratio to within (1 - floor) / 32
CLOCK: Clock | None = None  # tests inject a deterministic clock here (``latency.Clock``)


@dataclass(frozen=True)
class SpeedProbe:
    """One candidate: the remaining-MAC ratio asked of the allocator, the ratio it reached, and the
    measured speed-up (median and interval, dense / pruned time at the throughput batch)."""

    macs_ratio: float
    achieved_macs_ratio: float
    speedup: float
    speedup_low: float
    speedup_high: float


@dataclass(frozen=True)
class SpeedSearch:
    """The request (``requested`` x at ``batch_size`` on ``device``) and the MAC ratio chosen for it:
    the largest probed ratio whose median speed-up reached the request. ``probes`` in the order timed."""

    requested: float
    batch_size: int
    device: str
    macs_ratio: float
    probes: tuple[SpeedProbe, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SpeedSearch:
        raw = json.loads(text)
        return cls(**{**raw, "probes": tuple(SpeedProbe(**p) for p in raw["probes"])})


Prober = Callable[[float], SpeedProbe]


@dataclass(frozen=True)
class PrunedCopy:
    """A physically pruned copy of a network in its inference form (BatchNorm folded, on the CPU), the
    width it keeps in each group of the dense graph, and its MACs / the dense network's."""

    net: nn.Module
    widths: tuple[int, ...]
    macs_ratio: float


def time_pair(
    first: nn.Module,
    second: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    batch_size: int,
    seconds: float,
    amp: bool,
) -> BatchTiming:
    """``first``'s time over ``second``'s (``speedup``) at ``batch_size`` on ``device``, as the report
    times dense against pruned (``latency.compare_latency``: paired rounds, the device's memory format);
    ``CLOCK`` instead of the device in tests."""
    return compare_latency(
        first,
        second,
        tuple(example.shape[1:]),
        device,
        batch_sizes=(batch_size,),
        max_seconds=seconds,
        memory_format=memory_format(device),
        amp=amp,
        clock=CLOCK,
    ).batches[0]


def pruned_copy(
    model: nn.Module,
    example: torch.Tensor,
    num_classes: int,
    macs_ratio: float,
    latency_rates: list[float] | None,
    round_to: int,
    min_channels: int = 1,
    graph_timeout_s: float | None = None,
    min_share: float = 0.0,
) -> PrunedCopy:
    """``model`` (left unchanged) pruned to ``macs_ratio`` of its MACs as a job with these settings
    prunes it: the global allocator (``budget.select_by_rates``) on magnitude scores of its weights."""
    graph = PruningGraph(copy.deepcopy(model).cpu().eval(), example, num_classes, graph_timeout_s)
    keep = select_by_rates(
        graph,
        magnitude(graph),
        latency_rates,
        int(macs_ratio * graph.dense_macs),
        min_channels=min_channels,
        round_to=round_to,
        min_share=min_share,
    )
    widths = tuple(len(k) for k in keep)
    achieved = graph.cost.macs(list(widths)) / graph.dense_macs
    return PrunedCopy(prepare_for_inference(remove_channels(graph, keep), "cpu"), widths, float(achieved))


def bisect_ratio(requested: float, floor: float, probe: Prober, steps: int = BISECTIONS) -> list[SpeedProbe]:
    """Probes, floor first, of a bisection for the largest remaining-MAC ratio in [floor, 1) whose
    measured speed-up reaches ``requested``. Raises ``TargetError`` when even the floor does not."""
    first = probe(floor)
    probes = [first]
    if first.speedup < requested:
        raise TargetError(
            f"target speedup {requested:g}x is unreachable on this device: pruning to the fewest MACs the "
            f"model allows ({first.achieved_macs_ratio:.3f} of them) measured {first.speedup:.2f}x "
            f"[{first.speedup_low:.2f}, {first.speedup_high:.2f}]"
        )
    lo, hi = floor, 1.0  # invariant: lo reaches the request, hi (the dense network) does not
    for _ in range(steps):
        mid = (lo + hi) / 2
        p = probe(mid)
        probes.append(p)
        lo, hi = (mid, hi) if p.speedup >= requested else (lo, mid)
    return probes


def chosen_ratio(requested: float, probes: list[SpeedProbe]) -> float:
    """The largest probed ratio whose median speed-up reached ``requested``."""
    return max(p.macs_ratio for p in probes if p.speedup >= requested)


def search(
    model: nn.Module,
    example: torch.Tensor,
    num_classes: int,
    requested: float,
    device: torch.device,
    *,
    batch_size: int,
    round_to: int,
    min_channels: int = 1,
    seconds: float = 30.0,
    amp: bool = False,
    graph_timeout_s: float | None = None,
    graph: PruningGraph | None = None,
    latency_rates: list[float] | None = None,
    min_share: float = 0.0,
) -> SpeedSearch:
    """Bisect the remaining-MAC ratio of ``model`` (left unchanged) for ``requested`` measured speed-up
    at ``batch_size`` on ``device`` (see the module's docstring); ``seconds`` bounds the timing.
    ``graph``: the dense model's graph where the caller has one (it gives the floor), else built here.
    ``latency_rates``: the job's latency allocation (``layer_times.latency_rates``), which the candidates
    then follow as the method will."""
    if graph is None:
        graph = PruningGraph(copy.deepcopy(model).cpu().eval(), example, num_classes, graph_timeout_s)
    # a hair above the floor: the allocator's own rounding must still fit under it
    floor = min(1.0, min_macs(graph, min_channels, round_to, min_share) / graph.dense_macs + 1e-6)
    dense = prepare_for_inference(model, "cpu")
    share = seconds / (BISECTIONS + 1)

    def probe(ratio: float) -> SpeedProbe:
        pruned = pruned_copy(
            model,
            example,
            num_classes,
            ratio,
            latency_rates,
            round_to,
            min_channels,
            graph_timeout_s,
            min_share,
        )
        timing = time_pair(dense, pruned.net, example, device, batch_size, share, amp)
        return SpeedProbe(
            macs_ratio=ratio,
            achieved_macs_ratio=pruned.macs_ratio,
            speedup=timing.speedup.median,
            speedup_low=timing.speedup.low,
            speedup_high=timing.speedup.high,
        )

    probes = bisect_ratio(requested, floor, probe)
    return SpeedSearch(
        requested=requested,
        batch_size=batch_size,
        device=str(device),
        macs_ratio=chosen_ratio(requested, probes),
        probes=tuple(probes),
    )


def load_or_search(workdir: Path, requested: float, run_search: Callable[[], SpeedSearch]) -> SpeedSearch:
    """The search a previous attempt of this job wrote to ``workdir`` (for the same request), else a
    new one, written there before it is used."""
    return reuse_or_make(
        workdir / FILE,
        SpeedSearch.from_json,
        run_search,
        SpeedSearch.to_json,
        fits=lambda done: done.requested == requested,
    )


# --- the latency allocation, checked on the device ---

ALLOCATION_FILE = "allocation-check.json"
ALLOCATION_CHECK_S = 10.0  # seconds of paired timing at most (bounded too by ``export.latency_max_s``)


@dataclass(frozen=True)
class AllocationCheck:
    """The latency allocation timed against the MAC allocation of the same weights and MAC target on the
    job's device. ``speedup``: the MAC-allocated network's time / the latency-allocated one's at
    ``batch_size`` (median of paired rounds, 95% interval; 1 and no timing when both allocations keep
    the same widths). ``chosen``: ``latency`` when it kept those widths or was measurably faster
    (``latency.verdict``), else ``macs``."""

    macs_ratio: float
    batch_size: int
    device: str
    speedup: float
    speedup_low: float
    speedup_high: float
    chosen: Literal["latency", "macs"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> AllocationCheck:
        return cls(**json.loads(text))


def check_allocation(
    model: nn.Module,
    example: torch.Tensor,
    num_classes: int,
    latency_rates: list[float],
    macs_ratio: float,
    device: torch.device,
    *,
    batch_size: int,
    round_to: int,
    min_channels: int = 1,
    seconds: float = ALLOCATION_CHECK_S,
    amp: bool = False,
    graph_timeout_s: float | None = None,
    min_share: float = 0.0,
) -> AllocationCheck:
    """Prune copies of ``model`` (left unchanged) both ways and time them against each other.

    The rates (``layer_times.latency_rates``) model time as linear in MACs per group. On a GPU it is
    not: narrow early layers stay bound by memory and by the tile sizes of the kernels. So the latency
    allocation can lose to the MAC allocation. A trained ResNet-18 at 224 px on an H200 at 0.3 of the
    MACs ran 1.52x against 1.74x (BENCHMARKS.md "allocation-cuda"). The job keeps it only where it
    measures faster."""
    floor = (round_to, min_channels, graph_timeout_s, min_share)
    by_macs = pruned_copy(model, example, num_classes, macs_ratio, None, *floor)
    by_rates = pruned_copy(model, example, num_classes, macs_ratio, latency_rates, *floor)
    if by_macs.widths == by_rates.widths:
        return AllocationCheck(macs_ratio, batch_size, str(device), 1.0, 1.0, 1.0, "latency")
    timing = time_pair(by_macs.net, by_rates.net, example, device, batch_size, seconds, amp)
    return AllocationCheck(
        macs_ratio=macs_ratio,
        batch_size=batch_size,
        device=str(device),
        speedup=timing.speedup.median,
        speedup_low=timing.speedup.low,
        speedup_high=timing.speedup.high,
        chosen="latency" if timing.verdict == "faster" else "macs",
    )


def load_or_check(
    workdir: Path, macs_ratio: float, run_check: Callable[[], AllocationCheck]
) -> AllocationCheck:
    """The check a previous attempt of this job wrote to ``workdir`` (for the same MAC target), else a
    new one, written there before it is used."""
    return reuse_or_make(
        workdir / ALLOCATION_FILE,
        AllocationCheck.from_json,
        run_check,
        AllocationCheck.to_json,
        fits=lambda done: done.macs_ratio == macs_ratio,
    )
