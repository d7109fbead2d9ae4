"""Response schemas, one per resource, and the mapping from store rows to them."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, Field

from store.models import Artifact, JobEvent, Upload, WebhookDelivery

# The job resource lives in store.resources (the worker POSTs it to webhooks too); re-exported here.
from store.resources import JobError, JobOut, JobUrls, job_out, job_path, utc  # noqa: F401

# Job and upload ids are 32 lowercase hex digits (store.models.new_id): anything else names nothing, and
# is answered 404 without asking the database (which may refuse it: NUL, over-long, ...).
ID = re.compile(r"[0-9a-f]{32}")
# An artifact name as the worker writes it: a relative path of printable characters.
ARTIFACT_NAME = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,255}")


def is_id(value: str) -> bool:
    return ID.fullmatch(value) is not None


def echo(value: str, limit: int = 80) -> str:
    """A client's value quoted back in a message: printable, and cut short."""
    text = value.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class DeliveryAttempt(BaseModel):
    at: datetime
    status_code: int | None = Field(description="The receiver's HTTP status; null when none came back")
    error: str | None = Field(description="Why the attempt failed, when it did without a status")


class DeliveryOut(BaseModel):
    id: str
    event: str = Field(description="`job.succeeded`, `job.failed` or `job.cancelled`")
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="When a pending delivery is tried next")
    created_at: datetime
    finished_at: datetime | None
    log: list[DeliveryAttempt] = Field(description="Every attempt, oldest first")


class DeliveryList(BaseModel):
    items: list[DeliveryOut]


class EventOut(BaseModel):
    id: int = Field(description="The event's sequence number in its job (the SSE id)")
    kind: str
    data: dict[str, Any]
    created_at: datetime


class EventPage(BaseModel):
    items: list[EventOut]
    next_after: int = Field(description="Pass as `after` to get the next page")


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    media_type: str
    attempt: int
    created_at: datetime
    url: str


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class UploadOut(BaseModel):
    id: str
    kind: Literal["weights", "dataset"]
    filename: str
    size: int
    sha256: str = Field(description="sha256 of the stored file")
    source_sha256: str = Field(
        description="sha256 of the body as sent (differs from sha256 when the server converted a .pth)"
    )
    media_type: str
    created_at: datetime
    ref: str = Field(description="Put this in model.weights, kd.teacher or data.root")


class UploadPage(BaseModel):
    items: list[UploadOut]
    next_cursor: str | None


def delivery_out(d: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=d.id,
        event=d.event,
        url=d.url,
        status=d.status,
        attempts=d.attempts,
        next_attempt_at=utc(d.next_at) if d.status == "pending" else None,
        created_at=utc(d.created_at),
        finished_at=utc(d.finished_at),
        log=[DeliveryAttempt.model_validate(a) for a in d.log or []],
    )


def event_out(ev: JobEvent) -> EventOut:
    return EventOut(id=ev.seq, kind=ev.kind, data=ev.data, created_at=utc(ev.created_at))


def artifact_out(art: Artifact, root: str = "") -> ArtifactOut:
    return ArtifactOut(
        name=art.name,
        size=art.size,
        sha256=art.sha256,
        media_type=art.media_type,
        attempt=art.attempt,
        created_at=utc(art.created_at),
        url=f"{job_path(root, art.job_id)}/artifacts/{quote(art.name)}",
    )


UPLOAD_PREFIX = "upload:"


def upload_out(up: Upload) -> UploadOut:
    return UploadOut(
        id=up.id,
        kind=up.kind,
        filename=up.filename,
        size=up.size,
        sha256=up.sha256,
        source_sha256=up.source_sha256,
        media_type=up.media_type,
        created_at=utc(up.created_at),
        ref=UPLOAD_PREFIX + up.id,
    )
