"""The plots of a report (``training.png``, ``widths.png``, ``metric-<name>.png``): matplotlib's object API
on an Agg canvas (no pyplot, no global backend switch), imported lazily so that reading a report never
loads matplotlib. Torch-free, like ``report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report import (
    MAX_METRIC_PANELS,
    THRESHOLD,
    EpochRecord,
    Report,
    epoch_tick,
    phase_spans,
    pruning_marks,
    scalar_metrics,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_list_metric(report: Report, name: str, path: Path) -> Path:
    """One line per entry of a list-valued metric over the epochs (e.g. S2H's expected width of every
    group); phases shaded, events marked."""
    history = report.history
    rows = [(x, r.metrics.get(name)) for x, r in enumerate(history, start=1)]
    rows = [(x, v) for x, v in rows if isinstance(v, list)]
    fig = _figure((8.0, 4.5))
    if not rows:
        _empty(fig, f"no values of {name}")
        return _save(fig, path)
    ax = fig.subplots()
    width = max(len(v) for _, v in rows)
    for i in range(width):
        points = [(x, v[i]) for x, v in rows if i < len(v)]
        ax.plot(*zip(*points, strict=True), "-", linewidth=1, color=f"C{i % 10}")
    _epoch_axis(ax, history)
    ax.set_ylabel(name)
    ax.set_title(f"{name} ({width} entries): {report.method} on {report.model}")
    _mark_phases(ax, history)
    _mark_events(ax, history)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_training(report: Report, path: Path) -> Path:
    """Top-1 (%) of every evaluated view and MACs (millions per sample) over every epoch of the
    history, then one panel per scalar method metric (at most ``MAX_METRIC_PANELS``); phases shaded,
    events (pruning) as dashed lines, the network before a prune as a hollow marker."""
    history = report.history
    metric_names = scalar_metrics(history)[:MAX_METRIC_PANELS]
    fig = _figure((8.0, 6.0 + 1.6 * len(metric_names)))
    if not history:
        _empty(fig, "no training epochs")
        return _save(fig, path)
    axes = fig.subplots(2 + len(metric_names), 1, sharex=True, squeeze=False)[:, 0]
    ax_top1, ax_macs = axes[0], axes[1]
    xs = list(range(1, len(history) + 1))
    _plot_series(ax_top1, xs, [r.top1 for r in history], "top-1", "tab:blue")
    for k, name in enumerate(dict.fromkeys(v for r in history for v in r.views)):
        _plot_series(ax_top1, xs, [r.views.get(name) for r in history], f"top-1 {name}", f"C{k + 2}", ":")
    _plot_before(ax_top1, xs, [r.top1_before for r in history])
    if ax_top1.get_legend_handles_labels()[0]:
        ax_top1.legend(fontsize=7, loc="lower right")
    ax_top1.set_ylabel("test top-1 (%)")
    _plot_series(ax_macs, xs, [r.macs / 1e6 for r in history], "MACs", "tab:orange")
    _plot_before(ax_macs, xs, [r.macs_before / 1e6 if r.macs_before else None for r in history])
    ax_macs.set_ylabel("MACs (M per sample)")
    for ax, name in zip(axes[2:], metric_names, strict=True):
        values = [v if isinstance(v := r.metrics.get(name), int | float) else None for r in history]
        _plot_series(ax, xs, values, name, "tab:purple")
        line = [
            v if isinstance(v := r.metrics.get(f"{name}{THRESHOLD}"), int | float) else None for r in history
        ]
        _plot_series(ax, xs, line, f"{name}{THRESHOLD}", "tab:gray", "--")  # e.g. EPI's tau
        if any(v is not None for v in line):
            ax.legend(fontsize=7, loc="lower right")
        ax.set_ylabel(name, fontsize=8)
    _epoch_axis(axes[-1], history)
    for ax in axes:
        _mark_phases(ax, history)
        _mark_events(ax, history)
        ax.grid(alpha=0.3)
    ax_top1.set_title(f"{report.method} on {report.model} / {report.data}")
    fig.tight_layout()
    return _save(fig, path)


def _plot_series(
    ax: Any, xs: list[int], ys: list[float | None], label: str, color: str, style: str = "-"
) -> None:
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if points:
        ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3, color=color, label=label)
    elif label == "top-1":
        ax.text(0.5, 0.5, "no top-1 recorded", ha="center", va="center", transform=ax.transAxes)


def _plot_before(ax: Any, xs: list[int], ys: list[float | None]) -> None:
    """Hollow markers: the network just before a prune at that epoch's end."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if points:
        ax.plot(
            *zip(*points, strict=True), "o", markerfacecolor="none", color="tab:red", label="before prune"
        )


def plot_widths(report: Report, path: Path) -> Path:
    """Channels per coupled group, dense vs pruned, as grouped bars."""
    n = len(report.groups)
    fig = _figure((min(max(6.0, 0.3 * n + 2.0), 40.0), 4.5))
    if not n:
        _empty(fig, "no channel groups")
        return _save(fig, path)
    ax = fig.subplots()
    xs = list(range(n))
    ax.bar(
        [x - 0.2 for x in xs], [g.dense for g in report.groups], width=0.4, label="dense", color="tab:gray"
    )
    ax.bar(
        [x + 0.2 for x in xs], [g.pruned for g in report.groups], width=0.4, label="pruned", color="tab:green"
    )
    ax.set_xticks(xs, [g.root for g in report.groups], rotation=90, fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(f"group widths: {report.model}, MACs x{report.achieved_macs_ratio:.3f}")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _mark_phases(ax: Any, history: list[EpochRecord]) -> None:
    """Shade each run of consecutive epochs of one phase and label it at the top of the axes."""
    for k, (phase, first, last) in enumerate(phase_spans(history)):
        ax.axvspan(first - 0.5, last + 0.5, color=("tab:blue", "tab:gray")[k % 2], alpha=0.08, linewidth=0)
        ax.text(
            (first + last) / 2,
            0.97,
            phase,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            color="dimgray",
        )


def _epoch_axis(ax: Any, history: Sequence[EpochRecord]) -> None:
    """Ticks at whole epochs, labelled by their number within their phase (1-based, ``epoch_label``):
    the x position runs over all phases, the phases are shaded and named."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: epoch_tick(history, x)))
    ax.set_xlabel("epoch within its phase (phases shaded)")


def _mark_events(ax: Any, history: list[EpochRecord]) -> None:
    """A dashed line where the network was pruned (``pruning_marks``), labelled."""
    for x, text in pruning_marks(history):
        ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
        ax.text(x, 0.03, f" {text}", transform=ax.get_xaxis_transform(), fontsize=7, color="tab:red")


def _figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _empty(fig: Figure, message: str) -> None:
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=14)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path
