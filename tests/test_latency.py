"""compare_latency: dense and pruned timed alternately, medians with intervals, a verdict that does not
call noise a gain. Speed itself is never asserted (the machine is shared): the real-clock test checks
that one network timed as both reports no gain; the rest inject a deterministic clock."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from pruning_core.speed import latency
from pruning_core.speed.latency import compare_latency, implausible, median_interval, pick_threads


def _net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    )


FAKE = {"max_seconds": 10.0, "warmup_s": 0.0}  # with a fake clock: 3 warm-up forwards, 30 rounds, no deadline


class FakeClock:
    """Seconds per forward by module (``costs``), times seeded noise; logs who ran and at what threads.
    With ``FAKE`` settings every draw, hence every result, is the same on every run."""

    def __init__(self, costs: dict[int, float], noise: float = 0.3, seed: int = 0):
        self.costs, self.noise, self.rng = costs, noise, random.Random(seed)
        self.calls: list[tuple[int, int, int]] = []  # (id(module), forwards, torch threads)

    def __call__(self, model: nn.Module, x: torch.Tensor, n: int) -> float:
        self.calls.append((id(model), n, torch.get_num_threads()))
        # mean-one noise: a block of n forwards averages them, so its mean (not median) is the cost
        mu = -(self.noise**2) / 2
        return sum(self.costs[id(model)] * self.rng.lognormvariate(mu, self.noise) for _ in range(n))


def test_median_interval_is_the_binomial_order_statistic_interval():
    six = median_interval([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])
    assert (six.median, six.low, six.high) == (3.5, 1.0, 6.0)
    assert six.confidence == pytest.approx(1 - 2 / 2**6)  # the fewest values that reach 95 %
    three = median_interval([3.0, 1.0, 2.0])
    assert (three.low, three.high) == (1.0, 3.0) and three.confidence == pytest.approx(0.75)
    thirty = median_interval([float(v) for v in range(1, 31)])
    assert (thirty.low, thirty.high) == (10.0, 21.0)  # ranks 10 and 21 of 30
    assert 0.95 <= thirty.confidence < 0.98
    with pytest.raises(ValueError):
        median_interval([])


def test_same_network_as_dense_and_pruned_is_no_gain_with_a_real_clock():
    model = _net(8)
    result = compare_latency(model, model, (3, 16, 16), "cpu", batch_sizes=(1, 4), max_seconds=1.0)
    for b in result.batches:
        assert b.verdict == "no measurable gain", b
        # MIN_ROUNDS fit the budget on an idle machine; FLOOR_ROUNDS always run (a loaded CI machine)
        assert b.rounds >= latency.FLOOR_ROUNDS and b.speedup.low <= b.speedup.median <= b.speedup.high
    assert [b.batch_size for b in result.batches] == [1, 4]
    assert result.device == "cpu" and result.threads == torch.get_num_threads() and result.cpus >= 1


def test_same_cost_contains_one_and_is_flagged():
    a, b = _net(8), _net(8)
    clock = FakeClock({id(a): 0.002, id(b): 0.002})
    result = compare_latency(a, b, (3, 8, 8), "cpu", batch_sizes=(1, 8), **FAKE, clock=clock)
    for t in result.batches:
        assert t.speedup.low < 1.0 < t.speedup.high and t.verdict == "no measurable gain"
        assert t.rounds == 30 and t.speedup.confidence >= latency.CONFIDENCE


def test_a_quarter_of_the_work_is_a_gain_whose_interval_holds_the_true_speedup():
    dense, pruned = _net(16), _net(4)
    clock = FakeClock({id(dense): 0.004, id(pruned): 0.001})
    result = compare_latency(dense, pruned, (3, 8, 8), "cpu", batch_sizes=(2,), **FAKE, clock=clock)
    (t,) = result.batches
    assert t.verdict == "faster" and 1.0 < t.speedup.low < 4.0 < t.speedup.high
    assert t.dense_ms.low < 4.0 < t.dense_ms.high and t.pruned_ms.low < 1.0 < t.pruned_ms.high
    slower = compare_latency(pruned, dense, (3, 8, 8), "cpu", batch_sizes=(2,), **FAKE, clock=clock)
    assert slower.batches[0].verdict == "slower" and slower.batches[0].speedup.high < 1.0


def test_rounds_alternate_at_the_stated_threads_and_everything_is_restored():
    dense, pruned = _net(8), _net(4)
    dense.train(), pruned.eval()
    clock = FakeClock({id(dense): 0.001, id(pruned): 0.001}, noise=0.0)
    threads = torch.get_num_threads()
    result = compare_latency(
        dense, pruned, (3, 8, 8), "cpu", batch_sizes=(1,), threads=1, **FAKE, clock=clock
    )
    assert result.threads == 1 and {c[2] for c in clock.calls} == {1}
    assert torch.get_num_threads() == threads and dense.training and not pruned.training
    assert result.batches[0].forwards == (5, 5)  # 5 ms blocks of 1 ms forwards
    timed = [c[0] for c in clock.calls if c[1] == 5]  # warm-up forwards come one at a time
    rounds = list(zip(timed[0::2], timed[1::2], strict=True))
    assert len(rounds) == 30 and all(first != second for first, second in rounds)
    assert [first for first, _ in rounds] == [id(dense), id(pruned)] * 15  # ABBA: who goes first alternates


def test_channels_last_reaches_the_batches_and_weights_and_is_undone():
    dense, pruned = _net(8), _net(4)
    seen: list[bool] = []

    def clock(model: nn.Module, x: torch.Tensor, n: int) -> float:
        w = model[0].weight
        seen.append(
            x.is_contiguous(memory_format=torch.channels_last)
            and w.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )
        return 0.001 * n

    result = compare_latency(
        dense,
        pruned,
        (3, 8, 8),
        "cpu",
        batch_sizes=(2,),
        **FAKE,
        clock=clock,
        memory_format=torch.channels_last,
    )
    assert result.memory_format == "channels_last" and not result.amp and seen and all(seen)
    assert dense[0].weight.is_contiguous() and pruned[2].weight.is_contiguous()  # back to NCHW


def test_the_budget_bounds_the_rounds():
    model = _net(4)
    result = compare_latency(model, model, (3, 8, 8), "cpu", batch_sizes=(1, 2), max_seconds=0.0)
    assert [b.rounds for b in result.batches] == [latency.FLOOR_ROUNDS] * 2
    assert all(b.verdict == "no measurable gain" for b in result.batches)  # 75 % is not enough
    assert result.budget_s == 0.0  # the floor's rounds, above: no round past it was timed


def test_busy_is_the_load_average_against_the_cores(monkeypatch):
    model = _net(4)
    clock = FakeClock({id(model): 0.001})
    cpus = latency._cpus()
    for load, busy in ((cpus + 2.0, True), (0.1, False)):
        monkeypatch.setattr(latency.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        result = compare_latency(model, model, (3, 8, 8), "cpu", batch_sizes=(1,), **FAKE, clock=clock)
        assert result.busy is busy and result.load_1min == load


def test_bad_arguments_are_refused():
    model = _net(4)
    with pytest.raises(ValueError):
        compare_latency(model, model, (3, 8, 8), "cpu", batch_sizes=())
    with pytest.raises(ValueError):
        compare_latency(model, model, (3, 8, 8), "cpu", rounds=0)


def test_pick_threads_takes_the_count_that_runs_fastest() -> None:
    """A clock that makes 2 threads slow (as on a machine whose other core is busy) picks 1; one that
    makes them fast picks 2; torch's threads are restored."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    saved = torch.get_num_threads()

    def clock_where(fast: int):
        def clock(m: nn.Module, x: torch.Tensor, n: int) -> float:
            return n * (0.001 if torch.get_num_threads() == fast else 0.3)

        return clock

    assert pick_threads(model, (3, 8, 8), candidates=(1, 2), clock=clock_where(1)) == 1
    assert pick_threads(model, (3, 8, 8), candidates=(1, 2), clock=clock_where(2)) == 2
    assert pick_threads(model, (3, 8, 8), candidates=(3,)) == 3
    assert torch.get_num_threads() == saved


@pytest.mark.parametrize(
    ("speedup", "macs_speedup", "words"),
    [
        (1.9, 2.0, None),
        (1.0, 2.0, None),  # no gain at batch 1 is common, not implausible
        (3.5, 2.0, "more than 1.5 times the MAC count's x2.00"),
        (0.5, 2.0, "2.00x slower than the dense one"),
    ],
)
def test_a_speedup_beyond_what_the_macs_allow_is_implausible(
    speedup: float, macs_speedup: float, words: str | None
) -> None:
    why = implausible(speedup, macs_speedup)
    assert (why is None) if words is None else (words in why)


def test_an_implausible_figure_is_not_headlined() -> None:
    from pruning_core.artifacts.report import LatencyReport, latency_line

    est = {"median": 3.5, "low": 3.4, "high": 3.6, "confidence": 0.95}
    ms = {"median": 1.0, "low": 0.9, "high": 1.1, "confidence": 0.95}
    batch = {"batch_size": 8, "dense_ms": ms, "pruned_ms": ms, "speedup": est, "rounds": 6}
    batch |= {"forwards": [6, 6], "verdict": "faster"}
    base = {"device": "cpu", "threads": 1, "cpus": 2, "busy": False, "budget_s": 1.0, "wall_s": 1.0}
    report = LatencyReport.model_validate(base | {"batches": [batch]})
    assert latency_line(report).startswith("latency x3.50 [3.40, 3.60] at batch 8 (faster")
    odd = report.model_copy(update={"implausible": "measured x3.50 is more than ..."})
    assert (
        latency_line(odd) == "latency not headlined: implausible at batch 8 (measured x3.50 is more than ...)"
    )
