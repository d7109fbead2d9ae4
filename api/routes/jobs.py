"""Jobs: create (idempotent), list (cursor pages), get, cancel, delete, rerun, webhook deliveries."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response, status
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from pruning_core.settings import Settings
from pruning_core.spec import JobSpec, stored_spec, submit_problems
from store import repo, sweeps, webhooks
from store.models import TERMINAL, Job, JobStatus
from store.objects import artifact_store, upload_store

from .. import queue, quotas
from ..auth import OwnerDep
from ..deps import ReadSessionsDep, SessionsDep, SettingsDep
from ..problems import PROBLEM_SCHEMA, Problem, invalid, validation_errors
from ..refs import pretrained_errors, spec_errors, weights_errors, weights_to_check
from ..schemas import DeliveryList, JobOut, JobPage, delivery_out, echo, is_id, job_out, job_path

router = APIRouter(tags=["jobs"], responses={"4XX": PROBLEM_SCHEMA})
log = logging.getLogger("api.jobs")

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


@dataclass
class Submitter:
    """What a submit needs of its request: the caller, the database, the settings."""

    request: Request
    response: Response
    sessions: sessionmaker[Session]
    owner: str
    settings: Settings


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
    `model.pretrained` weights that are not in the server's cache while downloads are off, or a
    `notify.url` whose host is not a global address (unless WEBHOOK_ALLOW allows it) or comes without
    `notify.secret`."""
    secret = spec.notify.secret.get_secret_value() if spec.notify and spec.notify.secret else None
    return submit(spec, secret, Submitter(request, response, sessions, owner, settings), idempotency_key)


def notify_errors(spec: JobSpec, secret: str | None, settings: Settings) -> list[dict[str, str]]:
    """A webhook without its secret, or to an address the server may not call (checked again before
    every delivery: the name may resolve elsewhere by then)."""
    if spec.notify is None:
        return []
    errors = [] if secret else [{"field": "notify.secret", "message": "required with notify.url"}]
    if (why := webhooks.url_problem(spec.notify.url, settings.webhook_allow)) is not None:
        errors.append({"field": "notify.url", "message": why})
    return errors


def submit(
    spec: JobSpec,
    secret: str | None,
    sub: Submitter,
    idempotency_key: str | None,
    *,
    rerun_of: str | None = None,
) -> JobOut:
    """Check ``spec`` as every submit is checked (limits, files, weights, webhook, quotas), insert the
    queued row, commit, then enqueue it; the answer's status is 201, or 200 for an idempotent replay."""
    settings, owner, sessions = sub.settings, sub.owner, sub.sessions
    limits = [{"field": f, "message": m} for f, m in submit_problems(spec, settings)]
    with sessions() as s:
        errors = limits + spec_errors(s, owner, spec)
        known = {} if errors else weights_to_check(s, owner, spec)
    errors += weights_errors(spec, known, settings, owner)  # may run a child process: no connection held
    errors += pretrained_errors(spec, settings, owner)  # the same
    errors += notify_errors(spec, secret, settings)  # resolves a name: no connection held
    if errors:
        raise invalid(errors)
    with sessions() as s:
        if not (idempotency_key and repo.idempotent_job(s, owner, idempotency_key)):  # replays pass
            quotas.check_queued_jobs(s, owner, settings)
        ahead = repo.count_jobs(s, owner, JobStatus.QUEUED, JobStatus.RUNNING)  # fairness on the broker
        try:
            job, created = repo.create_job(
                s,
                owner,
                stored_spec(spec),
                spec.method.name,
                idempotency_key=idempotency_key or None,
                max_attempts=settings.max_attempts,
                rerun_of=rerun_of,
                notify_secret=secret,
            )
        except ValueError as err:
            raise Problem(409, str(err), slug="idempotency-key-reused") from None
        s.commit()  # the row is the truth: commit before the broker hears of it
    metrics = sub.request.app.state.metrics
    if created:
        metrics.jobs_created.inc()
        if queue.enqueue(job.id, settings, priority=queue.fair_priority(ahead)):  # no connection held
            with sessions() as s:
                repo.mark_enqueued(s, job.id)
                s.commit()
        elif settings.redis_url:
            metrics.enqueue_failures.inc()
    out = job_out(job, root_path(sub.request))
    sub.response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    sub.response.headers["Location"] = out.urls.self
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
            sweeps.advance(s, job.sweep_id, artifact_store(settings), upload_store(settings))
        s.commit()
    return job_out(job, root_path(request))


@router.delete(
    "/v1/jobs/{job_id}",
    operation_id="delete_job",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={409: PROBLEM_SCHEMA},
)
def delete_job(job_id: str, sessions: SessionsDep, owner: OwnerDep, settings: SettingsDep) -> Response:
    """Delete an ended job: its row, events, artifacts (and their files) and webhook deliveries.
    Refused (409) while it is queued or running (cancel it first), or while the sweep it belongs to
    has not ended."""
    with sessions() as s:
        job = owned_job(s, owner, job_id)
        if job.status not in TERMINAL:
            raise Problem(
                409,
                f"Job {job_id} is {job.status}; cancel it first (POST {job_path('', job_id)}/cancel), "
                "then delete it once it has ended.",
                slug="job-not-ended",
                job_status=job.status,
            )
        if repo.in_open_sweep(s, job):
            raise Problem(
                409,
                f"Job {job_id} belongs to sweep {job.sweep_id}, which has not ended; delete it afterwards.",
                slug="job-in-open-sweep",
            )
        if not repo.delete_job(s, job_id):  # deleted by a concurrent request meanwhile
            raise not_found(job_id)
        s.commit()
    try:
        artifact_store(settings).delete_prefix(f"{job_id}/")
    except Exception:  # leftover files are only storage: its row, and so every link to them, is gone
        log.warning("job %s: deleted, but removing its files failed", job_id, exc_info=True)
    log.info("job %s deleted by its owner", job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def merge_overrides(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``overrides`` merged in: objects key by key, anything else replaced. A `method` of
    another `name` replaces the method whole (the first method's options mean nothing to it)."""
    out = dict(spec)
    for key, value in overrides.items():
        old = out.get(key)
        switched = key == "method" and isinstance(value, dict) and isinstance(old, dict)
        switched = switched and value.get("name", old.get("name")) != old.get("name")
        if isinstance(value, dict) and isinstance(old, dict) and not switched:
            out[key] = merge_overrides(old, value)
        else:
            out[key] = value
    return out


@router.post(
    "/v1/jobs/{job_id}/rerun",
    operation_id="rerun_job",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "An earlier job with the same Idempotency-Key"}},
)
def rerun_job(
    job_id: str,
    request: Request,
    response: Response,
    sessions: SessionsDep,
    owner: OwnerDep,
    settings: SettingsDep,
    overrides: Annotated[
        dict[str, Any] | None,
        Body(
            description="Fields of the spec to change, merged into the first job's (objects key by key); "
            'e.g. `{"target": {"macs_ratio": 0.3}}`. Empty: the same spec.',
            examples=[{"schedule": {"epochs": 5}}],
        ),
    ] = None,
    idempotency_key: Annotated[str | None, Header(pattern=IDEMPOTENCY_KEY)] = None,
) -> JobOut:
    """Submit the job's spec again as a new job (`rerun_of` names this one), with `overrides` merged
    in; checked, limited and counted against quotas like any submit. The webhook's secret is kept
    unless `notify.secret` is given."""
    with sessions() as s:
        first = owned_job(s, owner, job_id)
        spec_data, first_secret = dict(first.spec), first.notify_secret
    try:
        spec = JobSpec.model_validate(merge_overrides(spec_data, overrides or {}))
    except ValidationError as err:
        raise invalid(validation_errors(err.errors())) from None
    secret = None
    if spec.notify is not None:  # given, else the first job's (`{"notify": null}` drops the webhook)
        secret = spec.notify.secret.get_secret_value() if spec.notify.secret else first_secret
    sub = Submitter(request, response, sessions, owner, settings)
    return submit(spec, secret, sub, idempotency_key, rerun_of=job_id)


@router.get("/v1/jobs/{job_id}/deliveries", response_model=DeliveryList, operation_id="list_deliveries")
def list_deliveries(job_id: str, sessions: ReadSessionsDep, owner: OwnerDep) -> DeliveryList:
    """The job's webhook deliveries (one per end of a job with `notify`), each with every attempt:
    its time, the receiver's status code or the error."""
    with sessions() as s:
        owned_job(s, owner, job_id)
        rows = webhooks.list_deliveries(s, job_id)
    return DeliveryList(items=[delivery_out(d) for d in rows])
