"""``run(spec, workdir, reporter)``: the one place a job is assembled.

Validate (names, input size, reachable target) before any training; build model and data; train the
dense model if asked; run the method's phases through the one training loop; measure dense and pruned
(MACs, params, top-1), then time them against each other; export and report. Every phase checkpoints under
``workdir/checkpoints``, so the same call again resumes where an interrupted one stopped.

Layout of ``workdir``: ``model.safetensors`` + ``architecture.json`` (+ ``model.pt2``,
``model.torchscript.pt``, ``model.onnx``), ``MODEL_CARD.md``, ``report.json``, ``report.html``,
``training.png``, ``widths.png``, ``tensorboard.tar.gz`` (of ``tensorboard/``), ``checkpoints/``,
``.data/``. Every model file carries the input contract (``contract.InputContract``: the data
pipeline's own mean, std, size, channels, class names).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..artifacts.card import write_card
from ..artifacts.contract import InputContract
from ..artifacts.export import export_model
from ..artifacts.inference import memory_format, prepare_for_inference
from ..artifacts.report import (
    AfterPrune,
    Cost,
    DataSummary,
    GroupWidth,
    PhaseTime,
    Report,
    block_counts,
    layer_widths,
)
from ..artifacts.report_files import write_report
from ..data.loaders import Datasets, load_data
from ..errors import Cancelled, ModelError, NonFiniteModelError, TargetMissedError
from ..graph.budget import TARGET_BAND, check_reachable, floors
from ..graph.groups import PruningGraph
from ..graph.macs import Cost as Size
from ..graph.macs import measure
from ..graph.surgery import describe, rebuild
from ..methods import METHODS, DenseTraining, Method, MethodContext
from ..models.zoo import build_model, get_entry, load_weights
from ..settings import get_settings
from ..spec import JobSpec
from ..speed import layer_times
from ..speed import target as speed_target
from ..speed.latency import LatencyComparison, compare_latency, implausible, pick_threads
from ..speed.target import SpeedSearch
from ..training import distributed
from ..training.batches import default_workers
from ..training.engine import (
    NullReporter,
    Reporter,
    TrainContext,
    cost_of,
    fit,
    has_checkpoint,
    report_pruned,
)
from ..training.evaluation import evaluate, logits
from .tracking import open_tracker

FINALIZE_WARN = 1e-3  # relative logit gap, pruned vs trained network, above which the user is told


@dataclass
class Result:
    report: Report
    workdir: Path
    artifacts: dict[str, Path]  # file name -> path, every file a user downloads


@dataclass(frozen=True)
class _Pruned:
    """A phase whose start pruned the network physically (the first time): its top-1 right then, and
    how many epoch records the job's history held before it."""

    index: int
    at: str
    top1: float


@dataclass(frozen=True)
class _Shape:
    """The model's identity and input shape: enough to describe and rebuild it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return describe(model, self.name, self.num_classes, self.in_channels, self.image_size)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} was asked for but CUDA is not available here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(spec: JobSpec, workdir: Path) -> tuple[Datasets, _Shape, nn.Module]:
    """Data, shape and dense model, validated; fails fast with a PruningError on bad input."""
    entry = get_entry(spec.model.name)  # unknown torchvision names fail here, listing the known ones
    data = load_data(spec.data, cache_dir=workdir / ".data", seed=spec.seed)
    if spec.model.num_classes and spec.model.num_classes != data.num_classes:
        raise ModelError(
            f"model.num_classes is {spec.model.num_classes} but the data set has {data.num_classes} classes"
        )
    if data.image_size < entry.min_input_size:
        raise ModelError(
            f"{spec.model.name} needs inputs of at least {entry.min_input_size} px but the data gives "
            f"{data.image_size} px; set data.image_size"
        )
    shape = _Shape(
        spec.model.name, data.num_classes, spec.model.in_channels or data.in_channels, data.image_size
    )
    if shape.in_channels != data.in_channels:
        raise ModelError(
            f"model.in_channels is {shape.in_channels} but the data has {data.in_channels} channels"
        )
    seed_everything(spec.seed)
    model = build_model(
        shape.name, shape.num_classes, shape.in_channels, spec.model.weights, spec.model.pretrained
    )
    return data, shape, model


def run(
    spec: JobSpec, workdir: str | Path, reporter: Reporter | None = None, *, job_id: str | None = None
) -> Result:
    """Run a whole job into ``workdir``; resumable by calling again with the same arguments. Its
    per-epoch numbers are tracked (``tracking.open_tracker``: TensorBoard, MLflow) under ``job_id``.

    In a job's process group (``launch.py``) every rank calls this; ranks other than 0 train only
    (no reporter, tracker, report nor artifact) and return None."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not distributed.is_main():
        return _run(spec, workdir, NullReporter())  # type: ignore[return-value]
    tracker = open_tracker(spec, workdir, reporter or NullReporter(), get_settings(), job_id)
    try:
        result = _run(spec, workdir, tracker)
        assert result is not None
    except BaseException as err:
        tracker.abort("KILLED" if isinstance(err, Cancelled | KeyboardInterrupt) else "FAILED")
        raise
    result.artifacts.update(tracker.finish(result.report, result.artifacts))
    return result


def _run(spec: JobSpec, workdir: Path, reporter: Reporter) -> Result | None:
    """The job itself: ``run`` without the tracking around it (None on a rank other than 0)."""
    settings = get_settings()
    device = distributed.rank_device(resolve_device(spec.device))
    t_start = time.perf_counter()

    with distributed.main_first():  # rank 0 fills the data cache the others then read
        data, shape, model = prepare(spec, workdir)
    example = torch.zeros(1, shape.in_channels, shape.image_size, shape.image_size)
    dense_graph_t = time.perf_counter()
    graph = PruningGraph(model, example, shape.num_classes, settings.graph_timeout_s)
    asked = spec  # as given: the report's spec (a speed target's MAC ratio is chosen below)
    rates = _latency_rates(spec, model, graph, example, device, workdir, reporter)
    speed: SpeedSearch | None = None
    if spec.target.speedup is not None:
        speed = _speed_target(spec, model, graph, example, shape, device, workdir, reporter, rates)
        spec = spec.model_copy(
            update={"target": spec.target.model_copy(update={"macs_ratio": speed.macs_ratio})}
        )
    t = spec.target
    check_reachable(graph, t.macs_ratio, t.min_channels, spec.channel_step(device.type), t.min_width)
    dense_arch = shape.describe(model)
    model.to(device)  # before anything measures it: with no dense phase, nothing else moves it
    phases: list[PhaseTime] = [
        PhaseTime(name="analyse", wall_s=time.perf_counter() - dense_graph_t, epochs=0)
    ]

    train_ctx = TrainContext(
        device=device,
        seed=spec.seed,
        train=data.train,
        test=data.test,
        reporter=reporter,
        checkpoint_dir=workdir / "checkpoints",
        num_workers=default_workers(spec.data.num_workers, device, settings.max_data_workers),
        describe=shape.describe,
        rebuild=lambda arch: rebuild(arch),
        bn_batches=spec.schedule.bn_recalibration_batches,
        bn_batch_size=spec.schedule.batch_size,
        divergence_factor=settings.divergence_factor,
        example=example,
    )
    mctx = MethodContext(
        spec=spec,
        example=example,
        num_classes=shape.num_classes,
        device=device,
        dense_macs=graph.dense_macs,
        graph_timeout_s=settings.graph_timeout_s,
        latency_rates=rates,
    )
    if rates is not None:  # ``allocation``: what the allocation check below keeps
        mctx.details["latency_rates"] = {
            g.root: round(r, 3) for g, r in zip(graph.groups, rates, strict=True)
        }
    history: list[dict[str, Any]] = []
    bn_points: list[str] = []
    pruned_at: list[_Pruned] = []
    if spec.schedule.dense_epochs:
        dense = DenseTraining(spec.method, mctx)
        model = _run_phases(dense, model, train_ctx, shape, phases, history, bn_points, pruned_at)
    if rates is not None:  # on the weights the method starts from: the allocations' widths depend on them
        t_check = time.perf_counter()
        mctx.latency_rates = _check_allocation(
            spec, model, example, shape, device, workdir, reporter, rates, mctx
        )
        phases.append(PhaseTime(name="allocation check", wall_s=time.perf_counter() - t_check, epochs=0))

    reporter.message("measuring the dense model")
    dense_cost = _measure(model, data, example, device, "dense")
    # Kept (on the CPU) to be timed against the pruned network at the end, alternately, in one process.
    dense_copy = copy.deepcopy(model).cpu()
    method: Method = METHODS.get(spec.method.name)(spec.method, mctx)
    mctx.teacher = _teacher(spec, model, shape, device) if method.wants_teacher() else None
    if (
        mctx.teacher is not None
        and spec.kd.teacher == "dense"
        and not spec.model.weights
        and not spec.model.pretrained
        and not spec.schedule.dense_epochs
    ):
        reporter.message(
            "warning: the KD teacher is the dense model, which is untrained here (no model.weights, no "
            "model.pretrained, no schedule.dense_epochs): distilling from it teaches noise"
        )
    trained = spec.model.weights or spec.model.pretrained or spec.schedule.dense_epochs
    if method.ranks_given_weights and not trained:
        reporter.message(
            f"warning: {spec.method.name} ranks channels by the model's weights, which are untrained here "
            "(no model.weights, no schedule.dense_epochs): it prunes at random; set schedule.dense_epochs "
            "or give weights"
        )
    model = _run_phases(method, model, train_ctx, shape, phases, history, bn_points, pruned_at)
    if not distributed.is_main():  # the training is done; rank 0 finishes the job alone
        return None
    # A random batch, not zeros: the physically pruned network and its exports are checked against it.
    check_input = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(spec.seed))
    model, finalize_diff = _finalize(method, model, shape, train_ctx, check_input, bn_points)

    reporter.message("measuring the pruned model")
    pruned_cost = _measure(model, data, example, device, "pruned")
    check_target(spec.target.macs_ratio, pruned_cost.macs / dense_cost.macs, spec.method.name)
    latency = None
    if spec.export.latency:
        macs_speedup = dense_cost.macs / max(1, pruned_cost.macs)
        t_latency = time.perf_counter()
        latency = _compare_latency(dense_copy, model, example, spec, device, reporter, macs_speedup)
        phases.append(PhaseTime(name="latency timing", wall_s=time.perf_counter() - t_latency, epochs=0))
    else:
        reporter.message("latency not timed (export.latency: false)")
    del dense_copy
    t_export = time.perf_counter()
    pruned_arch = shape.describe(model)
    contract = InputContract.from_datasets(data)  # the normalisation and names the network was trained with
    exported = export_model(model, pruned_arch, workdir, spec.export.formats, check_input, contract=contract)
    for fmt, why in exported.failed.items():  # the job's training is done: report, never fail it
        reporter.message(f"{fmt} export left out: {why}")
    artifacts = {p.name: p for p in exported.paths.values()}
    files = {p.name: p.stat().st_size for p in exported.paths.values()}
    phases.append(PhaseTime(name="export", wall_s=time.perf_counter() - t_export, epochs=0))
    floor = floors(graph, spec.target.min_channels, spec.channel_step(device.type), spec.target.min_width)
    pruned_graph_keep = _group_widths(graph, dense_arch, pruned_arch, floor)
    report = Report.build(
        method=spec.method.name,
        model=spec.model.name,
        data=spec.data.name,
        device=str(device),
        input_shape=list(example.shape[1:]),
        target_macs_ratio=spec.target.macs_ratio,
        dense=dense_cost,
        pruned=pruned_cost,
        latency=latency,
        speed_target=speed,
        data_summary=DataSummary(
            split="validation" if spec.data.validation else "test",
            train_images=len(data.train),
            test_images=len(data.test),
            classes=list(data.classes),
        ),
        files=files,
        spec=asked.model_dump(mode="json"),
        groups=pruned_graph_keep,
        excluded_groups=graph.excluded,
        blocks=block_counts(dense_arch, pruned_arch),
        layers=layer_widths(dense_arch, pruned_arch),
        phases=phases,
        history=history,
        after_prune=after_prune(pruned_at, history, pruned_cost.top1),
        method_details=dict(mctx.details),
        bn_recalibration=bn_points,
        finalize_rel_diff=finalize_diff,
        export_failures=exported.failed,
        total_wall_s=time.perf_counter() - t_start,
    )
    # The card quotes the report's numbers, and the report lists the card among its files.
    card = write_card(report, contract, files, workdir)
    artifacts[card.name] = card
    report = report.model_copy(update={"files": {**files, card.name: card.stat().st_size}})
    for path in write_report(report, workdir):
        artifacts[path.name] = path
    return Result(report, workdir, artifacts)


def _run_phases(
    method: Method,
    model: nn.Module,
    ctx: TrainContext,
    shape: _Shape,
    phases: list[PhaseTime],
    history: list,
    bn_points: list[str],
    pruned_at: list[_Pruned],
) -> nn.Module:
    """Run each of the method's phases through ``fit``; a finished phase is restored from its checkpoint.

    ``start_phase`` runs only for a phase without a checkpoint; what it measured (its time, whether it
    re-estimated BatchNorm statistics, the pruned network's top-1 when it is the job's first physical
    pruning, appended to ``pruned_at``) is stored with the phase's checkpoint, so a resumed job reports
    the same as an uninterrupted one.
    """
    for phase in method.phases():
        meta: dict[str, Any] = {}
        if not has_checkpoint(ctx, phase.name):  # none, or one an older engine wrote: start afresh
            t0 = time.perf_counter()
            arch, cost = shape.describe(model), cost_of(model, ctx.example)
            model = method.start_phase(phase, model.to(ctx.device))
            changed = shape.describe(model) != arch
            meta["bn_recalibrated"] = changed and _after_pruning(model, cost, ctx)
            meta["start_wall_s"] = time.perf_counter() - t0
            if changed and not pruned_at and not any(r.get("event") == "pruned" for r in history):
                meta["top1_pruned"] = evaluate(model, ctx.test, ctx.device)["top1"]  # before recovery
        result = fit(
            model,
            method,
            method.ctx.spec.schedule.model_copy(update={"epochs": phase.epochs}),
            ctx,
            phase.name,
            streams=phase.streams,
            meta=meta,
        )
        model = result.model
        if "top1_pruned" in result.meta:
            pruned_at.append(_Pruned(len(history), f"{phase.name}:start", result.meta["top1_pruned"]))
        history.extend(result.history)
        if "start_wall_s" in result.meta:
            phases.append(PhaseTime(name=f"{phase.name}:start", wall_s=result.meta["start_wall_s"], epochs=0))
        if result.meta.get("bn_recalibrated"):
            bn_points.append(f"{phase.name}:start")
        bn_points.extend(
            f"{phase.name}:epoch {r['epoch'] + 1}" for r in result.history if r.get("bn_recalibrated")
        )
        phases.append(
            PhaseTime(
                name=phase.name, wall_s=sum(r["wall_s"] for r in result.history), epochs=len(result.history)
            )
        )
    return model


def _finalize(
    method: Method,
    model: nn.Module,
    shape: _Shape,
    ctx: TrainContext,
    check_input: torch.Tensor,
    bn_points: list[str],
) -> tuple[nn.Module, float | None]:
    """The method's physically pruned network, checked against the network it evaluated during
    training (its first view): returns it and their largest logit difference relative to the logits'
    scale (``max|a - b| / max(1, max|b|)``; None if not finite), measured before BatchNorm statistics
    are re-estimated. A gap above ``FINALIZE_WARN`` is reported as a message."""
    view = next(iter(method.eval_views(model).values())).module
    reference = logits(view, check_input, ctx.device)
    arch, cost = shape.describe(model), cost_of(model, ctx.example)
    model = method.finalize(model).to(ctx.device)
    pruned = logits(model, check_input, ctx.device)
    diff = (pruned - reference).abs().max().item() / max(1.0, reference.abs().max().item())
    if not diff <= FINALIZE_WARN:
        ctx.reporter.message(
            f"the pruned network's logits differ from the trained network's by {diff:.3g} of their scale"
        )
    if shape.describe(model) != arch and _after_pruning(model, cost, ctx):
        bn_points.append("final")
    return model, diff if math.isfinite(diff) else None


def after_prune(
    pruned_at: list[_Pruned], history: list[dict[str, Any]], final_top1: float | None
) -> AfterPrune | None:
    """The top-1 (percent) of the network right after the job first pruned it physically (BatchNorm
    re-estimated, before any training of it): at a phase's start (``pruned_at``), at an epoch's end (the
    first history record with ``event: pruned``), else at the end (``final_top1``, no recovery)."""
    marks = [
        _Pruned(i + 1, f"{r['phase']}:epoch {r['epoch'] + 1}", r["top1"])
        for i, r in enumerate(history)
        if r.get("event") == "pruned" and r.get("top1") is not None
    ]
    first = min(
        [*marks, *pruned_at], key=lambda p: p.index, default=None
    )  # a tie: the epoch's end came first
    if first is not None:
        return AfterPrune(top1=first.top1, at=first.at, epochs_after=len(history) - first.index)
    return None if final_top1 is None else AfterPrune(top1=final_top1, at="final", epochs_after=0)


def _after_pruning(model: nn.Module, before: Size, ctx: TrainContext) -> bool:
    """``model`` was just pruned physically from a network costing ``before``: the ``pruned`` event, then
    BatchNorm statistics re-estimated. Whether they were."""
    report_pruned(ctx.reporter, before, cost_of(model, ctx.example))
    return ctx.recalibrate(model)


def _measure(
    model: nn.Module, data: Datasets, example: torch.Tensor, device: torch.device, what: str
) -> Cost:
    """MACs and params per sample, test top-1, and the bytes of the weights; NonFiniteModelError when
    the ``what`` network's test logits are not all finite (its numbers would mean nothing)."""
    cost = measure(model, example.to(device))
    scores = evaluate(model, data.test, device)
    if bad := int(scores["non_finite"]):
        raise NonFiniteModelError(
            f"the {what} network's logits are NaN or infinite on {bad} of {len(data.test)} test images "
            "(its weights or BatchNorm statistics are broken); check model.weights, lower schedule.lr, or "
            "raise schedule.bn_recalibration_batches or the epochs"
        )
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return Cost(macs=cost.macs, params=cost.params, top1=scores["top1"], weights_bytes=weights)


def check_target(target: float, achieved: float, method: str) -> None:
    """TargetMissedError unless ``achieved`` (pruned / dense MACs) is in the band every method promises:
    ``[target - budget.TARGET_BAND, target]`` (a hair of float rounding allowed; a speed target's: of
    the ratio its search chose)."""
    low = target - TARGET_BAND
    if not low - 1e-9 <= achieved <= target + 1e-9:
        raise TargetMissedError(
            f"{method} pruned to {achieved:.4f} of the dense MACs, outside [{low:.4f}, {target:.4f}] "
            f"for the target {target:g}"
        )


def _compare_latency(
    dense: nn.Module,
    pruned: nn.Module,
    example: torch.Tensor,
    spec: JobSpec,
    device: torch.device,
    reporter: Reporter,
    macs_speedup: float,
) -> LatencyComparison:
    """Dense vs pruned at batch 1 and the spec's throughput batch, within ``export.latency_max_s``, at
    ``export.latency_threads`` (else the count ``pick_threads`` measures fastest now, on CPU); marked
    implausible where the speed-up is beyond what ``macs_speedup`` (dense / pruned MACs) allows."""
    batches = tuple(dict.fromkeys((1, spec.export.latency_batch_size)))
    budget = spec.export.latency_max_s
    threads, picked = spec.export.latency_threads, False
    if threads is None and device.type == "cpu":
        threads, picked = pick_threads(pruned, tuple(example.shape[1:])), True
    reporter.message(
        f"timing dense vs pruned at batch {', '.join(map(str, batches))} (at most ~{budget:g} s"
        + (f", {threads} thread{'s' * (threads != 1)}{' (measured fastest)' * picked}" if threads else "")
        + ")"
    )
    # Timed as deployed: BatchNorm folded (TorchScript/ONNX hold the folded network) and channels_last
    # (BENCHMARKS.md "speed-cuda" and "speed-cpu-cl": faster on both device types).
    result = compare_latency(
        prepare_for_inference(dense, "cpu"),
        prepare_for_inference(pruned, "cpu"),
        tuple(example.shape[1:]),
        device,
        batch_sizes=batches,
        max_seconds=budget,
        memory_format=memory_format(device),
        amp=spec.schedule.amp,
        threads=threads,
    )
    speedup = max(result.batches, key=lambda b: b.batch_size).speedup.median
    why = implausible(speedup, macs_speedup)
    result = dataclasses.replace(result, folded=True, threads_picked=picked, implausible=why)
    if why:
        reporter.message(f"latency figure not headlined: implausible ({why})")
    if result.busy:
        reporter.message(
            f"the machine was busy while timing (load {result.load_1min:.1f} on {result.cpus} cores): "
            "latency figures are noisier than usual"
        )
    return result


def _speed_target(
    spec: JobSpec,
    model: nn.Module,
    graph: PruningGraph,
    example: torch.Tensor,
    shape: _Shape,
    device: torch.device,
    workdir: Path,
    reporter: Reporter,
    latency_rates: list[float] | None,
) -> SpeedSearch:
    """The remaining-MAC ratio for ``target.speedup`` on ``device`` (``speed_target``); a resumed job
    reuses the ratio its first attempt chose."""
    requested, batch = spec.target.speedup, spec.export.latency_batch_size
    assert requested is not None
    reporter.message(
        f"timing candidate prunings for a {requested:g}x speed-up at batch {batch} on {device} "
        f"(at most ~{spec.target.speedup_search_s:g} s)"
    )
    found = speed_target.load_or_search(
        workdir,
        requested,
        lambda: speed_target.search(
            model,
            example,
            shape.num_classes,
            requested,
            device,
            batch_size=batch,
            round_to=spec.channel_step(device.type),
            min_channels=spec.target.min_channels,
            min_share=spec.target.min_width,
            seconds=spec.target.speedup_search_s,
            amp=spec.schedule.amp,
            graph_timeout_s=get_settings().graph_timeout_s,
            graph=graph,  # built once for the job: it gives the floor
            latency_rates=latency_rates,
        ),
    )
    best = max((p for p in found.probes if p.macs_ratio == found.macs_ratio), key=lambda p: p.speedup)
    reporter.message(
        f"pruning to {found.macs_ratio:.3f} of the MACs: a candidate there measured {best.speedup:.2f}x "
        f"[{best.speedup_low:.2f}, {best.speedup_high:.2f}] for the {requested:g}x asked"
    )
    return found


def _latency_rates(
    spec: JobSpec,
    model: nn.Module,
    graph: PruningGraph,
    example: torch.Tensor,
    device: torch.device,
    workdir: Path,
    reporter: Reporter,
) -> list[float] | None:
    """Per group of the dense graph, its latency rate for ``target.allocation: latency`` (None for
    ``macs``): every layer of the dense network timed once on ``device`` at the throughput batch; a
    resumed job reuses its first attempt's times."""
    if spec.target.allocation != "latency":
        return None
    batch = spec.export.latency_batch_size
    reporter.message(f"timing each layer of the dense network at batch {batch} on {device}")
    times = layer_times.load_or_measure(
        workdir,
        lambda: layer_times.measure_layer_times(
            model,
            tuple(example.shape[1:]),
            graph.cost.layer_names,
            device,
            batch_size=batch,
            amp=spec.schedule.amp,
        ),
    )
    return layer_times.latency_rates(graph, times)


def _check_allocation(
    spec: JobSpec,
    model: nn.Module,
    example: torch.Tensor,
    shape: _Shape,
    device: torch.device,
    workdir: Path,
    reporter: Reporter,
    rates: list[float],
    mctx: MethodContext,
) -> list[float] | None:
    """The rates when the latency allocation of ``model`` runs measurably faster on ``device`` than its
    MAC allocation (``speed_target.check_allocation``), else None: the job allocates by MACs. A resumed
    job reuses its first attempt's verdict."""
    batch, ratio = spec.export.latency_batch_size, spec.target.macs_ratio
    seconds = min(speed_target.ALLOCATION_CHECK_S, spec.export.latency_max_s)
    reporter.message(
        f"checking that the latency allocation runs faster than the MAC allocation at batch {batch} on "
        f"{device} (at most ~{seconds:g} s of timing)"
    )
    check = speed_target.load_or_check(
        workdir,
        ratio,
        lambda: speed_target.check_allocation(
            model,
            example,
            shape.num_classes,
            rates,
            ratio,
            device,
            batch_size=batch,
            round_to=spec.channel_step(device.type),
            min_channels=spec.target.min_channels,
            min_share=spec.target.min_width,
            seconds=seconds,
            amp=spec.schedule.amp,
            graph_timeout_s=get_settings().graph_timeout_s,
        ),
    )
    mctx.details["allocation"] = check.chosen
    mctx.details["allocation_check"] = {
        "speedup": round(check.speedup, 3),
        "speedup_low": round(check.speedup_low, 3),
        "speedup_high": round(check.speedup_high, 3),
        "batch_size": check.batch_size,
    }
    if check.chosen == "macs":
        reporter.message(
            f"allocating by MACs: the latency allocation measured {check.speedup:.2f}x "
            f"[{check.speedup_low:.2f}, {check.speedup_high:.2f}] against it, no faster"
        )
    return rates if check.chosen == "latency" else None


def _teacher(spec: JobSpec, dense: nn.Module, shape: _Shape, device: torch.device) -> nn.Module:
    """The frozen teacher ``spec.kd.teacher`` names: the dense model, or weights from a file."""
    if spec.kd.teacher == "dense":
        teacher = copy.deepcopy(dense)
    else:
        teacher = build_model(shape.name, shape.num_classes, shape.in_channels)
        load_weights(teacher, spec.kd.teacher)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _group_widths(
    graph: PruningGraph, dense_arch: dict[str, Any], pruned_arch: dict[str, Any], floor: list[int]
) -> list[GroupWidth]:
    """Each group's width before and after, read from its root layer's output channels, and its floor."""
    out = []
    for g, lo in zip(graph.groups, floor, strict=True):
        d, p = dense_arch["layers"][g.root], pruned_arch["layers"].get(g.root)
        key = "out_channels" if "out_channels" in d else "out_features"
        kept = p[key] if p else 0
        out.append(
            GroupWidth(
                root=g.root, dense=d[key], pruned=kept, floor=lo, on_floor=kept < d[key] and kept <= lo
            )
        )
    return out
