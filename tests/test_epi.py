"""EPI is EPI: the structural similarity is a similarity, the trigger fires exactly where a converging
sequence of architectures says, a real run prunes on the indicator (after the window, before the
deadline) to the target, the physically pruned network is the masked dominant one, and the reported
training MACs are the sum of what every epoch trained, dense then pruned."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from pruning_core.artifacts.export import load_pruned
from pruning_core.errors import Cancelled
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.macs import count_macs
from pruning_core.jobs.runner import prepare, run
from pruning_core.methods import MethodContext, Phase
from pruning_core.methods.epi.method import EPI, deadline_epoch, fires, indicator, similarity
from pruning_core.models.zoo import build_model
from pruning_core.spec import SpecError, parse_spec
from pruning_core.training.evaluation import evaluate
from tests.specs import quick_spec
from tests.test_method_contract import CancelAt, _comparable


def test_similarity_is_one_on_equal_architectures_symmetric_and_within_zero_and_one() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randint(1, 64) for _ in range(7)]
        b = [rng.randint(1, 64) for _ in range(7)]
        assert similarity(a, a) == 1.0
        assert similarity(a, b) == similarity(b, a)
        assert 0.0 <= similarity(a, b) <= 1.0
    assert similarity([1, 4], [3, 4]) == pytest.approx(1 - (2 / 4) / 2)


def _first_trigger(archs: list[list[int]], tau: float, window: int, min_epochs: int) -> int | None:
    values: list[float | None] = []
    for t in range(len(archs)):
        values.append(indicator(archs[: t + 1], window))
        if t + 1 >= min_epochs and fires(values, tau, window):
            return t
    return None


def test_on_a_converging_sequence_the_trigger_fires_where_the_window_first_holds_one_architecture() -> None:
    # architectures wander until epoch 6, then settle; with r = 3 the window first holds only the settled
    # architecture at epoch 9, where EPI reaches 1 (any epoch before it has a wandering one in its window)
    wander = [[10, 20], [18, 12], [11, 19], [17, 14], [12, 18], [16, 15]]
    archs = wander + [[15, 16]] * 8
    assert _first_trigger(archs, tau=0.999, window=3, min_epochs=4) == 9
    values = [indicator(archs[: t + 1], 3) for t in range(len(archs))]
    assert values[:3] == [None] * 3 and values[9] == 1.0 and all(v < 0.999 for v in values[3:9])  # type: ignore[operator]
    # a lower tau fires earlier, but never before the window is full or below an earlier value
    early = _first_trigger(archs, tau=0.9, window=3, min_epochs=4)
    assert early is not None and 3 <= early < 9
    assert _first_trigger(archs, tau=0.9, window=3, min_epochs=12) == 11
    # the deadline: a share of the epochs, not before min_epochs, never the last epoch
    assert deadline_epoch(20, 0.5) == 9 and deadline_epoch(20, 0.5, min_epochs=14) == 13
    assert deadline_epoch(3, 1.0) == 1 and deadline_epoch(8, 0.5, min_epochs=20) == 6


def test_an_indicator_above_tau_does_not_fire_while_below_an_earlier_value_in_the_window() -> None:
    # min_epochs holds back epoch 3 (EPI 1.0); epoch 4's 0.95 is above tau but below it; epoch 5 is 1.0
    archs = [[10, 10], [10, 10], [10, 10], [10, 10], [10, 11], [10, 11], [10, 11]]
    values = [indicator(archs[: t + 1], 2) for t in range(len(archs))]
    assert values[3] == 1.0 and 0.9 < values[4] < 1.0 and values[6] == 1.0  # type: ignore[operator]
    assert _first_trigger(archs, tau=0.9, window=2, min_epochs=5) == 6
    assert fires(values[:4], 0.9, 2) and not fires(values[:5], 0.9, 2)


def _digits(options: dict[str, Any], epochs: int = 14, **schedule: Any) -> Any:
    return parse_spec(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "digits"},
            "method": {"name": "epi", **options},
            "target": {"macs_ratio": 0.5, "round_to": 1},
            "schedule": {"epochs": epochs, "batch_size": 64, **schedule},
            "export": {"formats": ["safetensors"]},
            "seed": 0,
            "device": "cpu",
        }
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Any:
    return run(_digits({"window": 3, "threshold": 0.98, "deadline": 0.8}), tmp_path_factory.mktemp("epi"))


def test_a_digits_run_prunes_on_the_indicator_after_the_window_and_before_the_deadline(finished) -> None:
    report = finished.report
    d = report.method_details
    assert d["trigger"] == "indicator", d
    assert 3 + 1 <= d["trigger_epoch"] < d["deadline_epoch"]
    epochs = [r for r in report.history if r.phase == "epi"]
    pruned = [r for r in epochs if r.event == "pruned"]
    assert len(pruned) == 1 and pruned[0].epoch + 1 == d["trigger_epoch"]
    assert pruned[0].metrics["epi"] >= d["threshold"] == pruned[0].metrics["epi_threshold"]
    assert 0.48 <= report.achieved_macs_ratio <= 0.5
    assert report.pruned.top1 > 90.0
    # the pruned network is the trigger epoch's dominant sub-network
    model = load_pruned(finished.workdir)
    widths = [g.size for g in PruningGraph(model, torch.zeros(1, 1, 8, 8), 10).groups]
    assert widths == d["architecture"]


def test_the_dominant_architecture_at_the_trigger_differs_from_the_initial_one_and_every_epoch_says_so(
    finished,
) -> None:
    d = finished.report.method_details
    sims = d["similarity"]
    assert [s["epoch"] for s in sims] == list(range(1, d["trigger_epoch"] + 1))
    at_trigger = sims[-1]
    assert at_trigger["similarity_initial"] < 0.99, "a learned structure, not the initialisation's"
    assert len(at_trigger["similarity_previous"]) == d["window"]
    records = [r for r in finished.report.history if r.phase == "epi"][: d["trigger_epoch"]]
    assert [r.metrics["similarity_initial"] for r in records] == [s["similarity_initial"] for s in sims]


def test_at_initialisation_no_group_of_the_dominant_sub_network_is_under_the_width_floor() -> None:
    spec = parse_spec(
        {"model": {"name": "resnet20"}, "method": {"name": "epi"}, "target": {"macs_ratio": 0.5}}
    )
    assert spec.method.criterion == "magnitude" and spec.target.min_width > 0  # type: ignore[union-attr]
    for criterion in ("magnitude", "neuron_l2"):
        torch.manual_seed(0)
        s = spec.model_copy(update={"method": spec.method.model_copy(update={"criterion": criterion})})
        model = build_model("resnet20", 10, 3)
        example = torch.zeros(1, 3, 32, 32)
        ctx = MethodContext(s, example, 10, torch.device("cpu"), count_macs(model, example))
        method = EPI(s.method, ctx)
        method.start_phase(Phase("epi", 1), model)
        assert method.graph is not None
        keep = ctx.select(method.graph, method._scores())
        shares = [len(k) / g.size for k, g in zip(keep, method.graph.groups, strict=True)]
        assert min(shares) >= spec.target.min_width, (criterion, shares)
        assert method.graph.cost.macs([len(k) for k in keep]) <= ctx.target_macs
        if criterion == "magnitude":  # normalised per group: nowhere near the floor
            assert min(shares) > 0.3, shares


def test_the_reported_training_macs_are_what_every_epoch_trained(finished) -> None:
    report = finished.report
    epochs = [r for r in report.history if r.phase == "epi"]
    trigger = report.method_details["trigger_epoch"]
    dense, pruned = epochs[:trigger], epochs[trigger:]
    assert pruned and all(r.train_macs < dense[0].train_macs * 0.55 for r in pruned)
    spent = report.method_details["training_macs"]
    assert spent["epi"] == sum(r.train_macs for r in epochs)
    assert spent["dense_then_prune"] == dense[0].train_macs * len(epochs)
    assert spent["ratio"] == pytest.approx(spent["epi"] / spent["dense_then_prune"]) and spent["ratio"] < 1.0
    wall = report.method_details["training_wall_s"]
    # the training steps' seconds: every epoch's, less the removal's time that the pruned epoch adds
    assert sum(r.wall_s for r in epochs if not r.event) < wall["epi"] <= sum(r.wall_s for r in epochs)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_a_run_resumed_before_the_trigger_equals_an_uninterrupted_one(criterion: str, tmp_path: Path) -> None:
    """The window of architectures and indicator values (and Taylor's sums mid-epoch) are method state:
    cancelled in the middle of epoch 3, before the indicator could fire, the resumed run prunes at the
    same epoch to the same network."""
    spec = _digits({"criterion": criterion, "window": 2, "threshold": 0.9}, epochs=7, max_steps_per_epoch=6)
    reference = run(spec, tmp_path / "whole").report
    with pytest.raises(Cancelled):
        run(spec, tmp_path / "resumed", CancelAt("epi", 2, 3))
    torch.manual_seed(11)
    resumed = run(spec, tmp_path / "resumed").report
    assert reference.method_details["trigger_epoch"] >= 3
    assert _comparable(resumed) == _comparable(reference)


def test_a_run_resumed_after_the_trigger_goes_on_with_the_pruned_network(finished, tmp_path: Path) -> None:
    spec = _digits({"window": 3, "threshold": 0.98, "deadline": 0.8})
    trigger = finished.report.method_details["trigger_epoch"]
    with pytest.raises(Cancelled):
        run(spec, tmp_path, CancelAt("epi", trigger + 1, 3))  # two epochs after the prune
    torch.manual_seed(7)
    resumed = run(spec, tmp_path)
    assert _comparable(resumed.report) == _comparable(finished.report)
    model = load_pruned(resumed.workdir)
    data, _, _ = prepare(spec, resumed.workdir)
    assert evaluate(model, data.test, torch.device("cpu"))["top1"] == finished.report.pruned.top1


@pytest.mark.parametrize(
    "name, size", [("tv:resnet18", 32), ("tv:mobilenet_v2", 32), ("vgg16_bn", 16), ("mobilenet_v2", 16)]
)
def test_runs_on_torchvision_and_zoo_cnns(name: str, size: int, tmp_path: Path) -> None:
    spec = quick_spec(
        name, {"name": "epi", "window": 1, "deadline": 0.5}, size=size, epochs=3, max_steps_per_epoch=2
    )
    report = run(spec, tmp_path).report
    assert report.method_details["trigger_epoch"] <= 2
    assert 0.58 <= report.achieved_macs_ratio <= 0.6


def test_the_taylor_criterion_fires_on_its_own_indicator(tmp_path: Path) -> None:
    spec = _digits({"criterion": "taylor", "window": 2, "threshold": 0.9, "deadline": 1.0}, epochs=8)
    report = run(spec, tmp_path).report
    d = report.method_details
    assert d["criterion"] == "taylor" and d["trigger"] == "indicator", d
    assert 3 <= d["trigger_epoch"] < 7
    assert 0.48 <= report.achieved_macs_ratio <= 0.5


def test_an_epi_job_needs_two_epochs_and_defaults_tau_per_criterion() -> None:
    with pytest.raises(SpecError, match="at least 2 epochs"):
        parse_spec({"method": {"name": "epi"}, "schedule": {"epochs": 1}})
    assert parse_spec({"method": {"name": "epi", "criterion": "taylor"}}).method.tau == 0.944  # type: ignore[union-attr]
    assert parse_spec({"method": {"name": "epi"}}).method.tau == 0.983  # type: ignore[union-attr]
    assert parse_spec({"method": {"name": "epi"}}).method.criterion == "magnitude"  # type: ignore[union-attr]
