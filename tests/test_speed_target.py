"""``target.speedup``: a measured speed-up turned into a MAC target by timing candidate prunings on the
job's device, then run by any method; the report gives the requested and the achieved speed-up.

The search's timing uses a deterministic clock whose time is proportional to a network's MACs (so the
true speed-up of a candidate is its MAC-implied one and the right answer is known): the property under
test is the search and its plumbing, not this machine's speed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pruning_core.errors import TargetError
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.macs import count_macs
from pruning_core.jobs.runner import run
from pruning_core.methods import METHODS
from pruning_core.models.zoo import build_model
from pruning_core.spec import SpecError, parse_spec
from pruning_core.speed import target as speed_target
from pruning_core.speed.target import SpeedProbe, bisect_ratio, chosen_ratio
from tests.specs import quick_spec
from tests.test_method_contract import OPTIONS


class MacClock:
    """Seconds for ``n`` forwards = n x MACs of one sample x 1e-9 (``latency.Clock``); counts calls."""

    def __init__(self) -> None:
        self.macs: dict[int, int] = {}
        self.calls = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, n: int) -> float:
        self.calls += 1
        if id(model) not in self.macs:
            self.macs[id(model)] = count_macs(model, x[:1].float().contiguous())
        return n * self.macs[id(model)] * 1e-9


@pytest.fixture
def mac_clock(monkeypatch: pytest.MonkeyPatch) -> MacClock:
    clock = MacClock()
    monkeypatch.setattr(speed_target, "CLOCK", clock)
    return clock


def test_a_speed_target_is_instead_of_a_mac_target_and_above_one() -> None:
    assert parse_spec({"target": {"speedup": 2.0}}).target.speedup == 2.0
    with pytest.raises(SpecError, match="macs_ratio or target.speedup, not both"):
        parse_spec({"target": {"speedup": 2.0, "macs_ratio": 0.4}})
    with pytest.raises(SpecError, match="speedup"):
        parse_spec({"target": {"speedup": 1.0}})


def _prober(exponent: float):
    """Speed-up of ratio r: r ** -exponent, exactly (no noise)."""

    def probe(r: float) -> SpeedProbe:
        s = r**-exponent
        return SpeedProbe(macs_ratio=r, achieved_macs_ratio=r, speedup=s, speedup_low=s, speedup_high=s)

    return probe


@pytest.mark.parametrize("exponent", [1.0, 0.6])
def test_the_bisection_finds_the_largest_ratio_that_reaches_the_request(exponent: float) -> None:
    floor, requested = 0.1, 2.0
    probes = bisect_ratio(requested, floor, _prober(exponent))
    truth = requested ** (-1 / exponent)  # r ** -exponent == requested
    chosen = chosen_ratio(requested, probes)
    assert probes[0].macs_ratio == floor and len(probes) == 1 + speed_target.BISECTIONS
    assert chosen <= truth + 1e-12  # reaches the request ...
    assert truth - chosen <= (1 - floor) / 2**speed_target.BISECTIONS  # ... and prunes no more than needed


def test_a_request_the_floor_cannot_reach_is_refused_with_what_was_measured() -> None:
    with pytest.raises(TargetError, match=r"unreachable on this device: .* measured 1\.58x"):
        bisect_ratio(3.0, 0.4, _prober(0.5))


def test_the_search_on_a_real_network_lands_where_its_macs_say(mac_clock: MacClock) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = speed_target.search(
        model, torch.zeros(1, 3, 32, 32), 10, 2.0, torch.device("cpu"), batch_size=2, round_to=1, seconds=1.0
    )
    assert mac_clock.calls > 0
    best = next(p for p in found.probes if p.macs_ratio == found.macs_ratio)
    assert best.speedup >= 2.0 and best.achieved_macs_ratio <= found.macs_ratio
    assert 0.5 - 1 / 32 <= found.macs_ratio <= 0.5 + 1e-3  # MAC-proportional time: 2x at half the MACs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched


def _speed_spec(method: str, speedup: float) -> dict:
    # the method contract's fast-search options, and an epoch per phase for methods that prune between
    # phases (S2H: two, to finish its width search in so few steps)
    epochs = 1 if method == "magnitude" else 2
    options = {"name": method, **OPTIONS.get(method, {})}
    spec = quick_spec("resnet20", options, round_to=None, epochs=epochs).model_dump(mode="json")
    spec["target"] = {"speedup": speedup, "speedup_search_s": 1.0}
    spec["export"]["latency_batch_size"] = 2
    return spec


def test_a_job_prunes_to_the_searched_ratio_and_resumes_without_timing_again(
    mac_clock: MacClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_spec(_speed_spec("magnitude", 1.5))
    result = run(spec, tmp_path)
    r = result.report
    assert r.speed_target is not None and r.speed_target.requested == 1.5
    assert r.target_macs_ratio == r.speed_target.macs_ratio
    assert 1 / 1.5 - 1 / 16 <= r.target_macs_ratio <= 1 / 1.5 + 1e-3
    assert r.achieved_macs_ratio <= r.target_macs_ratio + 1e-9
    assert r.spec["target"]["speedup"] == 1.5  # the spec as asked
    assert r.latency is not None and r.latency.folded  # the achieved speed-up, timed as deployed
    page = (tmp_path / "report.html").read_text()
    assert "Speed target: 1.5x at batch 2" in page and f"MAC target {r.target_macs_ratio:.3f}" in page

    def no_timing(*_: object) -> float:
        raise AssertionError("a resumed job must reuse its search, not time again")

    monkeypatch.setattr(speed_target, "CLOCK", no_timing)
    again = run(spec, tmp_path).report
    assert again.target_macs_ratio == r.target_macs_ratio


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_to_a_speed_target(method: str, mac_clock: MacClock, tmp_path: Path) -> None:
    report = run(parse_spec(_speed_spec(method, 1.4)), tmp_path).report
    assert report.speed_target is not None
    assert math.isclose(report.target_macs_ratio, report.speed_target.macs_ratio)
    assert report.target_macs_ratio < 1 / 1.4 + 1e-3
    # every method's result lies in [target - TARGET_BAND, target] (S2H's and TAS's stepped there)
    assert report.achieved_macs_ratio <= report.target_macs_ratio + 0.02


# --- target.allocation: latency, kept only where it measures faster than the MAC allocation ---


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


class WidthClock:
    """Seconds for ``n`` forwards = n x (MACs x 1e-9 + 1e-4 per output channel of the first conv
    (``stem``) or of every other conv (``rest``)): a device where those channels cost time beyond
    their MACs. Counts calls."""

    def __init__(self, slow: str) -> None:
        self.slow = slow
        self.calls = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, n: int) -> float:
        self.calls += 1
        convs = _convs(model)
        widths = convs[:1] if self.slow == "stem" else convs[1:]
        macs = count_macs(model, x[:1].float().contiguous())
        return n * (macs * 1e-9 + 1e-4 * sum(c.out_channels for c in widths))


def _stem_first_rates(graph: PruningGraph) -> list[float]:
    """Rates that prune the stem's group harder (rate 0.25) and every other group at 1."""
    stem = _convs(graph.model)[0]
    return [0.25 if graph.modules[g.root] is stem else 1.0 for g in graph.groups]


@pytest.mark.parametrize(("slow", "chosen"), [("stem", "latency"), ("rest", "macs")])
def test_the_latency_allocation_is_kept_only_where_it_measures_faster(
    slow: str, chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_model("resnet20", 10, 3).eval()
    example = torch.zeros(1, 3, 32, 32)
    rates = _stem_first_rates(PruningGraph(model, example, 10))
    clock = WidthClock(slow)
    monkeypatch.setattr(speed_target, "CLOCK", clock)
    check = speed_target.check_allocation(
        model, example, 10, rates, 0.5, torch.device("cpu"), batch_size=2, round_to=1, seconds=0.5
    )
    assert clock.calls > 0 and check.chosen == chosen
    # the speed-up is the MAC-allocated time over the latency-allocated one: above 1 where it was kept
    assert (check.speedup_low > 1.02) == (chosen == "latency")


def test_allocations_that_keep_the_same_widths_are_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("resnet20", 10, 3).eval()
    clock = WidthClock("stem")
    monkeypatch.setattr(speed_target, "CLOCK", clock)
    n = len(speed_target.pruned_copy(model, torch.zeros(1, 3, 32, 32), 10, 0.5, None, 1).widths)
    check = speed_target.check_allocation(
        model, torch.zeros(1, 3, 32, 32), 10, [1.0] * n, 0.5, torch.device("cpu"), batch_size=2, round_to=1
    )
    assert check.chosen == "latency" and check.speedup == 1.0 and clock.calls == 0


@pytest.mark.parametrize(("slow", "chosen"), [("stem", "latency"), ("rest", "macs")])
def test_a_latency_job_whose_allocation_is_no_faster_prunes_as_the_macs_job_does(
    slow: str, chosen: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pruning_core.speed import layer_times

    spec = quick_spec("resnet20", {"name": "magnitude"}, size=32)
    macs_job = run(spec, tmp_path / "macs").report
    monkeypatch.setattr(layer_times, "latency_rates", lambda graph, _times: _stem_first_rates(graph))
    monkeypatch.setattr(speed_target, "CLOCK", WidthClock(slow))
    raw = spec.model_dump(mode="json")
    raw["target"]["allocation"] = "latency"
    latency_spec = parse_spec(raw)
    report = run(latency_spec, tmp_path / "latency").report
    assert report.method_details["allocation"] == chosen
    assert report.method_details["allocation_check"]["batch_size"] == spec.export.latency_batch_size
    assert "allocation check" in [p.name for p in report.phases]
    same = [g.pruned for g in report.groups] == [g.pruned for g in macs_job.groups]
    assert same == (chosen == "macs")
    assert report.achieved_macs_ratio <= spec.target.macs_ratio + 0.02

    def no_timing(*_: object, **__: object) -> None:
        raise AssertionError("a resumed job reuses its allocation check")

    monkeypatch.setattr(speed_target, "compare_latency", no_timing)
    monkeypatch.setattr(layer_times, "measure_layer_times", no_timing)
    again = run(latency_spec, tmp_path / "latency").report
    assert again.method_details["allocation"] == chosen
