"""What the templates show, computed here so templates stay plain: a job's table cells, ages, sizes,
and the training chart's SVG polylines (the page's script redraws them the same way as epochs arrive)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from store.models import Job

from ..schemas import utc

CHART_W, CHART_H, PAD = 600, 200, 24


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) and not isinstance(value, bool) else ""


def age(when: datetime | None, now: datetime | None = None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: how long ago."""
    if when is None:
        return ""
    seconds = int(((now or datetime.now(UTC)) - utc(when)).total_seconds())  # type: ignore[operator]
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def size(n: int) -> str:
    """Bytes as ``1.2 MB`` (decimal units)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def target_text(spec: dict[str, Any]) -> str:
    """``0.5`` (MAC ratio) or ``2x`` (speed-up), as the job asked."""
    target = spec.get("target") or {}
    if target.get("speedup") is not None:
        return _num(target["speedup"], "{:g}x")
    return _num(target.get("macs_ratio"), "{:g}")


@dataclass(frozen=True)
class JobRow:
    """One job as the jobs table and the job page show it."""

    id: str
    status: str
    method: str
    model: str
    data: str
    target: str
    macs: str  # achieved MACs: ``20.21M (0.498)``
    top1: str
    speedup: str
    age: str
    progress: float
    phase: str
    error: str


def job_row(job: Job) -> JobRow:
    result = job.result or {}
    pruned_macs = _get(result, "pruned", "macs")
    ratio = _num(result.get("achieved_macs_ratio"), "{:.3f}")
    macs = f"{pruned_macs / 1e6:.2f}M ({ratio})" if isinstance(pruned_macs, int | float) else ratio
    error = f"{job.error_code}: {job.error_message or ''}" if job.error_code else ""
    return JobRow(
        id=job.id,
        status=str(job.status),
        method=job.method,
        model=str(_get(job.spec, "model", "name") or ""),
        data=str(_get(job.spec, "data", "name") or ""),
        target=target_text(job.spec),
        macs=macs,
        top1=_num(_get(result, "pruned", "top1"), "{:.2f}%"),
        speedup=_num(result.get("latency_speedup"), "x{:.2f}"),
        age=age(job.created_at),
        progress=float(job.progress or 0.0),
        phase=job.phase or "",
        error=error,
    )


def chart_points(values: list[float | None], lo: float, hi: float) -> str:
    """An SVG polyline's ``points`` for ``values`` (one per epoch) scaled into the chart box; the
    page's script (chart.js's ``points``) computes the same."""
    n, span = len(values), (hi - lo) or 1.0
    step = (CHART_W - 2 * PAD) / max(n - 1, 1)
    pts = [
        f"{PAD + i * step:.1f},{CHART_H - PAD - (v - lo) / span * (CHART_H - 2 * PAD):.1f}"
        for i, v in enumerate(values)
        if v is not None
    ]
    return " ".join(pts * 2 if len(pts) == 1 else pts)  # one point: a dot (round line caps)


def chart(epochs: list[dict[str, Any]]) -> dict[str, str]:
    """Polylines of top-1 (0..100 %) and training loss (0..its maximum) over the epoch events."""
    top1 = [e.get("top1") if isinstance(e.get("top1"), int | float) else None for e in epochs]
    loss = [e.get("train_loss") if isinstance(e.get("train_loss"), int | float) else None for e in epochs]
    top_loss = max((v for v in loss if v is not None), default=1.0)
    return {"top1": chart_points(top1, 0.0, 100.0), "loss": chart_points(loss, 0.0, top_loss)}
