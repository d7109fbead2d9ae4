"""Where a network's time goes, per conv/linear layer, measured on the device, and the latency-aware
weighting of channel scores that follows from it (``target.allocation: latency``).

MACs are a poor proxy for time, and unevenly so (BENCHMARKS.md "speed-cpu-idle"): a 1x1 convolution at
112 px with 16 input channels is bound by memory, not arithmetic, and the pooling and activations after a
layer scale with its output width, not with its MACs. Pruning to a MAC budget with scores alone removes
channels where they save little time.

``measure_layer_times`` runs the dense network (inference form: BatchNorm folded, the device's memory
format) with hooks on every leaf module and splits each forward into per-layer shares: a conv/linear
layer's own time (``conv_s``) and the time of everything after it until the next conv/linear layer starts
(``rest_s``: activation, pooling, residual additions). ``TimeModel`` predicts the time of any keep counts
from those shares: a layer's own time scales with its MACs, its rest with its output width.

``latency_rates`` gives each group the MACs its channels cost per second they cost, relative to the whole
network (1 where time is proportional to MACs). The allocation (``budget.select_by_rates``) starts from
the MAC allocation, divides each group's pruned share by its rate and rescales the shares to the MAC
budget: groups whose channels cost more time than their MACs suggest are pruned more, in proportion,
and the network lands at the same MACs and runs faster. With time proportional to MACs the rates are
all 1 and the allocation is the MAC allocation. Time is not linear in MACs on a GPU (narrow layers stay
bound by memory and kernel tiles), so a job keeps the rates only where the network they give measures
faster than the MAC allocation's (``speed_target.check_allocation``).

An earlier form weighed the scores themselves by the rates before the one global threshold. Scores are
mean-normalised per group, so their spread is narrow and rates between 0.9 and 1.5 moved whole groups
(a trained CIFAR ResNet-20 at 0.35 of the MACs: one group from 64 channels to 8, the first stage to 4;
7.6 points of top-1 lost for 14 % more speed, and less accurate than the MAC allocation at 0.25 of the
MACs, which is faster still; BENCHMARKS.md). Moving shares in proportion keeps each group near what its
scores chose; it gains less speed where the rates are near 1 (the ResNets).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..artifacts.inference import prepare_for_inference, to_inference_input
from ..graph.groups import CostModel, PruningGraph
from ..graph.macs import COUNTED
from ..training.engine import reuse_or_make
from .latency import synchronizer

FILE = "layer-times.json"
# A group's rate is clipped to [1/RATE_CLIP, RATE_CLIP]: one mis-timed layer must not decide a group alone.
RATE_CLIP = 8.0


@dataclass(frozen=True)
class LayerTimes:
    """Median seconds per forward of each conv/linear layer (``names``: ``CostModel.layer_names``) at
    ``batch_size``: its own (``conv_s``) and what runs after it until the next one (``rest_s``)."""

    names: tuple[str, ...]
    conv_s: tuple[float, ...]
    rest_s: tuple[float, ...]
    batch_size: int
    device: str

    @property
    def total_s(self) -> float:
        return sum(self.conv_s) + sum(self.rest_s)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LayerTimes:
        raw = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def load_or_measure(workdir: Path, measure: Callable[[], LayerTimes]) -> LayerTimes:
    """The layer times a previous attempt of this job wrote to ``workdir``, else new ones, written there
    before use: timings are noisy, and a resumed job must allocate as its first attempt did."""
    return reuse_or_make(workdir / FILE, LayerTimes.from_json, measure, LayerTimes.to_json)


@torch.no_grad()
def measure_layer_times(
    model: nn.Module,
    sample_shape: Sequence[int],
    layer_names: Sequence[str],
    device: torch.device | str,
    *,
    batch_size: int = 8,
    repeats: int = 7,
    amp: bool = False,
) -> LayerTimes:
    """Per-layer shares of ``model``'s forward time (``model`` itself is not changed).

    ``sample_shape``: one input without the batch dimension (C, H, W); ``layer_names``: the layers to
    report, as ``CostModel.layer_names`` names them (a module called twice is ``name#1`` the second time).
    The model runs in its inference form on ``device``; on CUDA each hook synchronises, which adds launch
    latency to every layer alike. ``amp``: under fp16 autocast on CUDA, as the job's inference is timed.
    Time before the first layer is left out (it is not prunable).
    """
    device = torch.device(device)
    ready = prepare_for_inference(model, device)
    x = to_inference_input(torch.randn(batch_size, *sample_shape), device)
    names = {m: n for n, m in ready.named_modules()}
    counted = {m for m in ready.modules() if isinstance(m, COUNTED)}
    sync = synchronizer(device)
    events: list[tuple[float, nn.Module, bool]] = []  # (time, module, is_start)

    def pre(m: nn.Module, _inp) -> None:
        sync()
        events.append((time.perf_counter(), m, True))

    def post(m: nn.Module, _inp, _out) -> None:
        sync()
        events.append((time.perf_counter(), m, False))

    leaves = [m for m in ready.modules() if not list(m.children())]
    handles = [m.register_forward_pre_hook(pre) for m in leaves] + [
        m.register_forward_hook(post) for m in leaves
    ]
    keys = _call_keys(layer_names)
    conv: dict[str, list[float]] = {k: [] for k in keys}
    rest: dict[str, list[float]] = {k: [] for k in keys}
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")
    try:
        with autocast:
            ready(x)  # warm-up: allocator, oneDNN primitives, cuDNN plans
            ready(x)
            for _ in range(repeats):
                events.clear()
                ready(x)
                sync()
                own, after = _split(events, time.perf_counter(), names, counted)
                for k in keys:
                    conv[k].append(own.get(k, 0.0))
                    rest[k].append(after.get(k, 0.0))
    finally:
        for h in handles:
            h.remove()
    return LayerTimes(
        names=tuple(layer_names),
        conv_s=tuple(statistics.median(conv[k]) for k in keys),
        rest_s=tuple(statistics.median(rest[k]) for k in keys),
        batch_size=batch_size,
        device=str(device),
    )


def _call_keys(layer_names: Sequence[str]) -> list[str]:
    """``name``, ``name#1``, ... : one key per call of a layer (``CostModel`` lists a shared layer once
    per call, under its module name)."""
    seen: dict[str, int] = {}
    keys = []
    for n in layer_names:
        i = seen.get(n, 0)
        seen[n] = i + 1
        keys.append(n if i == 0 else f"{n}#{i}")
    return keys


def _split(
    events: list[tuple[float, nn.Module, bool]],
    end: float,
    names: dict[nn.Module, str],
    counted: set[nn.Module],
) -> tuple[dict[str, float], dict[str, float]]:
    """One forward's events as (own time per layer, time after each layer until the next one)."""
    own: dict[str, float] = {}
    after: dict[str, float] = {}
    calls: dict[str, int] = {}
    current: str | None = None
    last = events[0][0] if events else end
    for t, m, start in [*events, (end, None, True)]:
        span = t - last
        last = t
        if current is not None:
            if not start and m in counted:  # the end of a counted layer: its own span
                own[current] = own.get(current, 0.0) + span
            else:
                after[current] = after.get(current, 0.0) + span
        if start and m in counted:
            base = names[m]
            i = calls.get(base, 0)
            calls[base] = i + 1
            current = base if i == 0 else f"{base}#{i}"
    return own, after


class TimeModel:
    """Predicted forward time (seconds) of keep counts: each layer's own time scaled by its MACs, its
    rest by its output width, both relative to the dense network where they were measured."""

    def __init__(self, cost: CostModel, times: LayerTimes):
        if tuple(cost.layer_names) != times.names:
            raise ValueError("layer times were measured for another network")
        self.cost = cost
        dense = torch.tensor(cost.sizes, dtype=torch.float64)
        out, _ = cost.layer_widths(dense)
        macs = cost.layer_macs(dense)
        self.per_mac = torch.tensor(times.conv_s, dtype=torch.float64) / macs.clamp_min(1.0)
        self.per_out = torch.tensor(times.rest_s, dtype=torch.float64) / out.clamp_min(1.0)
        self.dense_s = times.total_s

    def seconds(self, keep: torch.Tensor) -> torch.Tensor:
        """Predicted seconds for fractional keep counts ``keep`` (G,), differentiable."""
        out, _ = self.cost.layer_widths(keep)
        return (self.per_mac.to(keep) * self.cost.layer_macs(keep) + self.per_out.to(keep) * out).sum()


def latency_rates(graph: PruningGraph, times: LayerTimes, keep: Sequence[float] | None = None) -> list[float]:
    """Per group: (MACs per channel / seconds per channel) over (dense MACs / dense seconds), at keep
    counts ``keep`` (default: dense), clipped to [1/RATE_CLIP, RATE_CLIP]. Below 1: the group's channels
    cost more time than their MACs suggest, so they go first."""
    model = TimeModel(graph.cost, times)
    at = torch.tensor(list(keep) if keep is not None else graph.full_keep(), dtype=torch.float64)
    at.requires_grad_(True)
    (d_macs,) = torch.autograd.grad(graph.cost.macs(at), at)
    (d_time,) = torch.autograd.grad(model.seconds(at), at)
    network = graph.dense_macs / max(times.total_s, 1e-12)
    rates = []
    for dm, dt in zip(d_macs.tolist(), d_time.tolist(), strict=True):
        rate = RATE_CLIP if dt <= 0 else (dm / dt) / network
        rates.append(min(RATE_CLIP, max(1.0 / RATE_CLIP, rate)))
    return rates
