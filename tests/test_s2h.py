"""S2H is S2HPruner, not a look-alike: the soft mask is a reverse cumulative sum over width candidates,
the hard mask keeps exactly the expected width's top-L1 channels, the gap loss toward the soft network
reaches the mask logits only, the MAC target is met by the hard network, the pruned network is the
masked hard network, and the gap loss closes the soft-hard gap (it is wider without it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pruning_core.artifacts.report import list_metric_file
from pruning_core.graph.groups import PruningGraph
from pruning_core.graph.macs import count_macs
from pruning_core.jobs.runner import run
from pruning_core.methods.base import MethodContext
from pruning_core.methods.s2h.method import (
    S2H,
    WidthSearch,
    _Branch,
    balance,
    gap_losses,
    max_init_logits,
    width_step,
)
from pruning_core.methods.s2h.options import S2HOptions
from pruning_core.models.zoo import build_model
from pruning_core.spec import JobSpec, Schedule, parse_spec
from pruning_core.training.engine import StepContext, TrainContext, fit
from pruning_core.training.evaluation import logits
from tests.specs import quick_spec
from tests.test_engine import SIZE, NoisyBlobs

EXAMPLE = torch.zeros(1, 3, SIZE, SIZE)


def _search(options: S2HOptions | None = None, seed: int = 0) -> tuple[torch.nn.Module, WidthSearch]:
    torch.manual_seed(seed)
    model = build_model("resnet20", 4, 3)
    search = WidthSearch(PruningGraph(model, EXAMPLE, 4), options or S2HOptions(), 1, torch.device("cpu"))
    with torch.no_grad():  # an arbitrary point of the search, not the initial one
        for u in search.logits:
            u.normal_(0.0, 2.0)
    return model, search


def test_width_step_gives_8_to_16_candidates_or_the_asked_divisor() -> None:
    assert [64 // width_step(64), 32 // width_step(32), 16 // width_step(16)] == [16, 16, 16]
    assert width_step(96) == 6 and width_step(5) == 1 and width_step(17) == 1 and width_step(34) == 2
    assert width_step(64, divisor=8) == 8 and width_step(60, divisor=8) == 6


def test_max_init_gives_the_full_width_candidate_probability_c_minus_d_over_c() -> None:
    _, search = _search()
    for space in search.spaces:
        for t in (0.5, 1.0, 3.0):
            p = F.softmax(max_init_logits(space, t) / t, dim=0)
            assert p[-1].item() == pytest.approx((space.positions - space.step) / space.positions, rel=1e-5)


def test_soft_mask_is_a_monotone_reverse_cumsum_with_the_first_block_kept() -> None:
    _, search = _search()
    st = search.step_masks()
    for space, p, soft, rank in zip(search.spaces, search.probs(), st.soft, st.ranks, strict=True):
        by_rank = torch.empty_like(soft)
        by_rank[rank] = soft  # soft keep-probability in importance order
        assert torch.all(by_rank[1:] <= by_rank[:-1] + 1e-6), "non-increasing with importance rank"
        assert torch.allclose(by_rank[: space.step], torch.ones(space.step)), "first block always kept"
        # channel of rank r: the probability of every candidate wider than r
        expected = torch.stack([p[space.widths > r].sum() for r in range(space.positions)])
        assert torch.allclose(by_rank, expected, atol=1e-6)


def test_hard_mask_keeps_exactly_the_expected_width_on_the_top_l1_channels() -> None:
    model, search = _search()
    st = search.step_masks()
    checked = 0
    for space, p, hard, n in zip(search.spaces, search.probs(), st.hard, st.hard_widths, strict=True):
        e = float(p.detach() @ space.widths)
        want = min(space.positions, math.ceil(e / space.step - 1e-6) * space.step)
        assert n.item() == want, "the expected width rounded up to a multiple of d"
        assert set(hard.detach().unique().tolist()) <= {0.0, 1.0} and hard.sum().item() == want
        outputs = [
            s for s in space.group.outputs if isinstance(search.graph.modules[s.module], torch.nn.Conv2d)
        ]
        if len(outputs) == 1:  # a block's inner conv: its L1 ranking, computed here independently
            l1 = search.graph.modules[outputs[0].module].weight.detach().abs().sum((1, 2, 3))
            top = set(torch.topk(l1, want).indices.tolist())
            assert set(torch.nonzero(hard.detach()).flatten().tolist()) == top
            checked += 1
    assert checked >= 6


def test_the_hard_mask_is_a_constant_unless_straight_through_is_asked() -> None:
    """The official hard forward keeps the chosen channels and applies no mask: nothing in it depends on
    the logits. ``hard_grad: ste`` keeps the straight-through form, whose gradient reaches them."""
    _, search = _search()
    st = search.step_masks()
    assert not any(h.requires_grad for h in st.hard) and all(w.requires_grad for w in st.soft)
    _, search = _search(S2HOptions(hard_grad="ste"))
    st = search.step_masks()
    (st.hard[3] * torch.arange(len(st.hard[3]), dtype=torch.float32)).sum().backward()
    assert search.logits[3].grad is not None and search.logits[3].grad.abs().sum() > 0


def test_each_gap_term_has_its_direction_and_its_side() -> None:
    """``KL(sg(s) || h)`` is KL from the soft distribution to the hard one and sends no gradient to the
    soft output; ``KL(s || sg(h))`` is the reverse divergence and sends none to the hard output."""
    torch.manual_seed(0)
    soft, hard = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    to_hard, to_soft = gap_losses(soft, hard)
    p, q = soft.softmax(1), hard.softmax(1)
    assert to_hard.item() == pytest.approx((p * (p / q).log()).sum(1).mean().item(), rel=1e-5)
    assert to_soft.item() == pytest.approx(to_hard.item(), rel=1e-5)  # the same value: KL(s || h)
    assert to_hard.item() != pytest.approx((q * (q / p).log()).sum(1).mean().item(), rel=1e-3)
    g_soft, g_hard = torch.autograd.grad(to_hard, [soft, hard], allow_unused=True)
    assert g_soft is None and g_hard.abs().sum() > 0
    g_soft, g_hard = torch.autograd.grad(to_soft, [soft, hard], allow_unused=True)
    assert g_hard is None and g_soft.abs().sum() > 0


def test_balance_equalises_norms_far_from_the_target_and_fades_the_mac_gradient_near_it() -> None:
    task, gap, res = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.5]), torch.tensor([0.01, 0.0])
    d = gap + task * (0.5 / 5.0)  # the task gradient scaled to the gap's norm
    far = balance(task, gap, res, torch.tensor(1.0))
    m = d.norm()
    assert torch.allclose(far, d + res * (m / res.norm()))  # both at the larger norm
    near = balance(task, gap, res, torch.tensor(0.25))
    assert torch.allclose(near, d + res * (m * 0.25 / res.norm()))
    big = torch.tensor([10.0, 0.0])
    assert torch.allclose(balance(task, gap, big, torch.tensor(1.0)), d * (10.0 / m) + big)
    assert torch.equal(balance(task, torch.zeros(2), torch.zeros(2), torch.tensor(1.0)), task)


class _Recorder:
    """A StepContext that records, for every backward call, which gradients it changed."""

    def __init__(self, ctx: StepContext, weights: list[torch.Tensor], masks: list[torch.Tensor]):
        self._ctx, self.weights, self.masks = ctx, weights, masks
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    @staticmethod
    def _snap(ps: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in ps]

    @staticmethod
    def _changed(before, ps) -> bool:
        return any(
            (b is None) != (p.grad is None) or (b is not None and not torch.equal(b, p.grad))
            for b, p in zip(before, ps, strict=True)
        )

    def backward(self, loss, params=None, *, retain_graph=False) -> None:
        w, m = self._snap(self.weights), self._snap(self.masks)
        self._ctx.backward(loss, params, retain_graph=retain_graph)
        self.calls.append(
            {
                "params": params,
                "weights": self._changed(w, self.weights),
                "masks": self._changed(m, self.masks),
            }
        )


class _RecordingS2H(S2H):
    calls: list[dict[str, Any]]

    def training_step(self, model, batch, ctx):
        rec = _Recorder(ctx, list(model.parameters()), self.search.logits)
        out = super().training_step(model, batch, rec)
        self.calls = rec.calls
        self.last_batch = batch
        return out


def _fit_s2h(cls: type[S2H], options: S2HOptions, schedule: Schedule) -> tuple[S2H, torch.nn.Module]:
    """One ``s2h`` phase of ``cls`` on ResNet-20 and noisy blobs (seed 0): the method and its model."""
    spec = JobSpec(method=options, schedule=schedule)
    torch.manual_seed(0)
    model = build_model("resnet20", 4, 3)
    method = cls(spec.method, MethodContext(spec, EXAMPLE, 4, torch.device("cpu"), 10**6))
    model = method.start_phase(method.phases()[0], model)
    ctx = TrainContext(torch.device("cpu"), 0, NoisyBlobs(64, 0), NoisyBlobs(16, 1), bn_batches=0)
    fit(model, method, spec.schedule, ctx, "s2h")
    return method, model


@pytest.mark.parametrize("hard_grad", ["none", "ste"])
def test_the_gap_toward_the_soft_network_moves_the_mask_logits_only(hard_grad: str, tmp_path: Path) -> None:
    method, model = _fit_s2h(
        _RecordingS2H,
        S2HOptions(hard_grad=hard_grad),
        Schedule(epochs=1, max_steps_per_epoch=1, batch_size=16),
    )
    task, to_hard, to_soft, resource = method.calls
    assert task == {"params": None, "weights": True, "masks": True}
    # KL(sg(s) || h) through the hard branch: the weights only, unless the hard mask is straight-through
    assert to_hard == {"params": None, "weights": True, "masks": hard_grad == "ste"}
    assert to_soft == {"params": "masks", "weights": False, "masks": True}  # bit-identical weight grads
    assert resource == {"params": "masks", "weights": False, "masks": True}
    # ...and the restriction is what keeps them so: unrestricted, that loss would move the weights
    search = method.search
    x, _ = method.last_batch
    st = search.step_masks()
    search.masks.values = st.soft
    soft = model(x)
    search.masks.values = st.hard
    hard = model(x)
    to_soft_loss = F.kl_div(
        F.log_softmax(hard.detach(), 1), F.log_softmax(soft, 1), reduction="batchmean", log_target=True
    )
    grads = torch.autograd.grad(to_soft_loss, list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("start", ["searched", "full width"])
def test_the_pruned_network_is_the_masked_hard_network_in_the_target_band(start: str) -> None:
    """At an arbitrary point of the search, or at full width (a run too short to move, or a large model:
    1.000 for 0.5 was measured), the network the job returns is the masked hard network at widths
    stepped into [target - 0.02, target], and its counted MACs say so."""
    model, search = _search(seed=3)
    if start == "full width":
        with torch.no_grad():
            for s, u in zip(search.spaces, search.logits, strict=True):
                u.copy_(max_init_logits(s, 1.0))
    dense = count_macs(model, EXAMPLE)
    spec = JobSpec(method=S2HOptions())
    method = S2H(spec.method, MethodContext(spec, EXAMPLE, 4, torch.device("cpu"), dense))
    method.search = search
    model.train()
    for _ in range(3):  # BatchNorm statistics of the hard network, as training leaves them
        _Branch(model, search, hard=True)(torch.randn(16, 3, SIZE, SIZE))
    with torch.no_grad():
        searched = float(search.macs(search.step_masks().hard_widths)) / dense
    method.fit_to_target()
    x = torch.randn(8, 3, SIZE, SIZE)
    masked = logits(_Branch(model, search, hard=True), x, torch.device("cpu"))
    widths = search.step_masks().hard_widths
    pruned = method.finalize(model)
    achieved = count_macs(pruned, EXAMPLE) / dense
    assert 0.48 <= achieved <= 0.5 and (start == "searched" or searched > 0.9), (searched, achieved)
    assert method.ctx.details["hard_macs_ratio"] == pytest.approx(achieved)
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in build_model("resnet20", 4, 3).parameters()
    )
    out = logits(pruned, x, torch.device("cpu"))
    assert torch.allclose(out, masked, atol=1e-5, rtol=1e-5)
    assert method.ctx.details["widths"][0] == int(widths[0])


# --- a whole run on digits, with and without the gap loss ---

TARGET = 0.5


def _run_spec(gap_weight: float) -> JobSpec:
    return parse_spec(
        {
            "model": {"name": "resnet20"},
            "data": {"name": "digits"},
            "method": {"name": "s2h", "gap_weight": gap_weight},
            "target": {"macs_ratio": TARGET, "round_to": 1},
            "schedule": {"dense_epochs": 3, "epochs": 8, "batch_size": 64},
            "export": {"formats": ["safetensors"]},
            "seed": 1,
            "device": "cpu",
        }
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[float, Any]:
    return {w: run(_run_spec(w), tmp_path_factory.mktemp(f"s2h-gap{w}")) for w in (1.0, 0.0)}


def test_the_hard_network_meets_the_target_and_is_what_was_exported(runs) -> None:
    report = runs[1.0].report
    assert abs(report.achieved_macs_ratio - TARGET) <= 0.02
    assert report.method_details["hard_macs_ratio"] == pytest.approx(report.achieved_macs_ratio, abs=1e-6)
    assert report.finalize_rel_diff is not None and report.finalize_rel_diff < 1e-4
    trained = [p.name for p in report.phases if p.epochs]
    assert trained == ["dense", "s2h"], "one stage: no fine-tuning phase"


def test_each_epoch_reports_soft_and_hard_networks_gap_and_widths(runs) -> None:
    result = runs[1.0]
    history = [r for r in result.report.history if r.phase == "s2h"]
    for r in history:
        assert set(r.views) == {"hard", "soft"} and r.top1 == r.views["hard"]
        assert r.metrics["top1_gap"] == pytest.approx(r.views["soft"] - r.views["hard"])
        assert {"kl_soft_hard", "hard_macs_ratio", "expected_macs_ratio"} <= set(r.metrics)
        assert r.macs == round(r.metrics["hard_macs_ratio"] * result.report.dense.macs)
        assert len(r.metrics["expected_widths"]) == len(result.report.groups)
    # the widths move from the full network (where the search starts) to the target; whether the first
    # epoch lands above or below the target depends on float summation order (threads), so not asserted
    assert all(r.metrics["hard_macs_ratio"] < 0.9 for r in history)
    assert abs(history[-1].metrics["hard_macs_ratio"] - TARGET) <= 0.02
    assert history[0].metrics["expected_widths"] != history[-1].metrics["expected_widths"]
    assert (result.workdir / list_metric_file("expected_widths")).read_bytes().startswith(b"\x89PNG")


def test_the_gap_loss_closes_the_soft_hard_gap(runs) -> None:
    def gap(result) -> tuple[float, float]:
        last = [r for r in result.report.history if r.phase == "s2h"][-1]
        return abs(last.metrics["top1_gap"]), last.metrics["kl_soft_hard"]

    (acc_on, kl_on), (acc_off, kl_off) = gap(runs[1.0]), gap(runs[0.0])
    assert acc_on <= 3.0, "the soft-hard accuracy gap at the end is small"
    assert kl_on < kl_off and acc_on <= acc_off


# --- any CNN the engine can group ---

MODELS = {  # model -> input side (the zoo's minimum for torchvision builders)
    "resnet20": 16,
    "resnet56": 16,
    "vgg16_bn": 32,
    "mobilenet_v2": 16,
    "tv:resnet18": 32,
    "tv:mobilenet_v2": 32,
    "tv:efficientnet_b0": 32,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_runs_on_zoo_and_torchvision_cnns(name: str, tmp_path: Path) -> None:
    spec = quick_spec(name, {"name": "s2h", "mask_lr_scale": 40.0}, size=MODELS[name])
    report = run(spec, tmp_path).report
    assert report.achieved_macs_ratio < 0.95, "the width search moved"
    assert report.pruned.params < report.dense.params
    assert report.finalize_rel_diff is not None and report.finalize_rel_diff < 1e-4
    assert set(report.history[-1].views) == {"hard", "soft"}


def test_the_optional_fine_tuning_trains_the_pruned_hard_network(tmp_path: Path) -> None:
    spec = quick_spec("resnet20", {"name": "s2h", "mask_lr_scale": 40.0, "finetune_epochs": 1})
    report = run(spec, tmp_path).report
    assert [p.name for p in report.phases if p.epochs] == ["s2h", "finetune"]
    finetune = [r for r in report.history if r.phase == "finetune"]
    assert finetune and finetune[0].macs == report.pruned.macs and not finetune[0].views
    assert "s2h:start" not in report.bn_recalibration and "finetune:start" in report.bn_recalibration


def _reverse_l1_order(search: WidthSearch, group: int) -> None:
    """Scale the group's filters so that their L1 order within the group reverses."""
    with torch.no_grad():
        l1 = search.l1()[group]
        order = l1.argsort()
        scale = torch.empty_like(l1)
        scale[order] = torch.linspace(4.0, 0.25, len(l1)) / l1[order].clamp_min(1e-12)
        for name, module_idx, root_idx in search.spaces[group].filters:
            w = search.graph.modules[name].weight
            w[module_idx] *= scale[root_idx].view(-1, *([1] * (w.dim() - 1)))


@pytest.mark.parametrize("order", ["fixed", "step"])
def test_fixed_rank_order_keeps_the_first_steps_order_through_training_and_resume(order: str) -> None:
    """``rank_order: fixed`` (the official ``fix_l1_order``): the hard mask's ranking is the one the
    search started with, however the weights move; ``step`` follows the current L1 norms."""
    model, search = _search(S2HOptions(rank_order=order))
    first = [r.clone() for r in search.step_masks().ranks]
    _reverse_l1_order(search, 3)
    now = search.l1_ranks()
    assert not torch.equal(now[3], first[3])
    used = search.step_masks().ranks
    assert torch.equal(used[3], first[3] if order == "fixed" else now[3])
    # the hard mask follows the ranking in use
    n = int(search.step_masks().hard_widths[3])
    assert torch.equal(search.step_masks().hard[3].bool(), used[3] < n)

    spec = JobSpec(method=S2HOptions(rank_order=order), schedule=Schedule(epochs=1))
    method = S2H(spec.method, MethodContext(spec, EXAMPLE, 4, torch.device("cpu"), 10**6))
    method.start_phase(method.phases()[0], model)
    method.search.fixed_ranks = search.fixed_ranks
    state = method.state_dict()
    resumed = S2H(spec.method, MethodContext(spec, EXAMPLE, 4, torch.device("cpu"), 10**6))
    resumed.load_state_dict(state, model)
    assert torch.equal(resumed.search.ranks()[3], first[3] if order == "fixed" else now[3])


class _FitWatchingS2H(S2H):
    """Keeps the logits and the weights as they were when the widths were fixed in the band."""

    at_fit: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def on_epoch_end(self, model, epoch, metrics):
        out = super().on_epoch_end(model, epoch, metrics)
        if self.at_fit is None and self.search.fitted is not None:
            snap = [u.detach().clone() for u in self.search.logits]
            self.at_fit = (snap, [p.detach().clone() for p in model.parameters()])
        return out


@pytest.mark.parametrize("balance", ["norms", "sum"])
def test_the_mask_logits_stop_once_the_widths_are_fixed(balance: str) -> None:
    """The last ``fit_epochs`` train the hard network at its fixed widths; the masks freeze there, as the
    official code's do for its last hard epochs (``sum`` once kept stepping them on the task loss)."""
    method, model = _fit_s2h(
        _FitWatchingS2H,
        S2HOptions(balance=balance, fit_epochs=1, mask_lr_scale=40.0),
        Schedule(epochs=2, max_steps_per_epoch=2, batch_size=16),
    )
    assert method.at_fit is not None, "the widths were fixed after the first epoch"
    logits, weights = method.at_fit
    same = [torch.equal(a, u.detach()) for a, u in zip(logits, method.search.logits, strict=True)]
    assert all(same)
    # the weights train on in the last epoch either way (the hard network at its fixed widths)
    assert any(not torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))
