"""Wall-clock inference latency of a model on one device, in milliseconds per batch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MIN_TIMED_ITERS = 3


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one forward pass of a whole batch, in milliseconds.

    ``iters`` is the number of timed forwards actually run (fewer than asked when ``max_seconds``
    ran out); ``device`` is the torch device string, e.g. ``cpu`` or ``cuda:0``.
    """

    p50_ms: float
    p90_ms: float
    mean_ms: float
    iters: int
    batch_size: int
    device: str


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device | str,
    *,
    warmup: int = 5,
    iters: int = 30,
    max_seconds: float = 10.0,
) -> LatencyStats:
    """Time ``model`` on a random batch shaped ``input_shape`` (N x C x H x W) on ``device``.

    Runs under ``torch.inference_mode`` in eval mode, synchronising CUDA around every timed forward.
    ``max_seconds`` bounds warm-up plus timing; at least ``min(3, iters)`` forwards are timed even when
    it runs out. The model is moved to ``device`` if needed, and its device and mode are restored.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be positive sizes with the batch first, got {input_shape}")
    if iters < 1 or warmup < 0 or max_seconds < 0:
        raise ValueError("need iters >= 1, warmup >= 0 and max_seconds >= 0")
    device = torch.device(device)
    first = next((t for t in (*model.parameters(), *model.buffers())), None)
    home = first.device if first is not None else device
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.to(device).eval()
        times = _time_forwards(model, shape, device, dtype, warmup, iters, max_seconds)
    finally:
        model.to(home).train(was_training)
    times.sort()
    return LatencyStats(
        p50_ms=_percentile(times, 0.5),
        p90_ms=_percentile(times, 0.9),
        mean_ms=math.fsum(times) / len(times),
        iters=len(times),
        batch_size=shape[0],
        device=str(device),
    )


@torch.inference_mode()
def _time_forwards(
    model: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    iters: int,
    max_seconds: float,
) -> list[float]:
    """Milliseconds of each timed forward (unsorted)."""
    x = torch.randn(shape, device=device, dtype=dtype)
    sync = _synchronizer(device)
    deadline = time.perf_counter() + max_seconds
    for _ in range(warmup):
        model(x)
        if time.perf_counter() > deadline:
            break
    sync()
    min_iters = min(MIN_TIMED_ITERS, iters)
    times: list[float] = []
    while len(times) < iters:
        start = time.perf_counter()
        model(x)
        sync()
        end = time.perf_counter()
        times.append((end - start) * 1e3)
        if end > deadline and len(times) >= min_iters:
            break
    return times


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linearly interpolated ``q``-quantile (0..1) of an ascending, non-empty list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
