"""ORM models (SQLAlchemy 2). Times are timezone-aware UTC on every dialect; ids are 32-char hex strings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE``; values are always aware and in UTC.

    PostgreSQL returns aware datetimes in the session's time zone, SQLite none at all (it stores naive
    text), so without this a job read back from SQLite could not be compared with ``utcnow()`` and would
    serialise without its offset. Naive values handed in are taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(
        String(16), index=True
    )  # shown to humans, never enough to authenticate
    hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency"),
        Index("ix_jobs_owner_created", "owner", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
        Index("ix_jobs_owner_status", "owner", "status"),  # per-owner quotas and fair turns count by status
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    spec: Mapped[dict[str, Any]]
    method: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    phase: Mapped[str | None] = mapped_column(String(64), default=None)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    retryable: Mapped[bool | None] = mapped_column(Boolean, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # report summary
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # The sweep this job belongs to (a child, or the sweep's dense training), if any.
    sweep_id: Mapped[str | None] = mapped_column(
        ForeignKey("sweeps.id", ondelete="SET NULL"), default=None, index=True
    )

    # The job this one reruns (POST /v1/jobs/{id}/rerun); kept after that job is deleted.
    rerun_of: Mapped[str | None] = mapped_column(String(32), default=None)
    # notify.secret of the spec (write-only: the stored spec never holds it); signs the webhook
    notify_secret: Mapped[str | None] = mapped_column(String(256), default=None)

    artifacts: Mapped[list[Artifact]] = relationship(back_populates="job", order_by="Artifact.name")


class SweepStage(StrEnum):
    DENSE = "dense"  # the dense training runs; the children are created when it succeeds
    CHILDREN = "children"  # the children exist (and run)


class Sweep(Base):
    """Several methods and targets on one model, each an ordinary job (``Job.sweep_id``), ranked at the
    end. ``status`` is a job's (queued is unused: a sweep runs from its creation); it ends, by
    compare-and-set, once every job of the sweep has ended, with ``leaderboard`` and its files."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_owner_created", "owner", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.RUNNING)
    stage: Mapped[str] = mapped_column(String(16), default=SweepStage.CHILDREN)
    request: Mapped[dict[str, Any]]  # spec, methods, targets, rank_by as submitted
    plan: Mapped[dict[str, Any]]  # {"children": [child spec, ...]} (weights filled in after the dense job)
    rank_by: Mapped[str] = mapped_column(String(16))
    dense_job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    leaderboard: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    winner_job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    # name -> {path (relative to the artifact root), size, sha256, media_type}
    files: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_seq"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per job: the SSE event id
    kind: Mapped[str] = mapped_column(String(32))  # status, phase, progress, epoch, pruned, message, artifact
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(1024))  # relative to the artifact root
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class Upload(Base):
    __tablename__ = "uploads"
    # finding an owner's earlier upload of the same bytes (clients skip sending a file twice); one row
    # per owner, kind and bytes sent, whatever the concurrency (the loser gets the winner's upload)
    __table_args__ = (
        Index("ix_uploads_owner_source_sha256", "owner", "source_sha256"),
        Index("uq_uploads_owner_kind_source_sha256", "owner", "kind", "source_sha256", unique=True),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # weights | dataset
    filename: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(1024))  # relative to the upload root
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))  # of the stored file
    # of the body as sent: differs from sha256 when the server converted it (.pth -> safetensors)
    source_sha256: Mapped[str] = mapped_column(String(64))
    # weights: tensor name -> shape, when the API read the safetensors header (small headers only)
    tensors: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    media_type: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # due at next_at (or being tried: next_at then holds the claim's expiry)
    DELIVERED = "delivered"  # a 2xx came back
    FAILED = "failed"  # every attempt used up, or the address refused


class WebhookDelivery(Base):
    """The outbox of a job's webhook: one row per ended job with ``notify``, written in the transaction
    that ends the job, drained by the reaper's or the local runner's webhook pump (worker/webhooks.py).
    ``log`` holds one ``{"at", "status_code", "error"}`` per attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.cancelled
    url: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime | None] = mapped_column(default=None)
    log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class ServiceCounter(Base):
    """A counter kept in the database, so a count made in the reaper (jobs removed by retention) shows
    in the API's /metrics, across processes and restarts."""

    __tablename__ = "service_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
