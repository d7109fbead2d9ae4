"""TAS is TAS: the search network is the model at full width and depth, the cost loss holds the expected
MACs down (without it the search grows wider), the result lies in [target - 0.02, target] (stepped there
in the logits' order where the search ended outside), the built network has exactly the MACs the search
predicted for it, with fewer blocks where it chose so, and a search interrupted mid-way resumes to the
same result. From trained weights: the search starts from each group's most important channels, the
weights and the architecture learn from their own halves of the data, `init: supernet` builds the
searched network itself, and `kd: false` means no KD. The space itself is tested in test_tas_space.py."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from pruning_core.errors import Cancelled
from pruning_core.graph.budget import TARGET_BAND
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.importance import magnitude
from pruning_core.jobs.runner import run
from pruning_core.methods.base import MethodContext
from pruning_core.methods.tas.method import SPEND, TAS, Supernet, _Argmax
from pruning_core.methods.tas.options import TASOptions
from pruning_core.models.zoo import build_model
from pruning_core.spec import JobSpec, parse_spec
from tests.specs import quick_spec
from tests.test_method_contract import CancelAt, _comparable


def test_at_full_width_and_depth_the_search_network_is_the_model() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 4, 3).train()
    x = torch.randn(8, 3, 8, 8)
    reference = model(x)
    net = Supernet(PruningGraph(model, x[:1], 4), TASOptions(), 1)
    with torch.no_grad():  # every candidate BatchNorm starts from the model's own
        for a in net.alpha:
            a.zero_()
            a[-1] = 100.0
        for b in net.beta:
            b.zero_()
            b[-1] = 100.0
    net.attach()
    net.mode = "argmax"
    net.sample()
    assert torch.equal(model(x), reference)
    with torch.no_grad():
        for a in net.alpha:
            a.zero_()  # every width equally likely
    net.mode = "search"
    net.tau = 1.0
    net.sample()
    assert not torch.allclose(model(x), reference), "a sampled architecture is narrower"


def _spec(cost_weight: float = 2.0, arch_lr: float = 0.05, **schedule: Any) -> Any:
    return parse_spec(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "digits"},
            "method": {"name": "tas", "search_epochs": 4, "arch_lr": arch_lr, "cost_weight": cost_weight},
            "target": {"macs_ratio": 0.5},
            "schedule": {"dense_epochs": 1, "epochs": 1, "batch_size": 64, **schedule},
            "export": {"formats": ["safetensors"]},
            "seed": 2,
            "device": "cpu",
        }
    )


def _uniform_expected_macs() -> float:
    """E[MACs] / dense of the digits ResNet-20's search at uniform logits (where every search starts)."""
    graph = PruningGraph(build_model("resnet20", 10, 1), torch.zeros(1, 1, 8, 8), 10)
    net = Supernet(graph, TASOptions(), 1)
    with torch.no_grad():
        for logits in [*net.alpha, *net.beta]:
            logits.zero_()
        return float(net.expected_macs()) / graph.dense_macs


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict[float, Any]:
    # Without the cost loss, a 4x larger architecture step: the cross-entropy's pull on the widths is weak on
    # digits, and at the default step four epochs moved the expected MACs by about as much as the float
    # summation order does (0.26 -> 0.28 on one CPU; the order differs between CPUs and thread counts).
    return {
        2.0: run(_spec(2.0), tmp_path_factory.mktemp("tas-2.0")),
        0.0: run(_spec(0.0, arch_lr=0.2), tmp_path_factory.mktemp("tas-0.0")),
    }


def test_the_result_lands_in_the_band_and_without_the_cost_loss_the_expected_macs_grow(searched) -> None:
    with_cost, without = searched[2.0].report, searched[0.0].report
    for report in (with_cost, without):  # by the search, or stepped there afterwards (Supernet.fit)
        assert 0.5 - TARGET_BAND <= report.achieved_macs_ratio <= 0.5, report.method_details[
            "architecture_from"
        ]

    # Four epochs do not settle the argmax (seed 2 with sorted channels: 0.55, 0.50, 0.42, 0.55 of the dense
    # MACs), so the search's own landing is not asserted; what is: without the cost loss the cross-entropy
    # alone moves the architecture toward wider networks. Whether the cost loss holds them back is not
    # asserted here: the target (0.5) lies above the uniform start (0.26), so it pulls the same way, and at
    # one architecture LR (0.2) both runs ended at 0.45 and 0.43 (an earlier assertion that the cost run
    # ends 0.1 lower measured its 4x smaller LR, not the loss). The loss's sign is test_tas_space's.
    def expected(report) -> list[float]:
        return [r.metrics["expected_macs_ratio"] for r in report.history if r.phase == "search"]

    start = _uniform_expected_macs()  # the architecture logits' start (uniform), before any step
    assert expected(without)[-1] > start + 0.1, (start, expected(without))


def test_an_architecture_above_the_target_steps_down_where_the_logits_mind_least() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 4, 3)
    x = torch.randn(1, 3, 8, 8)
    net = Supernet(PruningGraph(model, x, 4), TASOptions(), 1)
    loose = 5  # a group whose logits do not care which width it has
    with torch.no_grad():
        for i, a in enumerate(net.alpha):
            a.zero_()
            a[-1] = 10.0 if i != loose else 1e-3  # every group at full width
        for b in net.beta:
            b.zero_()
            b[-1] = 10.0
    widths, depths = net.argmax()
    full = net.argmax_macs(widths, depths)
    small, same_depths, macs = net.fit(widths, depths, 0, full - 1)
    assert macs < full and same_depths == depths
    assert [i for i, (a, b) in enumerate(zip(widths, small, strict=True)) if a != b] == [loose]
    budget = 0.3 * full  # far below: everything gives way, and the result fits
    small, fewer, macs = net.fit(widths, depths, 0, budget)
    assert macs <= budget == pytest.approx(0.3 * full)
    assert macs == net.argmax_macs(small, fewer)


def test_an_architecture_below_the_band_steps_up_where_the_logits_favour_most() -> None:
    """A short search can end below [target - t, target] (seen: 0.443 for a target of 0.5 with one
    thread); the job then grows its argmax into the band, first where the logits favour it."""
    torch.manual_seed(0)
    model = build_model("resnet20", 4, 3)
    net = Supernet(PruningGraph(model, torch.randn(1, 3, 8, 8), 4), TASOptions(), 1)
    keen = 5  # a group whose logits nearly favour its next larger width
    with torch.no_grad():
        for i, a in enumerate(net.alpha):
            a.zero_()
            a[0] = 10.0  # every group at its smallest width
            if i == keen:
                a[1] = 9.99
        for b in net.beta:
            b.zero_()
            b[0] = 10.0
    widths, depths = net.argmax()
    least = net.argmax_macs(widths, depths)
    bigger, same_depths, macs = net.fit(widths, depths, least + 1, 10 * least)
    assert macs > least and same_depths == depths
    assert [i for i, (a, b) in enumerate(zip(widths, bigger, strict=True)) if a != b] == [keen]
    full = net.argmax_macs([c[-1] for c in net.widths], {sl.stage.name: sl.depths[-1] for sl in net.stages})
    low, high = 0.45 * full, 0.5 * full  # far above: everything grows, and the result lands in the band
    grown, deeper, macs = net.fit(widths, depths, low, high)
    assert low <= macs <= high and macs == net.argmax_macs(grown, deeper)


def test_the_found_network_spends_the_budget_to_within_a_hundredth_where_the_candidates_allow() -> None:
    method, model = _method()
    method.start_phase(method.phases()[0], model)
    net, dense = method.supernet, method.ctx.dense_macs
    with torch.no_grad():  # every group at a middle width, every stage at full depth
        for a in net.alpha:
            a.zero_()
            a[len(a) // 2] = 10.0
        for b in net.beta:
            b.zero_()
            b[-1] = 10.0
    ratio = net.argmax_macs() / dense
    target = ratio + 0.018  # the search's argmax is in the band, and leaves 1.8 % of the MACs unspent
    method.ctx.spec = method.ctx.spec.model_copy(
        update={"target": method.ctx.spec.target.model_copy(update={"macs_ratio": target})}
    )
    assert method._searched(net)[2] == net.argmax_macs()
    widths, depths, macs, chosen = method._choose(net)
    assert target - SPEND <= macs / dense <= target, (ratio, macs / dense, target)
    assert macs == net.argmax_macs(widths, depths) and "stepped up" in chosen


def test_the_built_network_is_the_searched_architecture(searched) -> None:
    report = searched[2.0].report
    assert report.pruned.macs == report.method_details["predicted_macs"]
    depths = report.method_details["depths"]
    assert {k: v[1] for k, v in report.blocks.items()} == depths
    assert [p.name for p in report.phases if p.epochs] == ["dense", "search", "kd"]
    last = [r for r in report.history if r.phase == "search"][-1]
    assert {"tau", "expected_macs_ratio", "argmax_macs_ratio", "searched_widths", "searched_depths"} <= set(
        last.metrics
    )
    assert last.metrics["tau"] < 5.0 and last.top1 is not None  # the argmax network's top-1


def test_a_search_interrupted_mid_way_resumes_to_the_same_result(searched, tmp_path: Path) -> None:
    reporter = CancelAt("search", 1, 3)
    with pytest.raises(Cancelled):
        run(_spec(2.0), tmp_path, reporter)
    torch.manual_seed(99)
    resumed = run(_spec(2.0), tmp_path)
    assert _comparable(resumed.report) == _comparable(searched[2.0].report)


@pytest.mark.parametrize(
    "name, size, depth",
    [("tv:resnet18", 32, True), ("vgg16_bn", 32, False), ("mobilenet_v2", 16, False)],
)
def test_width_and_depth_where_there_are_stages_width_only_elsewhere(
    name: str, size: int, depth: bool, tmp_path: Path
) -> None:
    spec = quick_spec(
        name, {"name": "tas", "search_epochs": 1, "arch_lr": 0.3}, size=size, max_steps_per_epoch=2
    )
    report = run(spec, tmp_path).report
    assert report.pruned.macs == report.method_details["predicted_macs"] < report.dense.macs
    if depth:
        assert set(report.method_details["depth_search"]) == {"layer1", "layer2", "layer3", "layer4"}
    else:
        assert report.method_details["depth_search"].startswith("none") and not report.blocks


@pytest.mark.slow
def test_kd_training_of_the_found_network_beats_training_without_it(tmp_path: Path) -> None:
    """Same search (same seed, so the same architecture), the found network trained with and without KD
    from the dense teacher; three seeds, a tolerance of half a point on the mean."""

    def top1(seed: int, kd: bool) -> tuple[float, dict[str, int]]:
        spec = _spec(2.0, epochs=4, dense_epochs=10).model_copy(update={"seed": seed})  # a trained teacher
        spec = parse_spec({**spec.model_dump(mode="json"), "method": {**spec.method.model_dump(), "kd": kd}})
        report = run(spec, tmp_path / f"s{seed}-{kd}").report
        return report.pruned.top1, report.method_details["widths"]

    with_kd, without = [], []
    for seed in (0, 1, 2):
        (a, arch_a), (b, arch_b) = top1(seed, True), top1(seed, False)
        assert arch_a == arch_b, "the same search finds the same architecture"
        with_kd.append(a)
        without.append(b)
    assert sum(with_kd) / 3 >= sum(without) / 3 - 0.5, (with_kd, without)


# --- from trained weights: sorted channels, the bi-level split, the found network's start and loss ---

EXAMPLE = torch.zeros(1, 3, 8, 8)


def _method(target: float = 0.5, **options: Any) -> tuple[TAS, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("resnet20", 4, 3)
    job = {k: options.pop(k) for k in ("schedule", "model") if k in options}
    spec = JobSpec(method=TASOptions(**options), target={"macs_ratio": target}, **job)
    dense = PruningGraph(model, EXAMPLE, 4).dense_macs
    return TAS(spec.method, MethodContext(spec, EXAMPLE, 4, torch.device("cpu"), dense)), model


def test_the_search_starts_from_each_groups_most_important_channels_first() -> None:
    method, model = _method()
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    searched = method.start_phase(method.phases()[0], model)
    net = method.supernet
    net.mode = "off"
    assert torch.allclose(searched(x), before, atol=1e-5), "the same function"
    scores = magnitude(PruningGraph(searched, EXAMPLE, 4))
    for g in net.searched:
        s = scores[g.index]
        assert torch.all(s[1:] <= s[:-1] + 1e-6), f"{g.root}: first k channels = the k most important"
    assert not all(torch.all(s[1:] <= s[:-1]) for s in magnitude(PruningGraph(model, EXAMPLE, 4)))


@pytest.mark.parametrize("align", ["pad", "interpolate"])
def test_padded_candidates_keep_the_channels_the_next_layer_was_trained_on(align: str) -> None:
    # Two candidates of a group, equally weighted, each normalised by a copy of the model's BatchNorm:
    # padded, the narrow one's channels stay where the next layer reads them, so those channels are the
    # model's own; interpolated (the paper's, from scratch), they are stretched over the wide one's.
    method, model = _method(align=align)
    model = method.start_phase(method.phases()[0], model).eval()
    net = method.supernet.eval()  # its candidate BatchNorms too: their statistics are the model's
    x = torch.randn(4, 3, 8, 8)
    net.mode = "off"
    dense, seen = {}, {}
    order = [name for name, _ in model.named_modules()]  # the first norm in the forward: an input unchanged
    gi, point = min(
        ((i, p) for i, ps in enumerate(net.points) for p in ps if p.norms is not None),
        key=lambda ip: order.index(ip[1].module),
    )
    module = dict(model.named_modules())[point.module]
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    with torch.no_grad():
        model(x)
        dense["out"] = seen["out"]
        net.mode = "search"
        net.sample()
        net._pairs = [([0, len(c) - 1], torch.tensor([0.5, 0.5])) for c in net.widths]
        model(x)
    handle.remove()
    narrow = net.widths[gi][0]
    kept = torch.allclose(seen["out"][:, :narrow], dense["out"][:, :narrow], atol=1e-5)
    assert kept == (align == "pad")


def test_align_auto_pads_from_trained_weights_and_interpolates_from_scratch() -> None:
    scratch, _ = _method()
    assert scratch.align() == "interpolate"
    trained, _ = _method(schedule={"dense_epochs": 2})
    assert trained.align() == "pad"
    given, _ = _method(model={"name": "resnet20", "weights": "upload:abc"})
    assert given.align() == "pad"
    forced, _ = _method(align="interpolate", schedule={"dense_epochs": 2})
    assert forced.align() == "interpolate"


class _Spy:
    """A StepContext that records each backward's loss and parameter set instead of running it."""

    epoch = 0

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss, params=None, *, retain_graph=False) -> None:
        self.calls.append((params, loss))

    def update(self, *names: str) -> None:
        self.calls.append(("update", names))


def test_weights_learn_from_half_a_only_and_the_architecture_from_half_b_and_the_cost_only() -> None:
    method, model = _method(target=0.2)
    model = method.start_phase(method.phases()[0], model).train()
    torch.manual_seed(1)
    x_w, x_a = torch.randn(8, 3, 8, 8, requires_grad=True), torch.randn(8, 3, 8, 8, requires_grad=True)
    y_w, y_a = torch.randint(0, 4, (8,)), torch.randint(0, 4, (8,))
    spy = _Spy()
    out = method.training_step(model, ((x_w, y_w), (x_a, y_a)), spy)
    (w_set, w_loss), update, (a_set, a_loss) = spy.calls
    assert w_set == "weights" and update == ("update", ("weights",)) and a_set == "arch"

    def reaches(loss: torch.Tensor) -> list[bool]:
        grads = torch.autograd.grad(loss, [x_w, x_a], retain_graph=True, allow_unused=True)
        return [g is not None and bool(g.abs().sum() > 0) for g in grads]

    assert reaches(w_loss) == [True, False], "the weights' loss reads half A only"
    assert reaches(a_loss) == [False, True], "the architecture's loss reads half B only"
    cost = out.metrics["cost_loss"]
    assert cost != 0 and a_loss.item() == pytest.approx(
        (out.metrics["arch_ce"] + 2.0 * cost).item(), rel=1e-5
    )
    alpha = torch.autograd.grad(a_loss, list(method.supernet.alpha), retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in alpha)


def test_init_supernet_builds_the_searched_argmax_network_with_its_weights_and_norms() -> None:
    method, model = _method(init="supernet")
    model = method.start_phase(method.phases()[0], model)
    net = method.supernet
    with torch.no_grad():  # an arbitrary searched state: logits, and candidate BatchNorms of their own
        for a in [*net.alpha, *net.beta]:
            a.normal_(0.0, 1.0)
        for norms in net.norms:
            for bn in norms:
                bn.weight.uniform_(0.5, 1.5)
                bn.running_mean.uniform_(-0.5, 0.5)
    method._choose = lambda n: (*n.argmax(), n.argmax_macs(), "test")  # build the argmax as it is
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    searched = _Argmax(model, net).eval()(x)  # the candidate BatchNorms too
    built = method.start_phase(method.phases()[1], model).eval()
    assert sum(p.numel() for p in built.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.allclose(built(x), searched, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["random", "teacher", "supernet"])
def test_kd_false_trains_the_found_network_on_cross_entropy_whatever_the_init(init: str) -> None:
    method, model = _method(init=init, kd=False)
    method.ctx.teacher = build_model("resnet20", 4, 3).eval()  # loaded for init: teacher
    z, x, y = torch.randn(8, 4), torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    assert torch.equal(method.supervised_loss(z, x, y), torch.nn.functional.cross_entropy(z, y))
    with_kd, _ = _method(init=init)
    with_kd.ctx.teacher = method.ctx.teacher
    assert not torch.equal(with_kd.supervised_loss(z, x, y), torch.nn.functional.cross_entropy(z, y))
    assert method.wants_teacher() == (init == "teacher")
