"""The job resource (``GET /v1/jobs/{id}``) and its mapping from the row: the API answers with it, and the
worker POSTs it to a job's webhook, so it lives here, beside the row, free of web and queue frameworks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from .models import Job, JobStatus


def utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


class JobError(BaseModel):
    code: str
    message: str | None
    retryable: bool | None


class JobUrls(BaseModel):
    self: str
    events: str
    artifacts: str
    cancel: str


class JobOut(BaseModel):
    id: str
    status: JobStatus
    method: str
    spec: dict[str, Any]
    progress: float = Field(description="0..1")
    phase: str | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    error: JobError | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    sweep_id: str | None = Field(None, description="The sweep this job belongs to (GET /v1/sweeps/{id})")
    rerun_of: str | None = Field(None, description="The job this one reruns (POST /v1/jobs/{id}/rerun)")
    urls: JobUrls


def job_path(root: str, job_id: str) -> str:
    return f"{root}/v1/jobs/{job_id}"


def job_out(job: Job, root: str = "") -> JobOut:
    base = job_path(root, job.id)
    error = (
        JobError(code=job.error_code, message=job.error_message, retryable=job.retryable)
        if job.error_code
        else None
    )
    return JobOut(
        id=job.id,
        status=job.status,
        method=job.method,
        spec=job.spec,
        progress=job.progress or 0.0,
        phase=job.phase,
        attempt=job.attempt or 0,
        max_attempts=job.max_attempts,
        cancel_requested=bool(job.cancel_requested),
        error=error,
        result=job.result,
        created_at=utc(job.created_at),
        started_at=utc(job.started_at),
        finished_at=utc(job.finished_at),
        sweep_id=job.sweep_id,
        rerun_of=job.rerun_of,
        urls=JobUrls(
            self=base, events=f"{base}/events", artifacts=f"{base}/artifacts", cancel=f"{base}/cancel"
        ),
    )
