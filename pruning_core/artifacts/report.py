"""``report.json`` of a pruning job: its model, derived numbers and one-line summaries; ``report_plots``
draws its plots (``training.png``, ``widths.png``, ...), ``report_html`` renders ``report.html`` from it
and ``report_files.write_report`` writes them all.

Torch-free on purpose: the API reads and serves reports without importing torch. Derived numbers
(MACs / params ratios, latency speedup) are computed here from the dense and pruned costs and the
latency comparison by ``Report.build`` and re-checked whenever a report is validated, so a report
cannot claim a ratio its own measurements contradict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import PruningError

REPORT_FORMAT = "pruning-core/report-v2"  # v2: latency compared dense vs pruned, with intervals
REPORT_FILE = "report.json"
TRAINING_PLOT = "training.png"
WIDTHS_PLOT = "widths.png"


class ReportError(PruningError):
    code = "bad_report"


class _Record(BaseModel):
    # from_attributes: a dataclass with the same fields (macs.Cost, latency.LatencyStats) validates too.
    model_config = ConfigDict(extra="forbid", frozen=True, from_attributes=True)


class Estimate(_Record):
    """A median and its distribution-free interval of coverage ``confidence`` (``latency.Estimate``)."""

    median: float = Field(gt=0)
    low: float = Field(gt=0)
    high: float = Field(gt=0)
    confidence: float = Field(gt=0.0, le=1.0)


class BatchLatency(_Record):
    """Dense vs pruned at one batch size (``latency.BatchTiming``): milliseconds per forward of the
    whole batch, and the speed-up dense / pruned from paired rounds (> 1 is faster). ``verdict`` is
    "faster" or "slower" only when the speed-up's interval clears 1 (by ``latency.NOISE_FLOOR``)."""

    batch_size: int = Field(ge=1)
    dense_ms: Estimate
    pruned_ms: Estimate
    speedup: Estimate
    rounds: int = Field(ge=1)
    forwards: tuple[int, int]
    verdict: Literal["faster", "slower", "no measurable gain"]


class LatencyReport(_Record):
    """How dense and pruned were timed (``latency.LatencyComparison``): on ``device`` with ``threads``
    torch threads, alternately in one process; ``busy``: the 1-minute load average (``load_1min``)
    exceeded the ``cpus`` this process may use. ``batches``: batch 1 first, the throughput batch last."""

    device: str
    threads: int = Field(ge=1)
    cpus: int = Field(ge=1)
    load_1min: float | None = None
    busy: bool
    budget_s: float = Field(ge=0.0)
    wall_s: float = Field(ge=0.0)
    batches: list[BatchLatency] = Field(min_length=1)
    noise_floor: float = Field(0.02, ge=0.0, description="How far the speed-up must clear 1 to count.")
    folded: bool = Field(False, description="Both networks timed with BatchNorm folded, as exported.")
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    amp: bool = Field(False, description="Forwards under fp16 autocast (CUDA jobs with schedule.amp).")
    threads_picked: bool = Field(
        False, description="`threads` measured on the machine (export.latency_threads not given)."
    )
    implausible: str | None = Field(
        None,
        description="Why the speed-up is not to be believed (beyond what the MAC count allows either way); "
        "the figure stays in the report but is not headlined.",
    )


class SpeedProbeRecord(_Record):
    """One timed candidate of a speed target's search (``speed_target.SpeedProbe``)."""

    macs_ratio: float = Field(gt=0.0, le=1.0)
    achieved_macs_ratio: float = Field(gt=0.0, le=1.0)
    speedup: float = Field(gt=0.0)
    speedup_low: float = Field(gt=0.0)
    speedup_high: float = Field(gt=0.0)


class SpeedTarget(_Record):
    """A job's ``target.speedup``: the speed-up ``requested`` at ``batch_size`` on ``device``, the
    remaining-MAC ratio the search chose for it (``macs_ratio``, the job's ``target_macs_ratio``) and its
    probes. The achieved speed-up is the report's latency at that batch (``latency_speedup``)."""

    requested: float = Field(gt=1.0)
    batch_size: int = Field(ge=1)
    device: str
    macs_ratio: float = Field(gt=0.0, le=1.0)
    probes: list[SpeedProbeRecord] = Field(min_length=1)


class Cost(_Record):
    """MACs per input sample, parameter count, test top-1 in percent (0..100), and the bytes of the
    weights (every tensor of the state dict, as safetensors stores them)."""

    macs: int = Field(ge=0)
    params: int = Field(ge=0)
    top1: float | None = Field(None, ge=0.0, le=100.0)
    weights_bytes: int | None = Field(None, ge=0)


class AfterPrune(_Record):
    """The pruned network's test top-1 (percent) right after the job first removed channels physically
    (BatchNorm statistics re-estimated, before any training of it), and the recovery that followed:
    ``at`` says when (``finetune:start``: magnitude at the start of its fine-tuning, S2H and PSAP before a
    ``finetune_epochs`` phase; ``kd:start``: TAS when it builds the searched network (with the
    weights its ``init`` option gives) for its KD phase; ``<phase>:epoch N``: EPI at its trigger epoch
    (``epi:epoch 4``), PSAP at its final cut (``psap:epoch 8``);
    ``final``: at the end, with no training after it: S2H, PSAP with ``settle: 0``), ``epochs_after``
    the epochs trained after it. The report's ``pruned.top1`` is the network after them."""

    top1: float = Field(ge=0.0, le=100.0)
    at: str
    epochs_after: int = Field(ge=0)


class DataSummary(_Record):
    """The images behind the numbers: top-1 is measured on ``split``'s ``test_images`` (``validation``:
    images held out of the training set by ``data.validation``; the test split was not read)."""

    split: str = "test"
    train_images: int = Field(ge=0)
    test_images: int = Field(ge=0)
    classes: list[str]


class GroupWidth(_Record):
    """Channels of one coupled group, named by its root layer, before and after pruning."""

    root: str
    dense: int = Field(ge=1)
    pruned: int = Field(ge=0)
    floor: int = Field(0, ge=0, description="The fewest channels the allocation may keep (target.min_width).")
    on_floor: bool = Field(False, description="Pruned as far as the width floor allows.")


class LayerWidth(_Record):
    """Input and output channels (features for linear layers) of one layer, dense vs pruned."""

    name: str
    dense_in: int = Field(ge=0)
    dense_out: int = Field(ge=0)
    pruned_in: int = Field(ge=0)
    pruned_out: int = Field(ge=0)


class PhaseTime(_Record):
    """Wall-clock seconds and epochs of one phase (dense training, search, fine-tuning, ...)."""

    name: str
    wall_s: float = Field(ge=0.0)
    epochs: int = Field(ge=0)


MetricValue = float | list[float] | None


class EpochRecord(_Record):
    """One epoch of one phase, as ``engine.fit`` records it.

    ``epoch`` is the 0-based index within the phase, as in the checkpoints; people read it 1-based,
    "finetune epoch 1" (``epoch_label``): the job's events (``worker.reporter`` adds 1), the CLI,
    ``prune watch``, the plots' axes and ``report.html`` all count from 1.

    ``train_loss``: mean training loss; ``top1`` (percent) and ``test_loss``: the method's main network
    on the test split; ``macs``: MACs per sample of that network at the epoch's end; ``train_macs``: the
    forward MACs its training really computed over the epoch (every sample, every forward; a backward
    costs about twice as much again); ``lr``: the main parameter set's learning rate. ``wall_s``: the
    epoch's training steps in seconds (not its evaluation); ``cpu_s``: the CPU seconds this process
    spent on them (every thread): unlike ``wall_s``, it does not grow while other work holds the cores.
    ``views``: top-1 of every network the method evaluates (e.g. S2H's soft and hard networks).
    ``metrics``: the method's own numbers (scalars, or lists such as per-layer ratios).
    ``event`` names something that happened at the end of the epoch: ``"pruned"``, with ``top1_before``
    and ``macs_before`` the network before removal and ``bn_recalibrated`` whether BatchNorm statistics
    were re-estimated before it was evaluated again.
    """

    phase: str
    epoch: int = Field(ge=0)
    train_loss: float | None = None
    top1: float | None = Field(None, ge=0.0, le=100.0)
    test_loss: float | None = None
    macs: int = Field(ge=0)
    train_macs: int | None = Field(None, ge=0)
    lr: float | None = None
    wall_s: float = Field(ge=0.0)
    cpu_s: float | None = Field(None, ge=0.0)
    views: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    event: str | None = None
    top1_before: float | None = Field(None, ge=0.0, le=100.0)
    macs_before: int | None = Field(None, ge=0)
    bn_recalibrated: bool | None = None


class Report(_Record):
    """Everything a finished job reports. Build it with ``Report.build``.

    ``input_shape`` is one sample's shape (C, H, W): MACs are per sample. Ratios are pruned / dense;
    ``latency_speedup`` is the point estimate (median of the paired rounds, > 1 means faster) at the
    throughput batch, ``None`` unless ``latency`` was measured: read it with ``latency``'s interval
    and verdict, never alone. ``files``: bytes of each exported model file.
    """

    format: Literal["pruning-core/report-v2"] = REPORT_FORMAT
    method: str
    model: str
    data: str
    device: str
    input_shape: list[int]
    target_macs_ratio: float = Field(gt=0.0, le=1.0)
    achieved_macs_ratio: float = Field(ge=0.0)
    params_ratio: float = Field(ge=0.0)
    latency_speedup: float | None = Field(None, gt=0.0)
    dense: Cost
    pruned: Cost
    latency: LatencyReport | None = None
    speed_target: SpeedTarget | None = None
    data_summary: DataSummary | None = None
    files: dict[str, int] = Field(default_factory=dict)
    groups: list[GroupWidth]
    excluded_groups: dict[str, str] = Field(
        default_factory=dict, description="Channel groups left unpruned (root layer -> why)."
    )
    blocks: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Residual blocks per stage, [dense, pruned] (stage -> counts); empty for a model "
        "without stages of residual blocks (width pruning only).",
    )
    layers: list[LayerWidth]
    phases: list[PhaseTime]
    history: list[EpochRecord]
    after_prune: AfterPrune | None = Field(
        None, description="Top-1 right after the physical pruning, before recovery training (AfterPrune)."
    )
    method_details: dict[str, Any] = Field(default_factory=dict)
    bn_recalibration: list[str] = Field(
        default_factory=list, description="Where BatchNorm statistics were re-estimated after pruning."
    )
    finalize_rel_diff: float | None = Field(
        None,
        ge=0.0,
        description="Largest logit difference between the physically pruned network and the (masked) "
        "network the method trained, relative to the logits' scale; ~1e-6 when removal is exact.",
    )
    export_failures: dict[str, str] = Field(
        default_factory=dict, description="Export formats left out, each with the one-line reason."
    )
    total_wall_s: float | None = Field(None, ge=0.0)
    spec: dict[str, Any]

    @classmethod
    def build(
        cls,
        *,
        method: str,
        model: str,
        data: str,
        device: str,
        input_shape: Sequence[int],
        target_macs_ratio: float,
        dense: Cost | Any,
        pruned: Cost | Any,
        spec: dict[str, Any],
        latency: LatencyReport | Any | None = None,
        speed_target: SpeedTarget | Any | None = None,
        data_summary: DataSummary | Any | None = None,
        files: dict[str, int] | None = None,
        groups: Iterable[GroupWidth | Any] = (),
        excluded_groups: dict[str, str] | None = None,
        blocks: dict[str, list[int]] | None = None,
        layers: Iterable[LayerWidth | Any] = (),
        phases: Iterable[PhaseTime | Any] = (),
        history: Iterable[EpochRecord | Any] = (),
        after_prune: AfterPrune | Any | None = None,
        method_details: dict[str, Any] | None = None,
        bn_recalibration: Iterable[str] = (),
        finalize_rel_diff: float | None = None,
        export_failures: dict[str, str] | None = None,
        total_wall_s: float | None = None,
    ) -> Report:
        """A report whose ratios and speedup are computed from ``dense``, ``pruned`` and ``latency``.

        Costs and rows may be the models here or objects with the same attributes (``macs.Cost``,
        ``latency.LatencyComparison``). Raises ``ValueError`` (or pydantic's ``ValidationError``).
        """
        dense, pruned = Cost.model_validate(dense), Cost.model_validate(pruned)
        latency = LatencyReport.model_validate(latency) if latency is not None else None
        return cls(
            method=method,
            model=model,
            data=data,
            device=device,
            input_shape=list(input_shape),
            target_macs_ratio=target_macs_ratio,
            **derived_ratios(dense, pruned, latency),
            dense=dense,
            pruned=pruned,
            latency=latency,
            speed_target=SpeedTarget.model_validate(speed_target) if speed_target is not None else None,
            data_summary=data_summary,
            files=files or {},
            groups=list(groups),
            excluded_groups=excluded_groups or {},
            blocks=blocks or {},
            layers=list(layers),
            phases=list(phases),
            history=list(history),
            after_prune=AfterPrune.model_validate(after_prune) if after_prune is not None else None,
            method_details=method_details or {},
            bn_recalibration=list(bn_recalibration),
            finalize_rel_diff=finalize_rel_diff,
            export_failures=export_failures or {},
            total_wall_s=total_wall_s,
            spec=spec,
        )

    @model_validator(mode="after")
    def _derived_fields_agree(self) -> Report:
        expected = derived_ratios(self.dense, self.pruned, self.latency)
        for name, want in expected.items():
            got = getattr(self, name)
            if (got is None) != (want is None) or (
                want is not None and not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
            ):
                raise ValueError(f"{name} is {got} but the dense and pruned costs give {want}")
        return self


def derived_ratios(
    dense: Cost, pruned: Cost, latency: LatencyReport | None = None
) -> dict[str, float | None]:
    """``achieved_macs_ratio`` and ``params_ratio`` (pruned / dense) and ``latency_speedup``."""
    if dense.macs <= 0 or dense.params <= 0:
        raise ValueError("the dense model must have positive MACs and params")
    return {
        "achieved_macs_ratio": pruned.macs / dense.macs,
        "params_ratio": pruned.params / dense.params,
        "latency_speedup": throughput(latency).speedup.median if latency is not None else None,
    }


def throughput(latency: LatencyReport) -> BatchLatency:
    """The comparison at the largest batch timed (the throughput batch)."""
    return max(latency.batches, key=lambda b: b.batch_size)


Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


def top1_interval(top1: float, n: int) -> tuple[float, float]:
    """Wilson's 95 % interval (percent) of a top-1 of ``top1`` percent measured on ``n`` images: how
    far the same network might score on another draw of as many images."""
    p, z2 = top1 / 100.0, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def top1_change_margin(dense: float, pruned: float, n: int) -> float:
    """Half-width (points) of a 95 % interval of pruned − dense top-1 on the same ``n`` images, treating
    the two as independent (conservative: the networks err on many of the same images)."""
    var = sum(q / 100 * (1 - q / 100) for q in (dense, pruned)) / n
    return 100 * Z95 * math.sqrt(var)


def headline(r: Report) -> str:
    """The report at a glance: ``2.0x fewer MACs · 2.2x fewer params · top-1 -0.4 ± 1.5 points
    (87.2 -> 86.8 %, 10,000 images) · top-1 right after pruning 61.2 %, after recovery 86.8 % · speed-up
    x1.84 [1.71, 1.97] on cpu, batch 8 (faster)``."""
    parts = [
        f"{1 / r.achieved_macs_ratio:.1f}x fewer MACs" if r.achieved_macs_ratio < 1 else "MACs unchanged",
        f"{1 / r.params_ratio:.1f}x fewer params" if r.params_ratio < 1 else "params unchanged",
    ]
    if r.dense.top1 is not None and r.pruned.top1 is not None:
        change = r.pruned.top1 - r.dense.top1
        n = r.data_summary.test_images if r.data_summary else None
        margin = f" ± {top1_change_margin(r.dense.top1, r.pruned.top1, n):.1f}" if n else ""
        where = f", {n:,} images" if n else ""
        parts.append(
            f"top-1 {change:+.1f}{margin} points ({r.dense.top1:.1f} -> {r.pruned.top1:.1f} %{where})"
        )
    if r.after_prune is not None and r.pruned.top1 is not None:
        recovery = (
            f"after recovery {r.pruned.top1:.1f} %" if r.after_prune.epochs_after else "no training after it"
        )
        parts.append(f"top-1 right after pruning {r.after_prune.top1:.1f} %, {recovery}")
    if r.latency is not None:
        b = throughput(r.latency)
        if r.latency.implausible:
            parts.append("latency implausible, not headlined")
        else:
            s, busy = b.speedup, ", busy machine" if r.latency.busy else ""
            parts.append(
                f"speed-up x{s.median:.2f} [{s.low:.2f}, {s.high:.2f}] on {r.latency.device}, batch "
                f"{b.batch_size} ({b.verdict}{busy})"
            )
    return " · ".join(parts)


def latency_line(latency: LatencyReport) -> str:
    """``latency x1.84 [1.71, 1.97] at batch 8 (faster)``: the throughput batch's speed-up, its 95 %
    interval and verdict, and " (busy machine)" when the load says so; an implausible one says so instead."""
    b = throughput(latency)
    s = b.speedup
    if latency.implausible:
        return f"latency not headlined: implausible at batch {b.batch_size} ({latency.implausible})"
    busy = ", busy machine" if latency.busy else ""
    return f"latency x{s.median:.2f} [{s.low:.2f}, {s.high:.2f}] at batch {b.batch_size} ({b.verdict}{busy})"


def block_counts(dense_arch: dict[str, Any], pruned_arch: dict[str, Any]) -> dict[str, list[int]]:
    """``{stage: [dense blocks, pruned blocks]}`` from two ``surgery.describe`` descriptions."""
    dense, pruned = dense_arch.get("blocks", {}), pruned_arch.get("blocks", {})
    return {name: [n, pruned.get(name, n)] for name, n in dense.items()}


def layer_widths(dense_arch: dict[str, Any], pruned_arch: dict[str, Any]) -> list[LayerWidth]:
    """Conv and linear layer widths from two ``surgery.describe`` architecture descriptions."""
    pruned_layers = pruned_arch["layers"]
    rows = []
    for name, d in dense_arch["layers"].items():
        p = pruned_layers.get(name)
        if p is None or "num_features" in d:  # norms only mirror their conv
            continue
        rows.append(LayerWidth(name=name, **_io(d, "dense"), **_io(p, "pruned")))
    return rows


def _io(shape: dict[str, Any], prefix: str) -> dict[str, int]:
    if "in_features" in shape:
        return {f"{prefix}_in": shape["in_features"], f"{prefix}_out": shape["out_features"]}
    return {f"{prefix}_in": shape["in_channels"], f"{prefix}_out": shape["out_channels"]}


# --- files ---


def read_report(path: str | Path) -> Report:
    """Read a ``report.json`` (or the directory holding it); any problem is one ``ReportError`` line."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read report {path}: {err.__class__.__name__}") from None
    try:
        return Report.model_validate(json.loads(text))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path.name} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(report)"
        raise ReportError(
            f"{path.name} is not a valid report ({err.error_count()} problem(s); {where}: {first['msg']})"
        ) from None


# --- plots ---


MAX_METRIC_PANELS = 4


THRESHOLD = "_threshold"  # a scalar metric "<name>_threshold" is drawn on the panel of "<name>"


def scalar_metrics(history: Sequence[EpochRecord]) -> list[str]:
    """Names of the method metrics that are scalars in some epoch, in first-seen order (a
    ``<name>_threshold`` beside a ``<name>`` is not a panel of its own)."""
    names: dict[str, None] = {}
    for r in history:
        for k, v in r.metrics.items():
            if isinstance(v, int | float):
                names.setdefault(k)
    return [n for n in names if not (n.endswith(THRESHOLD) and n.removesuffix(THRESHOLD) in names)]


def list_metrics(history: Sequence[EpochRecord]) -> list[str]:
    """Names of the method metrics that are lists (per group, per layer) in some epoch, first seen first."""
    names: dict[str, None] = {}
    for r in history:
        for k, v in r.metrics.items():
            if isinstance(v, list):
                names.setdefault(k)
    return list(names)


def list_metric_file(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return f"metric-{safe}.png"


# --- one line per epoch (the CLI and `prune watch` both print it) ---


def epoch_label(phase: str, epoch: int) -> str:
    """``finetune epoch 3`` for the record with 0-based ``epoch`` 2: the one way people see an epoch."""
    return f"{phase} epoch {int(epoch) + 1}"


def epoch_line(r: dict[str, Any]) -> str:
    """``finetune epoch 3: loss 0.1234, top-1 97.50% (soft 98.10%), MACs 1.26M, indicator 0.981``:
    a record (or an epoch event's data) as one line; method metrics that are scalars come last."""
    parts = [epoch_label(r.get("phase", "?"), r.get("epoch", 0)) + ":"]
    if r.get("train_loss") is not None:
        parts.append(f"loss {r['train_loss']:.4f},")
    if r.get("top1") is not None:
        views = {k: v for k, v in (r.get("views") or {}).items() if v is not None}
        extra = ", ".join(f"{k} {v:.2f}%" for k, v in views.items())
        parts.append(f"top-1 {r['top1']:.2f}%" + (f" ({extra})," if extra else ","))
    if r.get("macs") is not None:
        parts.append(f"MACs {r['macs'] / 1e6:.2f}M,")
    for k, v in (r.get("metrics") or {}).items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            parts.append(f"{k} {v:.4g},")
    line = " ".join(parts).rstrip(",")
    if r.get("event") == "pruned" and r.get("macs_before") is not None:
        before = f"top-1 {r['top1_before']:.2f}%, " if r.get("top1_before") is not None else ""
        line += f" (pruned from {before}MACs {r['macs_before'] / 1e6:.2f}M)"
    elif r.get("event"):
        line += f" ({r['event']})"
    return line


def epoch_tick(history: Sequence[EpochRecord], x: float) -> str:
    """The label of the plots' x position ``x`` (1..n over all phases): the epoch's number within
    its phase, 1-based as ``epoch_label`` writes it; "" between epochs and outside the history."""
    i = round(x)
    return str(history[i - 1].epoch + 1) if abs(x - i) < 1e-6 and 1 <= i <= len(history) else ""


def pruning_marks(history: Sequence[EpochRecord]) -> list[tuple[float, str]]:
    """``(x, label)`` of each place the network changed, x on the plots' axis (epoch positions 1..n):
    after an epoch with an ``event`` ("pruned after psap epoch 3"), and between phases where the MACs
    dropped (a method that prunes when its phase starts: "pruned before finetune epoch 1")."""
    marks: list[tuple[float, str]] = []
    for x, rec in enumerate(history, start=1):
        prev = history[x - 2] if x > 1 else None
        if prev is not None and prev.phase != rec.phase and not prev.event and rec.macs < prev.macs:
            marks.append((x - 0.5, f"pruned before {epoch_label(rec.phase, rec.epoch)}"))
        if rec.event:
            marks.append((x + 0.5, f"{rec.event} after {epoch_label(rec.phase, rec.epoch)}"))
    return marks


def phase_spans(history: Sequence[EpochRecord]) -> list[tuple[str, int, int]]:
    """``(phase, first, last)`` for each run of consecutive records of one phase; 1-based positions."""
    spans: list[tuple[str, int, int]] = []
    for i, rec in enumerate(history, start=1):
        if spans and spans[-1][0] == rec.phase:
            spans[-1] = (rec.phase, spans[-1][1], i)
        else:
            spans.append((rec.phase, i, i))
    return spans
