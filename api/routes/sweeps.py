"""Sweeps: several methods and targets on one model, each an ordinary job, ranked when the last ends.

Submit, list, get, cancel (every job of the sweep), events (the jobs' progress summed: a JSON snapshot,
or a live ``text/event-stream`` of snapshots), artifacts (``leaderboard.json``, ``sweep.html`` and the
winner's files). The sweep's state is computed from its jobs' rows (store.sweeps).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse

from pruning_core.spec import JobSpec, submit_problems
from store import repo, sweeps
from store.models import TERMINAL, Job, JobStatus, Sweep
from store.objects import artifact_store, upload_store

from .. import queue, quotas
from ..auth import OwnerDep
from ..deps import ReadSessionsDep, SessionsDep, SettingsDep
from ..problems import PROBLEM_SCHEMA, Problem, invalid
from ..refs import pretrained_errors, spec_errors, weights_errors, weights_to_check
from ..schemas import ARTIFACT_NAME, ArtifactList, ArtifactOut, artifact_out, echo, is_id, job_path, utc
from ..sweep_plan import SweepIn, child_count, plan
from .artifacts import RecordedFile, download_artifact, presign_s, serve_recorded_file
from .events import PING_S, POLL_S
from .jobs import check_cursor, root_path

router = APIRouter(tags=["sweeps"], responses={"4XX": PROBLEM_SCHEMA})


class SweepJobOut(BaseModel):
    id: str
    role: str = Field(description="`dense` (the dense training, once) or `child`")
    method: str
    target: dict[str, Any]
    status: JobStatus
    progress: float
    phase: str | None
    error: dict[str, Any] | None
    url: str


class SweepUrls(BaseModel):
    self: str
    events: str
    artifacts: str
    cancel: str


class SweepOut(BaseModel):
    id: str
    status: JobStatus
    stage: str = Field(description="`dense` while the dense training runs, then `children`")
    rank_by: str
    request: dict[str, Any]
    cancel_requested: bool
    progress: float = Field(description="0..1: the jobs' progress summed over every planned job")
    counts: dict[str, int] = Field(description="Jobs by status; `planned` counts those not created yet")
    jobs: list[SweepJobOut]
    winner: str | None = Field(description="The winning child's job id, by `rank_by`")
    leaderboard: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None
    urls: SweepUrls


class SweepPage(BaseModel):
    items: list[SweepOut]
    next_cursor: str | None


def sweep_path(root: str, sweep_id: str) -> str:
    return f"{root}/v1/sweeps/{sweep_id}"


def not_found(sweep_id: str) -> Problem:
    return Problem(404, f"Sweep {echo(sweep_id)} not found.", slug="sweep-not-found")


def owned_sweep(s: Session, owner: str, sweep_id: str) -> Sweep:
    """The caller's sweep, or 404 (another owner's is answered like an unknown one)."""
    sweep = sweeps.get_sweep(s, sweep_id, owner=owner) if is_id(sweep_id) else None
    if sweep is None:
        raise not_found(sweep_id)
    return sweep


def _job_out(job: Job, sweep: Sweep, root: str) -> SweepJobOut:
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return SweepJobOut(
        id=job.id,
        role="dense" if job.id == sweep.dense_job_id else "child",
        method=job.method,
        target=sweeps.target_of(job.spec),
        status=job.status,
        progress=1.0 if job.status in TERMINAL else job.progress or 0.0,
        phase=job.phase,
        error=error,
        url=job_path(root, job.id),
    )


def sweep_out(sweep: Sweep, jobs: list[Job], root: str = "") -> SweepOut:
    out_jobs = [_job_out(j, sweep, root) for j in jobs]
    planned = len(sweep.plan["children"]) + (1 if sweep.dense_job_id else 0)
    counts = {str(st): sum(j.status == st for j in out_jobs) for st in JobStatus}
    counts["planned"] = max(0, planned - len(out_jobs)) if sweep.status == JobStatus.RUNNING else 0
    done = sweep.status != JobStatus.RUNNING
    base = sweep_path(root, sweep.id)
    error = {"code": sweep.error_code, "message": sweep.error_message} if sweep.error_code else None
    return SweepOut(
        id=sweep.id,
        status=sweep.status,
        stage=sweep.stage,
        rank_by=sweep.rank_by,
        request=sweep.request,
        cancel_requested=bool(sweep.cancel_requested),
        progress=1.0 if done else sum(j.progress for j in out_jobs) / max(1, planned),
        counts=counts,
        jobs=out_jobs,
        winner=sweep.winner_job_id,
        leaderboard=sweep.leaderboard,
        error=error,
        created_at=utc(sweep.created_at),
        finished_at=utc(sweep.finished_at),
        urls=SweepUrls(
            self=base, events=f"{base}/events", artifacts=f"{base}/artifacts", cancel=f"{base}/cancel"
        ),
    )


def _check(body: SweepIn, children: list[dict], dense: dict | None, settings: Any, s: Session, owner: str):
    """Every child and the dense job within this server's limits, the base spec's files the caller's."""
    errors = [{"field": f"spec.{f}", "message": m} for f, m in submit_problems(body.spec, settings)]
    if body.spec.notify is not None:  # its secret would have nowhere to live; a sweep has its events
        errors.append({"field": "spec.notify", "message": "a sweep's jobs call no webhook"})
    for i, child in enumerate(children + ([dense] if dense else [])):
        name = f"children[{i}] ({child['method']['name']})" if i < len(children) else "dense job"
        spec = JobSpec.model_validate(child)
        errors += [{"field": f"{name}: {f}", "message": m} for f, m in submit_problems(spec, settings)]
    errors += [
        {"field": f"spec.{e['field']}", "message": e["message"]} for e in spec_errors(s, owner, body.spec)
    ]
    return list({e["field"]: e for e in errors}.values())


@router.post(
    "/v1/sweeps", operation_id="create_sweep", status_code=status.HTTP_201_CREATED, response_model=SweepOut
)
def create_sweep(
    body: SweepIn,
    request: Request,
    response: Response,
    sessions: SessionsDep,
    owner: OwnerDep,
    settings: SettingsDep,
) -> SweepOut:
    """Run one ordinary job per (method, target) of the base spec, and rank them when the last ends.
    With `schedule.dense_epochs` the dense model trains once, as the sweep's first job, and every child
    starts from its weights. More children than this server's `MAX_SWEEP_JOBS` is a 422; each job counts
    against the caller's quotas like any other (the queued-jobs quota must hold every job at submit)."""
    if (n := child_count(body)) > settings.max_sweep_jobs:
        raise Problem(
            422,
            f"The sweep has {n} children (methods x targets); this server "
            f"runs at most {settings.max_sweep_jobs} per sweep (MAX_SWEEP_JOBS).",
            slug="too-many-sweep-jobs",
            title="Invalid request",
            errors=[{"field": "methods", "message": f"at most {settings.max_sweep_jobs} children"}],
        )
    children, dense, errors = plan(body)
    with sessions() as s:
        errors += _check(body, children, dense, settings, s, owner)
        known = {} if errors else weights_to_check(s, owner, body.spec)
    errors += weights_errors(body.spec, known, settings, owner)
    errors += [
        {"field": f"spec.{e['field']}", "message": e["message"]}
        for e in pretrained_errors(body.spec, settings, owner)
    ]
    if errors:
        raise invalid(errors)
    with sessions() as s:
        _check_room(s, owner, settings, len(children) + (1 if dense else 0))
        ahead = repo.count_jobs(s, owner, JobStatus.QUEUED, JobStatus.RUNNING)
        sweep, ids = sweeps.create_sweep(
            s,
            owner,
            body.model_dump(mode="json"),
            body.rank_by,
            children,
            dense,
            max_attempts=settings.max_attempts,
        )
        s.commit()
        out = sweep_out(sweep, sweeps.sweep_jobs(s, sweep.id), root_path(request))
    enqueue(sessions, settings, ids, ahead)
    request.app.state.metrics.jobs_created.inc(len(ids))
    response.headers["Location"] = out.urls.self
    return out


def _check_room(s: Session, owner: str, settings: Any, jobs: int) -> None:
    """429 unless the caller's queued-jobs quota has room for every job of the sweep."""
    limit = settings.quota_queued_jobs
    if limit and repo.count_jobs(s, owner, JobStatus.QUEUED) + jobs > limit:
        raise quotas.too_many(
            f"The sweep's {jobs} jobs would take you past {limit} queued jobs, the most allowed.",
            quotas.COUNT_RETRY_AFTER_S,
            "queued-jobs-quota",
            limit=limit,
        )


def enqueue(sessions: sessionmaker[Session], settings: Any, ids: list[str], ahead: int) -> None:
    """Wake a worker for each job (by task name; nothing sent in embedded mode), fairest first."""
    for i, job_id in enumerate(ids):
        if queue.enqueue(job_id, settings, priority=queue.fair_priority(ahead + i)):
            with sessions() as s:
                repo.mark_enqueued(s, job_id)
                s.commit()


@router.get("/v1/sweeps", response_model=SweepPage, operation_id="list_sweeps")
def list_sweeps(
    request: Request,
    sessions: ReadSessionsDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> SweepPage:
    """The caller's sweeps, newest first. Pass `next_cursor` back as `cursor` for the next page."""
    if cursor:
        check_cursor(cursor)
    root = root_path(request)
    with sessions() as s:
        page, next_cursor = sweeps.list_sweeps(s, owner, limit=limit, cursor=cursor or None)
        items = [sweep_out(sw, sweeps.sweep_jobs(s, sw.id), root) for sw in page]
    return SweepPage(items=items, next_cursor=next_cursor)


@router.get("/v1/sweeps/{sweep_id}", response_model=SweepOut, operation_id="get_sweep")
def get_sweep(sweep_id: str, request: Request, sessions: ReadSessionsDep, owner: OwnerDep) -> SweepOut:
    with sessions() as s:
        sweep = owned_sweep(s, owner, sweep_id)
        return sweep_out(sweep, sweeps.sweep_jobs(s, sweep.id), root_path(request))


@router.post(
    "/v1/sweeps/{sweep_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SweepOut,
    operation_id="cancel_sweep",
)
def cancel_sweep(
    sweep_id: str, request: Request, sessions: SessionsDep, owner: OwnerDep, settings: SettingsDep
) -> SweepOut:
    """Cancel every job of the sweep: queued ones at once, running ones at their next step. The sweep
    ends `cancelled` once the last has stopped (at once when none was running)."""
    with sessions() as s:
        sweep = owned_sweep(s, owner, sweep_id)
        sweeps.request_cancel(s, sweep)
        sweeps.advance(s, sweep.id, artifact_store(settings), upload_store(settings))
        s.commit()
        sweep = s.get(Sweep, sweep.id, populate_existing=True)
        return sweep_out(sweep, sweeps.sweep_jobs(s, sweep.id), root_path(request))


# --- events: the jobs' progress, summed ---


def _snapshot(sessions: sessionmaker[Session], sweep_id: str, root: str) -> dict[str, Any]:
    with sessions() as s:
        sweep = s.get(Sweep, sweep_id)
        out = sweep_out(sweep, sweeps.sweep_jobs(s, sweep_id), root)
    return {
        "status": out.status,
        "stage": out.stage,
        "progress": out.progress,
        "counts": out.counts,
        "winner": out.winner,
        "jobs": [j.model_dump(mode="json", exclude={"url"}) for j in out.jobs],
    }


async def _stream(sessions: sessionmaker[Session], sweep_id: str, root: str) -> AsyncIterator[dict[str, str]]:
    last, seq = None, 0
    while True:
        snap = await anyio.to_thread.run_sync(_snapshot, sessions, sweep_id, root)
        if snap != last:
            seq += 1
            done = snap["status"] != JobStatus.RUNNING
            yield {"id": str(seq), "event": "status" if done else "progress", "data": json.dumps(snap)}
            last = snap
            if done:
                return
        await anyio.sleep(POLL_S)


@router.get(
    "/v1/sweeps/{sweep_id}/events",
    operation_id="sweep_events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "A snapshot, or a live stream"}},
)
def sweep_events(
    sweep_id: str,
    request: Request,
    sessions: ReadSessionsDep,
    owner: OwnerDep,
    accept: Annotated[str | None, Header()] = None,
) -> Any:
    """The sweep's progress (its jobs' summed) and each job's status, progress and phase: one JSON
    snapshot, or with `Accept: text/event-stream` a live stream of them (`progress` events while it
    runs, a last `status` event when it has ended)."""
    with sessions() as s:
        owned_sweep(s, owner, sweep_id)
    root = root_path(request)
    if accept and "text/event-stream" in accept:
        return EventSourceResponse(
            _stream(sessions, sweep_id, root), ping=PING_S, headers={"Cache-Control": "no-store"}
        )
    return _snapshot(sessions, sweep_id, root)


# --- artifacts: the sweep's own, and the winner's ---


@router.get(
    "/v1/sweeps/{sweep_id}/artifacts", response_model=ArtifactList, operation_id="list_sweep_artifacts"
)
def list_sweep_artifacts(
    sweep_id: str, request: Request, sessions: ReadSessionsDep, owner: OwnerDep
) -> ArtifactList:
    """`leaderboard.json` and `sweep.html` once the sweep has ended, then the winner's artifacts (their
    `url` is the winning job's)."""
    root = root_path(request)
    with sessions() as s:
        sweep = owned_sweep(s, owner, sweep_id)
        own = [
            ArtifactOut(
                name=name,
                size=f["size"],
                sha256=f["sha256"],
                media_type=f["media_type"],
                attempt=1,
                created_at=utc(sweep.finished_at or sweep.created_at),
                url=f"{sweep_path(root, sweep.id)}/artifacts/{name}",
            )
            for name, f in sorted((sweep.files or {}).items())
        ]
        won = repo.list_artifacts(s, sweep.winner_job_id) if sweep.winner_job_id else []
        names = {a.name for a in own}
        return ArtifactList(items=own + [artifact_out(a, root) for a in won if a.name not in names])


@router.get(
    "/v1/sweeps/{sweep_id}/artifacts/{name:path}",
    operation_id="download_sweep_artifact",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file"},
        206: {"description": "A byte range of the file"},
        304: {"description": "Not modified (If-None-Match)"},
        416: PROBLEM_SCHEMA,
    },
)
def download_sweep_artifact(
    sweep_id: str,
    name: str,
    sessions: ReadSessionsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """One of the sweep's own files, else the winner's artifact of that name."""
    with sessions() as s:
        sweep = owned_sweep(s, owner, sweep_id)
        record = (sweep.files or {}).get(name) if ARTIFACT_NAME.fullmatch(name) else None
        winner, finished = sweep.winner_job_id, sweep.finished_at
    if record is None:
        if winner is None:
            raise Problem(404, f"Sweep {sweep_id} has no artifact '{echo(name)}'.", slug="artifact-not-found")
        return download_artifact(winner, name, sessions, owner, settings, range_, if_none_match)
    rec = RecordedFile(name, record["path"], record["size"], record["sha256"], record["media_type"], finished)
    return serve_recorded_file(
        artifact_store(settings),
        rec,
        range_,
        if_none_match,
        what=f"sweep {sweep_id}",
        presign_s=presign_s(settings),
    )
