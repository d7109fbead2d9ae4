"""Jobs: create (idempotent), list (cursor pages), get, cancel."""

from __future__ import annotations

from datetime import UTC
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy.orm import Session

from pruning_core.spec import JobSpec, submit_problems
from store import repo, sweeps
from store.models import Job, JobStatus

from .. import queue, quotas
from ..auth import OwnerDep
from ..deps import ReadSessionsDep, SessionsDep, SettingsDep
from ..problems import PROBLEM_SCHEMA, Problem
from ..refs import pretrained_errors, spec_errors, weights_errors, weights_to_check
from ..schemas import JobOut, JobPage, echo, is_id, job_out

router = APIRouter(tags=["jobs"], responses={"4XX": PROBLEM_SCHEMA})

# An Idempotency-Key: printable ASCII (RFC 9110 field values; the database stores it as text).
IDEMPOTENCY_KEY = r"^[ -~]{1,255}$"


def not_found(job_id: str) -> Problem:
    return Problem(404, f"Job {echo(job_id)} not found.", slug="job-not-found")


def owned_job(s: Session, owner: str, job_id: str) -> Job:
    """The caller's job, or 404 (another owner's job is answered exactly like an unknown one, and a
    malformed id like both, without a query)."""
    job = repo.get_job(s, job_id, owner=owner) if is_id(job_id) else None
    if job is None:
        raise not_found(job_id)
    return job


def root_path(request: Request) -> str:
    return request.scope.get("root_path", "")


@router.post(
    "/v1/jobs",
    operation_id="create_job",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "An earlier job with the same Idempotency-Key"}},
)
def create_job(
    spec: JobSpec,
    request: Request,
    response: Response,
    sessions: SessionsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(pattern=IDEMPOTENCY_KEY)] = None,
) -> JobOut:
    """Queue a pruning job. Files are referenced as `upload:<id>` (POST /v1/uploads). A spec is refused
    (422, one item per field) past this server's limits (shown in the schema), or when it names a
    missing or another owner's upload, or a target its model can never reach, or weights whose tensor
    names and shapes (read from a small safetensors header) do not match the model, or
    `model.pretrained` weights that are not in the server's cache while downloads are off."""
    limits = [{"field": f, "message": m} for f, m in submit_problems(spec, settings)]
    with sessions() as s:
        errors = limits + spec_errors(s, owner, spec)
        known = {} if errors else weights_to_check(s, owner, spec)
    errors += weights_errors(spec, known, settings, owner)  # may run a child process: no connection held
    errors += pretrained_errors(spec, settings, owner)  # the same
    if errors:
        raise Problem(
            422,
            f"{len(errors)} invalid field(s): {', '.join(e['field'] for e in errors)}.",
            slug="validation-error",
            title="Invalid request",
            errors=errors,
        )
    with sessions() as s:
        if not (idempotency_key and repo.idempotent_job(s, owner, idempotency_key)):  # replays pass
            quotas.check_queued_jobs(s, owner, settings)
        ahead = repo.count_jobs(s, owner, JobStatus.QUEUED, JobStatus.RUNNING)  # fairness on the broker
        try:
            job, created = repo.create_job(
                s,
                owner,
                spec.model_dump(mode="json"),
                spec.method.name,
                idempotency_key=idempotency_key or None,
                max_attempts=settings.max_attempts,
            )
        except ValueError as err:
            raise Problem(409, str(err), slug="idempotency-key-reused") from None
        s.commit()  # the row is the truth: commit before the broker hears of it
    metrics = request.app.state.metrics
    if created:
        metrics.jobs_created.inc()
        if queue.enqueue(job.id, settings, priority=queue.fair_priority(ahead)):  # no connection held
            with sessions() as s:
                repo.mark_enqueued(s, job.id)
                s.commit()
        elif settings.redis_url:
            metrics.enqueue_failures.inc()
    out = job_out(job, root_path(request))
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    response.headers["Location"] = out.urls.self
    return out


def check_cursor(cursor: str) -> None:
    """400 unless ``cursor`` decodes to what a ``next_cursor`` holds (of jobs or uploads): an id, and a
    time that exists in UTC (0001-01-01T00:00+14:00 does not)."""
    try:
        created, job_id = repo.decode_cursor(cursor)
        (created if created.tzinfo else created.replace(tzinfo=UTC)).astimezone(UTC)  # OverflowError
        ok = is_id(job_id)
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        raise Problem(400, "The cursor is malformed; use `next_cursor` as given.", slug="bad-cursor")


@router.get("/v1/jobs", response_model=JobPage, operation_id="list_jobs")
def list_jobs(
    request: Request,
    sessions: ReadSessionsDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    status: JobStatus | None = None,
) -> JobPage:
    """The caller's jobs, newest first. Pass `next_cursor` back as `cursor` for the next page."""
    if cursor:
        check_cursor(cursor)
    with sessions() as s:
        jobs, next_cursor = repo.list_jobs(s, owner, status=status, limit=limit, cursor=cursor or None)
    root = root_path(request)
    return JobPage(items=[job_out(j, root) for j in jobs], next_cursor=next_cursor)


@router.get("/v1/jobs/{job_id}", response_model=JobOut, operation_id="get_job")
def get_job(job_id: str, request: Request, sessions: ReadSessionsDep, owner: OwnerDep) -> JobOut:
    with sessions() as s:
        job = owned_job(s, owner, job_id)
    return job_out(job, root_path(request))


@router.post(
    "/v1/jobs/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    operation_id="cancel_job",
)
def cancel_job(
    job_id: str, request: Request, sessions: SessionsDep, owner: OwnerDep, settings: SettingsDep
) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next step (`cancel_requested`);
    a finished one is returned unchanged. A sweep's child cancelled is a row of its leaderboard."""
    with sessions() as s:
        owned_job(s, owner, job_id)
        job = repo.request_cancel(s, job_id)
        if job.sweep_id and job.status == JobStatus.CANCELLED:  # it may have been the sweep's last
            sweeps.advance(s, job.sweep_id, settings.artifacts_dir, settings.uploads_dir)
        s.commit()
    return job_out(job, root_path(request))
