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
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .budget import min_macs, select_by_rates
from .engine import reuse_or_make
from .errors import TargetError
from .groups import PruningGraph
from .importance import magnitude
from .inference import memory_format, prepare_for_inference
from .latency import Clock, compare_latency
from .surgery import remove_channels

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
) -> SpeedSearch:
    """Bisect the remaining-MAC ratio of ``model`` (left unchanged) for ``requested`` measured speed-up
    at ``batch_size`` on ``device`` (see the module's docstring); ``seconds`` bounds the timing.
    ``graph``: the dense model's graph where the caller has one (it gives the floor), else built here.
    ``latency_rates``: the job's latency allocation (``layer_times.latency_rates``), which the candidates
    then follow as the method will."""
    if graph is None:
        graph = PruningGraph(copy.deepcopy(model).cpu().eval(), example, num_classes, graph_timeout_s)
    # a hair above the floor: the allocator's own rounding must still fit under it
    floor = min(1.0, min_macs(graph, min_channels, round_to) / graph.dense_macs + 1e-6)
    dense = prepare_for_inference(model, "cpu")
    share = seconds / (BISECTIONS + 1)

    def probe(ratio: float) -> SpeedProbe:
        pruned_graph = PruningGraph(copy.deepcopy(model).cpu().eval(), example, num_classes, graph_timeout_s)
        keep = select_by_rates(
            pruned_graph,
            magnitude(pruned_graph),
            latency_rates,
            int(ratio * pruned_graph.dense_macs),
            min_channels=min_channels,
            round_to=round_to,
        )
        achieved = pruned_graph.cost.macs([len(k) for k in keep]) / pruned_graph.dense_macs
        pruned = prepare_for_inference(remove_channels(pruned_graph, keep), "cpu")
        timing = compare_latency(
            dense,
            pruned,
            tuple(example.shape[1:]),
            device,
            batch_sizes=(batch_size,),
            max_seconds=share,
            memory_format=memory_format(device),
            amp=amp,
            clock=CLOCK,
        ).batches[0]
        return SpeedProbe(
            macs_ratio=ratio,
            achieved_macs_ratio=float(achieved),
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
