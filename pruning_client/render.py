"""Terminal rendering for the CLI: job tables, one-job summaries and the live `prune watch` view."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .models import (
    TERMINAL,
    Artifact,
    Cost,
    EpochData,
    Event,
    Job,
    JobError,
    JobResult,
    MessageData,
    PhaseData,
    ProgressData,
    PrunedData,
    StatusData,
    Sweep,
    SweepJob,
    SweepState,
)
from .sdk import Client


def _get(d: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def progress_text(job: Job | SweepJob) -> str:
    """``train 40%`` while running; ``done`` once succeeded; where a failed or cancelled job stopped."""
    status = job.status
    if status == "queued":
        return ""
    if status == "succeeded":
        return "done"
    pct = f"{100 * job.progress:.0f}%"
    where = f"{job.phase} {pct}" if job.phase else pct
    return where if status == "running" else f"stopped at {where}"


def jobs_table(jobs: Sequence[Job]) -> str:
    rows = [
        (
            j.id,
            j.status,
            progress_text(j),
            _get(j.spec, "model", "name", default=""),
            _get(j.spec, "data", "name", default=""),
            j.method or _get(j.spec, "method", "name", default=""),
            _target_text(j.spec),
            _fmt(j.result.achieved_macs_ratio if j.result else None, "{:.3f}"),
            _fmt(j.result.pruned.top1 if j.result and j.result.pruned else None, "{:.2f}"),
            j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "",
        )
        for j in jobs
    ]
    header = ("ID", "STATUS", "PROGRESS", "MODEL", "DATA", "METHOD", "TARGET", "MACS", "TOP-1 %", "CREATED")
    return table(rows, header)


def _target_text(spec: dict) -> str:
    """``0.5`` (MAC ratio) or ``2x`` (speed-up), as the job asked."""
    target = spec.get("target") or {}
    if target.get("speedup") is not None:
        return f"{target['speedup']:g}x"
    ratio = target.get("macs_ratio")
    return "" if ratio is None else f"{ratio:g}"


def _fmt(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def artifacts_table(arts: Sequence[Artifact]) -> str:
    """NAME, SIZE (bytes), MEDIA TYPE: one row per artifact, as ``GET /v1/jobs/{id}/artifacts`` lists them."""
    rows = [(a.name, f"{a.size:,}", a.media_type) for a in arts]
    return table(rows, ("NAME", "SIZE", "MEDIA TYPE"))


def result_line(result: JobResult | None) -> str:
    """``MACs 40.55M -> 20.21M (ratio 0.498), params ..., top-1 ...`` from Job.result."""
    if result is None:
        return ""
    dense, pruned = result.dense or Cost(), result.pruned or Cost()
    parts = []
    if dense.macs is not None and pruned.macs is not None:
        ratio = result.achieved_macs_ratio
        parts.append(
            f"MACs {dense.macs / 1e6:.2f}M -> {pruned.macs / 1e6:.2f}M"
            + (f" (ratio {ratio:.3f})" if ratio is not None else "")
        )
    if dense.params is not None and pruned.params is not None:
        parts.append(f"params {dense.params:,} -> {pruned.params:,}")
    if dense.top1 is not None and pruned.top1 is not None:
        parts.append(f"top-1 {dense.top1:.2f}% -> {pruned.top1:.2f}%")
    if result.latency_speedup:
        parts.append(latency_text(result))
    return ", ".join(parts)


def latency_text(result: JobResult) -> str:
    """``latency x1.84 [1.71, 1.97] at batch 8 (faster)``: never a speed-up without its interval and
    verdict when the result has them (results of older jobs carry only the point estimate)."""
    if result.latency_implausible:
        return f"latency not headlined: implausible ({result.latency_implausible})"
    text = f"latency x{result.latency_speedup:.2f}"
    interval = result.latency_speedup_interval
    if interval is not None and len(interval) == 2:
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    if result.latency_batch_size:
        text += f" at batch {result.latency_batch_size}"
    if result.latency_verdict:
        busy = ", busy machine" if result.latency_busy else ""
        text += f" ({result.latency_verdict}{busy})"
    return text


def error_line(error: JobError | None) -> str:
    if error is None:
        return ""
    retry = " (retryable)" if error.retryable else ""
    return f"{error.code}: {error.message or ''}{retry}"


def job_details(job: Job) -> str:
    status = job.status
    if status != "succeeded" and progress_text(job):
        status += f" ({progress_text(job)})"
    if job.cancel_requested and not job.ended:
        status += ", cancel requested"
    rows = [
        ("id", job.id),
        ("status", status),
        ("model", _get(job.spec, "model", "name")),
        ("data", _get(job.spec, "data", "name")),
        ("method", job.method or _get(job.spec, "method", "name")),
        ("target", _get(job.spec, "target", "macs_ratio")),
        ("attempt", f"{job.attempt}/{job.max_attempts or '?'}"),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
        ("error", error_line(job.error)),
        ("result", result_line(job.result)),
    ]
    return "\n".join(f"{k:<9} {v}" for k, v in rows if v not in (None, ""))


def _when(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def final_line(job: Job) -> str:
    if job.status == "succeeded":
        text = result_line(job.result)
        return f"{job.id} succeeded" + (f": {text}" if text else "")
    if job.status == "failed":
        return f"{job.id} failed: {error_line(job.error)}"
    return f"{job.id} {job.status}"


class _NoBar:
    """Stands in for the tqdm bar where stderr is not a terminal: a bar there is ``\r`` frames in a
    log file, so only the lines are printed."""

    n = 0

    def refresh(self) -> None: ...

    def close(self) -> None: ...

    def set_description(self, desc: str, refresh: bool = True) -> None: ...

    def set_postfix(self, **kw: Any) -> None: ...


def _print_line(text: str) -> None:
    print(text, flush=True)


class Watcher:
    """One tqdm bar for the job (0-100 %, described by the current phase, on a terminal only) plus a
    line per phase, epoch (loss, top-1, MACs), message and status change."""

    def __init__(self, job: Job, bar: bool | None = None):
        """``bar``: draw the progress bar (default: when stderr, where it goes, is a terminal)."""
        if bar is None:
            bar = sys.stderr.isatty()
        self.bar: Any
        if bar:
            from tqdm import tqdm  # only `prune watch` on a terminal needs it

            self.write = tqdm.write
            self.bar = tqdm(
                total=100,
                desc=job.phase or job.status,
                unit="%",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| [{elapsed}{postfix}]",
                file=sys.stderr,
            )
        else:
            self.write, self.bar = _print_line, _NoBar()
        self._set(job.progress)

    def _set(self, progress: float) -> None:
        self.bar.n = max(0, min(100, round(100 * float(progress))))
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def show(self, ev: Event) -> bool:
        """Render one event; True when it says the job reached a terminal status."""
        data = ev.data
        if isinstance(data, ProgressData):
            self._set(data.progress)
            if data.phase:
                self.bar.set_description(data.phase, refresh=False)
            if data.epoch is not None:  # counted from 1, as the epoch lines count
                self.bar.set_postfix(epoch=data.epoch)
        elif isinstance(data, PhaseData) and data.epochs:
            self.bar.set_description(str(data.name))
            self.write(f"phase {data.name}: {data.epochs} epochs x {data.steps_per_epoch} steps")
        elif isinstance(data, EpochData | PrunedData | MessageData):
            self.write(data.text or f"{ev.kind}: {data.model_dump_json(exclude_none=True)}")
        elif isinstance(data, StatusData):
            error = f" ({error_line(data.error)})" if data.error else ""
            self.write(f"status: {data.status}{error}")
            if data.status == "succeeded":
                self._set(1.0)
            return data.status in TERMINAL
        return False


def watch(client: Client, job_id: str, poll: float = 1.0) -> Job:
    """Follow a job's event stream with a progress bar until it is terminal; returns the final job."""
    job = client.get(job_id)
    if job.ended:
        return job
    view = Watcher(job)
    last = 0
    try:
        while True:
            with contextlib.closing(client.events(job_id, after=last)) as stream:
                for ev in stream:
                    last = ev.seq if isinstance(ev.seq, int) else last
                    if view.show(ev):
                        break
            job = client.get(job_id)
            if job.ended:
                return job
            time.sleep(poll)  # the stream ended before the job did: pick it up again after `last`
    finally:
        view.close()


# --- sweeps ---


def target_text(target: dict | None) -> str:
    """``0.5 MACs`` or ``2x speed``."""
    target = target or {}
    if target.get("speedup") is not None:
        return f"{target['speedup']:g}x speed"
    return f"{target.get('macs_ratio', '')} MACs"


def sweep_jobs_table(sweep: SweepState) -> str:
    """One row per job of a running sweep: the dense job first, then the children."""
    rows = [
        (
            j.role,
            j.method if j.role == "child" else "(dense training)",
            target_text(j.target) if j.role == "child" else "",
            j.status,
            progress_text(j),
            j.id,
        )
        for j in sweep.jobs
    ]
    planned = sweep.counts.get("planned", 0)
    text = table(rows, ("ROLE", "METHOD", "TARGET", "STATUS", "PROGRESS", "JOB"))
    return text + (f"\n({planned} more once the dense training has ended)" if planned else "")


def _num(v: Any, fmt: str = "{:,}") -> str:
    return "-" if v is None else fmt.format(v)


def leaderboard_table(board: dict) -> str:
    """The ranked children: top-1 with the test images it counts, MACs, params, measured speed-up with
    its interval, training time and MACs, status (a failed child shows its error code)."""
    rows = []
    for r in board.get("rows") or []:
        interval = r.get("speedup_interval")
        speed = _num(r.get("speedup"), "{:.2f}x") + (
            f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        )
        status = r.get("status") + (f" ({_get(r, 'error', 'code')})" if r.get("error") else "")
        rows.append(
            (
                ("*" if r.get("job_id") and r.get("job_id") == board.get("winner") else "")
                + _num(r.get("rank"), "{}"),
                r.get("method"),
                target_text(r.get("target")),
                f"{r['top1']:.2f} (n={r.get('test_images')})" if r.get("top1") is not None else "-",
                _num(r.get("achieved_macs_ratio"), "{:.3f}"),
                _num(r.get("params")),
                speed,
                _num(r.get("training_s"), "{:.1f}"),
                _num(r.get("training_macs"), "{:.3g}"),
                status,
            )
        )
    header = ("RANK", "METHOD", "TARGET", "TOP-1 %", "MACS", "PARAMS", "SPEED-UP [95%]", "TRAIN S",
              "TRAIN MACS", "STATUS")  # fmt: skip
    return table(rows, header)


def sweep_summary(sweep: Sweep) -> str:
    """The leaderboard and a line naming the winner, or the jobs while it runs."""
    board = sweep.leaderboard
    if not board:
        return sweep_jobs_table(sweep)
    lines = [leaderboard_table(board)]
    winner = next((r for r in board.get("rows") or [] if r.get("job_id") == board.get("winner")), None)
    if winner:
        lines.append(
            f"winner by {board.get('rank_by')}: {winner['method']} at {target_text(winner.get('target'))} "
            f"(job {winner['job_id']})"
        )
    else:
        lines.append("no child succeeded: no winner")
    dense = board.get("dense")
    if dense:
        lines.append(
            f"dense training once: job {dense['job_id']} {dense['status']}, "
            f"{_num(dense.get('training_macs'), '{:.3g}')} training MACs; "
            f"all jobs {board.get('training_macs_total', 0):.3g}"
        )
    return "\n".join(lines)


def watch_sweep(client: Client, sweep_id: str, tty: bool | None = None) -> Sweep:
    """Follow a sweep with a live table of its jobs (redrawn in place on a terminal; printed again
    when a job's status changes otherwise) until it ends; returns the final sweep."""
    tty = sys.stdout.isatty() if tty is None else tty
    shown, height = None, 0
    for ev in client.sweep_events(sweep_id):
        snap = ev.data
        text = sweep_jobs_table(snap)
        key = text if tty else [(j.id, j.status) for j in snap.jobs]
        if key != shown:
            if tty and height:
                sys.stdout.write(f"\x1b[{height}F\x1b[J")  # back to the table's first line, clear below
            line = f"sweep {sweep_id}: {snap.status} {100 * snap.progress:.0f}%"
            print(f"{line}\n{text}", flush=True)
            shown, height = key, text.count("\n") + 2
        if ev.kind == "status":
            break
    return client.get_sweep(sweep_id)
