"""Sweeps: several methods and targets on one model, each an ordinary job linked by ``Job.sweep_id``.

A sweep's life, computed from its jobs' rows (the truth), never from a callback alone:

1. created with its dense job (``stage`` dense) when the spec trains the dense model first, else with
   every child at once (``stage`` children);
2. when the dense job has succeeded, ``advance`` registers its ``model.safetensors`` as an upload of
   the owner and creates the children from it (``stage`` dense -> children, a compare-and-set, so the
   worker that finished the dense job and the reaper never both create them);
3. when every job of the sweep has ended, ``advance`` writes the leaderboard and its files and ends the
   sweep (``status`` running -> succeeded / cancelled / failed, a compare-and-set).

``advance`` is called by whoever may have ended a sweep's job: the worker after each job of a sweep,
the reaper on every pass (a worker killed between its job's end and the call), the API after a cancel.
Every function takes an open session; the caller commits (the enqueueing of returned job ids after).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from . import leaderboard, repo
from .files import media_type
from .models import TERMINAL, Job, JobStatus, Sweep, SweepStage, utcnow
from .objects import ObjectStore, copy_object

DENSE_WEIGHTS = "model.safetensors"  # the dense job's artifact the children start from
FILES = ("leaderboard.json", "sweep.html")


def create_sweep(
    s: Session,
    owner: str,
    request: dict[str, Any],
    rank_by: str,
    children: list[dict[str, Any]],
    dense: dict[str, Any] | None,
    *,
    max_attempts: int = 3,
) -> tuple[Sweep, list[str]]:
    """Insert a sweep with its first jobs: the dense job alone when ``dense`` is given (the children
    follow from its weights), else every child. Returns the sweep and the ids of the jobs to enqueue."""
    sweep = Sweep(
        owner=owner,
        request=request,
        rank_by=rank_by,
        plan={"children": children},
        stage=SweepStage.DENSE if dense else SweepStage.CHILDREN,
        status=JobStatus.RUNNING,
    )
    s.add(sweep)
    s.flush()
    if dense is not None:
        job = _add_job(s, sweep, dense, max_attempts)
        sweep.dense_job_id = job.id
        return sweep, [job.id]
    return sweep, [_add_job(s, sweep, c, max_attempts).id for c in children]


def _add_job(s: Session, sweep: Sweep, spec: dict[str, Any], max_attempts: int) -> Job:
    job, _ = repo.create_job(
        s, sweep.owner, spec, spec["method"]["name"], max_attempts=max_attempts, sweep_id=sweep.id
    )
    return job


def get_sweep(s: Session, sweep_id: str, owner: str | None = None) -> Sweep | None:
    """The sweep, or None if it does not exist or belongs to another owner (callers answer 404 alike)."""
    sweep = s.get(Sweep, sweep_id)
    if sweep is None or (owner is not None and sweep.owner != owner):
        return None
    return sweep


def list_sweeps(
    s: Session, owner: str, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[Sweep], str | None]:
    """Newest first, keyset-paginated like ``repo.list_jobs`` (ValueError on a malformed cursor)."""
    from sqlalchemy import and_, or_

    limit = max(1, int(limit))
    q = select(Sweep).where(Sweep.owner == owner)
    if cursor:
        created, sweep_id = repo.decode_cursor(cursor)
        q = q.where(or_(Sweep.created_at < created, and_(Sweep.created_at == created, Sweep.id < sweep_id)))
    rows = list(s.scalars(q.order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return page, repo.encode_cursor(page[-1]) if len(rows) > limit else None  # type: ignore[arg-type]


def sweep_jobs(s: Session, sweep_id: str) -> list[Job]:
    """The sweep's jobs, oldest first (the dense job, if any, first)."""
    q = select(Job).where(Job.sweep_id == sweep_id).order_by(Job.created_at, Job.id)
    return list(s.scalars(q.execution_options(populate_existing=True)))


def open_sweep_ids(s: Session) -> list[str]:
    """Sweeps that have not ended, oldest first (the reaper re-checks each)."""
    q = select(Sweep.id).where(Sweep.status == JobStatus.RUNNING).order_by(Sweep.created_at, Sweep.id)
    return list(s.scalars(q))


def request_cancel(s: Session, sweep: Sweep) -> None:
    """Cancel every job of the sweep (queued ones at once, running ones at their next step) and keep
    a dense job's success from starting children."""
    s.execute(
        update(Sweep)
        .where(Sweep.id == sweep.id, Sweep.status == JobStatus.RUNNING)
        .values(cancel_requested=True)
    )
    for job in sweep_jobs(s, sweep.id):
        if job.status not in TERMINAL:
            repo.request_cancel(s, job.id)


def advance(s: Session, sweep_id: str, artifacts: ObjectStore, uploads: ObjectStore) -> list[str]:
    """Move the sweep on as far as its jobs allow (see the module); returns the ids of jobs it created,
    which the caller enqueues after committing. Safe to call any time, from any process."""
    sweep = s.get(Sweep, sweep_id, populate_existing=True)
    if sweep is None or sweep.status != JobStatus.RUNNING:
        return []
    jobs = sweep_jobs(s, sweep_id)
    if sweep.stage == SweepStage.DENSE:
        dense = next((j for j in jobs if j.id == sweep.dense_job_id), None)
        if dense is not None and dense.status not in TERMINAL:
            return []
        if dense is not None and dense.status == JobStatus.SUCCEEDED and not sweep.cancel_requested:
            return _start_children(s, sweep, dense, artifacts, uploads)
    elif any(j.status not in TERMINAL for j in jobs):
        return []
    finish(s, sweep, jobs, artifacts)
    return []


def _start_children(
    s: Session, sweep: Sweep, dense: Job, artifacts: ObjectStore, uploads: ObjectStore
) -> list[str]:
    """The children, each from the dense job's weights (registered as the owner's upload)."""
    art = repo.get_artifact(s, dense.id, DENSE_WEIGHTS)
    if art is None:  # cannot happen for a succeeded dense job; end the sweep rather than hang
        finish(s, sweep, sweep_jobs(s, sweep.id), artifacts, error=("dense_weights_missing", ""))
        return []
    res = s.execute(
        update(Sweep)
        .where(Sweep.id == sweep.id, Sweep.stage == SweepStage.DENSE, Sweep.status == JobStatus.RUNNING)
        .values(stage=SweepStage.CHILDREN)
    )
    if res.rowcount != 1:  # another process started them
        return []
    ref = f"upload:{_weights_upload(s, sweep, art, artifacts, uploads)}"
    ids = []
    for spec in sweep.plan["children"]:
        spec = {**spec, "model": {**spec["model"], "weights": ref}}
        ids.append(_add_job(s, sweep, spec, dense.max_attempts).id)
    return ids


def _weights_upload(s: Session, sweep: Sweep, art: Any, artifacts: ObjectStore, uploads: ObjectStore) -> str:
    """The id of the owner's upload holding the dense weights (an earlier upload of the same bytes, or
    a copy of the artifact as ``sweep-<id>/dense.safetensors`` in the upload store)."""
    if (up := repo.find_upload(s, sweep.owner, "weights", art.sha256)) is not None:
        return up.id
    key = f"sweep-{sweep.id}/dense.safetensors"
    copy_object(artifacts, art.path, uploads, key, art.sha256)
    up = repo.add_upload(
        s,
        sweep.owner,
        "weights",
        f"sweep-{sweep.id}-dense.safetensors",
        key,
        art.size,
        art.sha256,
        "application/octet-stream",
    )
    return up.id


def finish(
    s: Session,
    sweep: Sweep,
    jobs: list[Job],
    artifacts: ObjectStore,
    *,
    error: tuple[str, str] | None = None,
) -> bool:
    """Build the leaderboard, write its files and end the sweep (compare-and-set on ``running``).
    False when another process ended it first."""
    board = build_board(s, sweep, jobs, artifacts)
    dense = board["dense"]
    if error is None and dense is not None and dense["status"] != JobStatus.SUCCEEDED:
        error = (f"dense_{dense['status']}", (dense.get("error") or {}).get("message") or "")
    statuses = {r["status"] for r in board["rows"]}
    if error is None and JobStatus.SUCCEEDED not in statuses and statuses != {JobStatus.CANCELLED}:
        error = ("no_child_succeeded", "no child of the sweep succeeded; each row says why")
    cancelled = (
        sweep.cancel_requested
        or (dense is not None and dense["status"] == JobStatus.CANCELLED)
        or statuses == {JobStatus.CANCELLED}
    )
    status = (
        JobStatus.CANCELLED if cancelled else JobStatus.FAILED if error is not None else JobStatus.SUCCEEDED
    )
    board["status"] = str(status)
    files = _write_files(board, sweep.id, artifacts)
    res = s.execute(
        update(Sweep)
        .where(Sweep.id == sweep.id, Sweep.status == JobStatus.RUNNING)
        .values(
            status=status,
            leaderboard=board,
            winner_job_id=board["winner"],
            files=files,
            finished_at=utcnow(),
            error_code=error[0] if error else None,
            error_message=error[1] if error else None,
        )
    )
    return res.rowcount == 1


def build_board(s: Session, sweep: Sweep, jobs: list[Job], artifacts: ObjectStore) -> dict[str, Any]:
    """The leaderboard as stored in ``leaderboard.json``: the dense job, one row per planned child
    (a child never created, because the dense job failed or the sweep was cancelled, is a row too)."""
    dense_job = next((j for j in jobs if j.id == sweep.dense_job_id), None)
    children = [j for j in jobs if j.id != sweep.dense_job_id]
    rows = [_row(s, j, artifacts) for j in children]
    planned = sweep.plan["children"]
    for spec in planned[len(children) :]:
        rows.append(_unrun_row(spec, sweep, dense_job))
    rows, winner = leaderboard.rank(rows, sweep.rank_by)
    dense = _dense_summary(s, dense_job, artifacts) if dense_job is not None else None
    total = sum(r["training_macs"] or 0 for r in rows) + ((dense or {}).get("training_macs") or 0)
    return {
        "sweep_id": sweep.id,
        "rank_by": sweep.rank_by,
        "status": sweep.status,
        "winner": winner,
        "dense": dense,
        "training_macs_total": total,
        "rows": rows,
    }


def read_report(s: Session, job: Job, artifacts: ObjectStore) -> dict[str, Any] | None:
    """A succeeded job's ``report.json``, parsed; None without one."""
    art = repo.get_artifact(s, job.id, "report.json")
    if job.status != JobStatus.SUCCEEDED or art is None:
        return None
    try:
        return json.loads(artifacts.read_bytes(art.path))
    except (OSError, ValueError):
        return None


def _row(s: Session, job: Job, artifacts: ObjectStore) -> dict[str, Any]:
    report = read_report(s, job, artifacts)
    figures = leaderboard.report_figures(report) if report else dict(leaderboard.EMPTY_FIGURES)
    error = None
    if job.status == JobStatus.FAILED:
        error = {"code": job.error_code, "message": job.error_message}
    elif job.status == JobStatus.SUCCEEDED and report is None:
        error = {"code": "report_missing", "message": "the job's report.json could not be read"}
    return {
        "job_id": job.id,
        "method": job.method,
        "target": target_of(job.spec),
        "status": job.status,
        "error": error,
        **figures,
    }


def _unrun_row(spec: dict[str, Any], sweep: Sweep, dense: Job | None) -> dict[str, Any]:
    cancelled = sweep.cancel_requested or (dense is not None and dense.status == JobStatus.CANCELLED)
    status = JobStatus.CANCELLED if cancelled else JobStatus.FAILED
    why = f"never started: the dense training {dense.status if dense else 'is missing'}"
    return {
        "job_id": None,
        "method": spec["method"]["name"],
        "target": target_of(spec),
        "status": status,
        "error": {"code": "not_run", "message": why},
        **leaderboard.EMPTY_FIGURES,
    }


def target_of(spec: dict[str, Any]) -> dict[str, Any]:
    """A job spec's target as a sweep names it: ``{"macs_ratio": r}`` or ``{"speedup": s}``."""
    t = spec.get("target") or {}
    return {"speedup": t["speedup"]} if t.get("speedup") is not None else {"macs_ratio": t.get("macs_ratio")}


def _dense_summary(s: Session, job: Job, artifacts: ObjectStore) -> dict[str, Any]:
    report = read_report(s, job, artifacts)
    figures = leaderboard.report_figures(report) if report else dict(leaderboard.EMPTY_FIGURES)
    error = {"code": job.error_code, "message": job.error_message} if job.status == JobStatus.FAILED else None
    return {"job_id": job.id, "status": job.status, "error": error, **figures}


def _write_files(board: dict[str, Any], sweep_id: str, artifacts: ObjectStore) -> dict[str, Any]:
    """``leaderboard.json`` and ``sweep.html`` as ``sweep-<id>/<name>`` in the artifact store (each
    written whole: a reader never sees half a file); their records for ``Sweep.files``."""
    contents = {
        "leaderboard.json": leaderboard.dumps(board),
        "sweep.html": leaderboard.render_html(board).encode(),
    }
    files = {}
    for name, data in contents.items():
        key = f"sweep-{sweep_id}/{name}"
        artifacts.put_bytes(key, data)
        files[name] = {
            "path": key,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "media_type": "text/html" if name.endswith(".html") else media_type(name),
        }
    return files
