"""Wall-clock inference latency on one device, in milliseconds per forward of a whole batch.

``measure_latency`` times one model (the benchmarks' per-model figure). ``compare_latency`` is what a
job reports: a dense and a pruned network timed alternately in one process, at fixed threads, with a
median and a 95 % interval for each and for the speed-up, so noise is shown as noise.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

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
    with _placed(model, device) as dtype:
        times = _time_forwards(model, shape, device, dtype, warmup, iters, max_seconds)
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
    sync = synchronizer(device)
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


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits until ``device`` has finished its queued work (nothing on the CPU)."""
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


# --- dense vs pruned, timed alternately ---

Clock = Callable[[nn.Module, torch.Tensor, int], float]
"""Seconds that ``n`` forwards of a module on a batch take (the default runs them; tests inject one)."""

CONFIDENCE = 0.95  # coverage of every interval below
MIN_ROUNDS = 6  # the fewest paired rounds whose order-statistic interval reaches 95 % (1 - 2 / 2**6)
FLOOR_ROUNDS = 3  # never fewer, even past twice the budget
# A speed-up interval must clear 1 by this much to count: a floor of practical relevance (a 2 % gain
# helps no one, and memory placement alone can shift that much), not a measured constant.
NOISE_FLOOR = 0.02
Verdict = Literal["faster", "slower", "no measurable gain"]


@dataclass(frozen=True)
class Estimate:
    """Median of repeated measurements and its distribution-free interval (order statistics) of
    coverage ``confidence`` (0..1); units are the caller's (ms per forward, or a ratio)."""

    median: float
    low: float
    high: float
    confidence: float


@dataclass(frozen=True)
class BatchTiming:
    """Dense vs pruned at one batch size: ms per forward of the whole batch, and the speed-up (dense /
    pruned, > 1 is faster) from the paired rounds. ``forwards`` is each block's count per round,
    (dense, pruned). ``verdict``: see ``verdict``."""

    batch_size: int
    dense_ms: Estimate
    pruned_ms: Estimate
    speedup: Estimate
    rounds: int
    forwards: tuple[int, int]
    verdict: Verdict


@dataclass(frozen=True)
class LatencyComparison:
    """Everything one ``compare_latency`` call measured, and the conditions it measured under.

    ``threads``: torch's intra-op threads during the timing; ``cpus``: cores this process may use;
    ``load_1min``: the larger 1-minute load average of before and after; ``busy``: it exceeded ``cpus``
    (other work competed for the cores). ``budget_s`` was asked for, ``wall_s`` spent. A verdict
    needs the speed-up's interval to clear 1 by ``noise_floor``.
    """

    device: str
    threads: int
    cpus: int
    load_1min: float | None
    busy: bool
    budget_s: float
    wall_s: float
    batches: tuple[BatchTiming, ...]
    noise_floor: float = NOISE_FLOOR
    memory_format: str = "contiguous"  # "channels_last": inputs and weights in NHWC
    folded: bool = False  # set by a caller that timed BatchNorm-folded networks
    amp: bool = False  # forwards under fp16 autocast (CUDA)
    threads_picked: bool = False  # ``threads`` measured by ``pick_threads``, not given
    implausible: str | None = (
        None  # why the throughput batch's speed-up is not to be believed (a caller's check)
    )


def compare_latency(
    dense: nn.Module,
    pruned: nn.Module,
    sample_shape: tuple[int, ...],
    device: torch.device | str,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    threads: int | None = None,
    max_seconds: float = 20.0,
    rounds: int = 30,
    block_s: float = 0.005,
    warmup_s: float | None = None,
    clock: Clock | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    amp: bool = False,
) -> LatencyComparison:
    """Time ``dense`` and ``pruned`` on random batches of ``sample_shape`` (C x H x W) per batch size.

    Both are warmed up, then timed in paired rounds that alternate which goes first (ABBA), so drift and
    other load hit both alike; each round times a block of forwards of each (about ``block_s`` seconds,
    at least one). ``max_seconds`` bounds the whole call, split evenly between batch sizes; at least
    ``MIN_ROUNDS`` rounds run unless that takes twice the budget (then ``FLOOR_ROUNDS``). ``threads``
    (default: torch's current setting) is set for the timing and restored; so are each model's device
    and mode. ``warmup_s``: seconds of warm-up per batch size (default: 5 % of its share, at most
    0.25 s); at least 3 forwards of each run regardless. ``memory_format``: of the batches and the
    models' weights during the timing (``inference.memory_format``); ``amp``: forwards under fp16
    autocast (CUDA only).
    """
    if rounds < 1 or max_seconds < 0 or block_s <= 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("need rounds >= 1, max_seconds >= 0, block_s > 0 and positive batch sizes")
    if warmup_s is not None and warmup_s < 0:
        raise ValueError("need warmup_s >= 0")
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    clock = clock or _block_clock(device)
    load_before = _load()
    start = time.perf_counter()
    share = max_seconds / len(batch_sizes)
    saved_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")
        with (
            _placed(dense, device, memory_format) as d_dtype,
            _placed(pruned, device, memory_format),
            autocast,
        ):
            batches = tuple(
                _time_pair(
                    (dense, pruned),
                    _batch((b, *sample_shape), device, d_dtype).contiguous(memory_format=memory_format),
                    share,
                    rounds,
                    block_s,
                    min(0.25, 0.05 * share) if warmup_s is None else warmup_s,
                    clock,
                )
                for b in batch_sizes
            )
    finally:
        torch.set_num_threads(saved_threads)
    loads = [v for v in (load_before, _load()) if v is not None]
    cpus = _cpus()
    return LatencyComparison(
        device=str(device),
        threads=threads,
        cpus=cpus,
        load_1min=max(loads) if loads else None,
        busy=bool(loads) and max(loads) > cpus,
        budget_s=max_seconds,
        wall_s=time.perf_counter() - start,
        batches=batches,
        memory_format="channels_last" if memory_format == torch.channels_last else "contiguous",
        amp=amp and device.type == "cuda",
    )


PICK_S = 0.5  # seconds pick_threads may spend (each candidate gets its share)
PLAUSIBLE_FACTOR = 1.5  # a speed-up beyond MAC-implied x this, or a slow-down beyond it, is implausible


def pick_threads(
    model: nn.Module,
    sample_shape: tuple[int, ...],
    *,
    candidates: Sequence[int] | None = None,
    seconds: float = PICK_S,
    clock: Clock | None = None,
) -> int:
    """The CPU thread count, of ``candidates`` (default: 1 and torch's current threads), at which
    ``model`` runs a batch-1 forward fastest on this machine now (the least of a few timed forwards each,
    candidates interleaved). On a machine whose cores are busy, more threads than free cores make every
    forward wait for the slowest thread: a 1 ms network timed at 300 ms. Threads are restored after."""
    options = sorted(set(candidates or (1, torch.get_num_threads())))
    if len(options) == 1:
        return options[0]
    device = torch.device("cpu")
    clock = clock or _block_clock(device)
    saved = torch.get_num_threads()
    best = dict.fromkeys(options, math.inf)
    deadline = time.perf_counter() + seconds
    try:
        with _placed(model, device) as dtype, torch.inference_mode():
            x = _batch((1, *sample_shape), device, dtype)
            for n in options:  # warm up at each count (thread pools start lazily)
                torch.set_num_threads(n)
                clock(model, x, 1)
            rounds = 0
            while rounds < FLOOR_ROUNDS or (time.perf_counter() < deadline and rounds < MIN_ROUNDS):
                for n in options:
                    torch.set_num_threads(n)
                    best[n] = min(best[n], clock(model, x, 1))
                rounds += 1
    finally:
        torch.set_num_threads(saved)
    return min(options, key=lambda n: (best[n], n))


def implausible(speedup: float, macs_speedup: float, factor: float = PLAUSIBLE_FACTOR) -> str | None:
    """Why a measured speed-up cannot be taken at face value, or None. Removing channels cannot make a
    network much faster than the arithmetic it removed (``macs_speedup``: dense MACs / pruned MACs), nor
    much slower than the dense one: either means the timing measured something else (other load, a
    clock or thread artefact)."""
    if speedup > factor * macs_speedup:
        return f"measured x{speedup:.2f} is more than {factor:g} times the MAC count's x{macs_speedup:.2f}"
    if speedup * factor < 1.0:
        return f"the pruned network measured {1 / speedup:.2f}x slower than the dense one with fewer MACs"
    return None


@torch.inference_mode()
def _time_pair(
    nets: tuple[nn.Module, nn.Module],
    x: torch.Tensor,
    seconds: float,
    rounds: int,
    block_s: float,
    warmup_s: float,
    clock: Clock,
) -> BatchTiming:
    """Warm up, size the blocks, then time ``rounds`` paired rounds within ``seconds`` (see above)."""
    t0 = time.perf_counter()
    per_forward = _warm_up(nets, x, warmup_s, clock)  # seconds per forward, (dense, pruned)
    # Blocks as long as block_s, but short enough for `rounds` rounds in what is left of the share.
    left = max(0.0, seconds - (time.perf_counter() - t0))
    block = min(block_s, left / (2 * rounds)) if left else 0.0
    forwards = (max(1, int(block / per_forward[0])), max(1, int(block / per_forward[1])))
    deadline, hard = t0 + seconds, t0 + 2 * seconds
    times: list[tuple[float, float]] = []  # ms per forward, (dense, pruned)
    while len(times) < rounds:
        order = (0, 1) if len(times) % 2 == 0 else (1, 0)
        ms = [0.0, 0.0]
        for i in order:
            ms[i] = clock(nets[i], x, forwards[i]) / forwards[i] * 1e3
        times.append((ms[0], ms[1]))
        now = time.perf_counter()
        if (now > deadline and len(times) >= MIN_ROUNDS) or (now > hard and len(times) >= FLOOR_ROUNDS):
            break
    dense_ms = median_interval([d for d, _ in times])
    pruned_ms = median_interval([p for _, p in times])
    speedup = median_interval([d / p for d, p in times])
    return BatchTiming(
        batch_size=x.shape[0],
        dense_ms=dense_ms,
        pruned_ms=pruned_ms,
        speedup=speedup,
        rounds=len(times),
        forwards=forwards,
        verdict=verdict(speedup),
    )


def _warm_up(
    nets: tuple[nn.Module, nn.Module], x: torch.Tensor, seconds: float, clock: Clock
) -> tuple[float, float]:
    """Alternate single forwards for ``seconds`` (at least 3 each); the seconds per forward of each,
    from the faster half of the warm-up (its first forwards pay for allocation and lazy init)."""
    seen: tuple[list[float], list[float]] = ([], [])
    end = time.perf_counter() + seconds
    while len(seen[0]) < 3 or time.perf_counter() < end:
        for i in (0, 1):
            seen[i].append(clock(nets[i], x, 1))
    d, p = (sorted(s)[: max(1, len(s) // 2)] for s in seen)
    return max(d[-1], 1e-9), max(p[-1], 1e-9)


def verdict(speedup: Estimate) -> Verdict:
    """ "faster" when the paired speed-up's interval lies above ``1 + NOISE_FLOOR`` at ``CONFIDENCE``,
    "slower" when it lies below ``1 - NOISE_FLOOR``, else "no measurable gain".

    Judged on the paired rounds, not on whether the two networks' own intervals overlap: load that
    drifts during the timing widens both of those alike, and the pairing is what removes it.
    """
    if speedup.confidence < CONFIDENCE:
        return "no measurable gain"
    if speedup.low > 1 + NOISE_FLOOR:
        return "faster"
    if speedup.high < 1 - NOISE_FLOOR:
        return "slower"
    return "no measurable gain"


def median_interval(values: Sequence[float], level: float = CONFIDENCE) -> Estimate:
    """Median and the narrowest order-statistic interval [x(k), x(n+1-k)] covering the true median
    with probability >= ``level`` (binomial, no distribution assumed); with too few values for
    ``level``, the range [min, max] and its lower coverage ``1 - 2 / 2**n``."""
    xs = sorted(values)
    n = len(xs)
    if not n:
        raise ValueError("no values")

    def coverage(k: int) -> float:  # P(x(k) <= median <= x(n+1-k)) = 1 - 2 P(Binomial(n, 1/2) < k)
        return 1.0 - 2.0 * sum(math.comb(n, j) for j in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return Estimate(median=_percentile(xs, 0.5), low=xs[k - 1], high=xs[n - k], confidence=coverage(k))


def _block_clock(device: torch.device) -> Clock:
    sync = synchronizer(device)

    def clock(model: nn.Module, x: torch.Tensor, n: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(n):
            model(x)
        sync()
        return time.perf_counter() - start

    return clock


@contextmanager
def _placed(
    model: nn.Module, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
) -> Iterator[torch.dtype]:
    """``model`` on ``device`` (in ``memory_format``) in eval mode for the block (yields its floating
    dtype); then back."""
    first = next((t for t in (*model.parameters(), *model.buffers())), None)
    home = first.device if first is not None else device
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.to(device=device, memory_format=memory_format).eval()
        yield dtype
    finally:
        model.to(device=home, memory_format=torch.contiguous_format).train(was_training)


def _batch(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)  # the same inputs every time: no data-dependent variation
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
