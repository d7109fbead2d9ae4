"""Repository functions: every read and write of job state goes through here.

Each function takes an open ``Session`` inside a transaction (``db.session_scope``); the caller commits.
State changes that race (claim, heartbeat, finish, cancel, requeue) are single compare-and-set UPDATEs, so
two workers, a reaper and an API can act on one row without locks held across calls. Keep transactions
short (one job, one step): on SQLite every transaction holds the database's write lock (see store.db).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from .models import (
    TERMINAL,
    ApiKey,
    Artifact,
    Job,
    JobEvent,
    JobStatus,
    ServiceCounter,
    Sweep,
    Upload,
    WebhookDelivery,
    utcnow,
)
from .webhooks import enqueue_delivery

# --- jobs ---


def create_job(
    s: Session,
    owner: str,
    spec: dict[str, Any],
    method: str,
    *,
    idempotency_key: str | None = None,
    max_attempts: int = 3,
    sweep_id: str | None = None,
    rerun_of: str | None = None,
    notify_secret: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job; with an idempotency key an earlier job of the same owner and key is returned
        instead (``created`` False). Raises ValueError if that earlier job has a different spec. ``sweep_id``
    links the job to its sweep (store.sweeps), ``rerun_of`` to the job it reruns; ``notify_secret`` is
    the webhook's key (never part of ``spec``).

        Safe under concurrency: of two transactions racing with one key, one inserts and the other (on
        PostgreSQL it waits for the first to commit) gets the first's job back."""

    def earlier() -> Job | None:
        existing = s.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key))
        if existing is not None and existing.spec != spec:
            raise ValueError("Idempotency-Key was already used with a different job spec")
        return existing

    if idempotency_key and (existing := earlier()) is not None:
        return existing, False
    job = Job(
        owner=owner,
        spec=spec,
        method=method,
        idempotency_key=idempotency_key,
        max_attempts=max_attempts,
        sweep_id=sweep_id,
        rerun_of=rerun_of,
        notify_secret=notify_secret,
    )
    try:
        with s.begin_nested():
            s.add(job)
    except IntegrityError:  # a concurrent request with the same key won the race
        if not idempotency_key or (existing := earlier()) is None:
            raise
        return existing, False
    append_event(s, job.id, "status", {"status": JobStatus.QUEUED})
    return job, True


def idempotent_job(s: Session, owner: str, idempotency_key: str) -> Job | None:
    """The owner's earlier job created with ``idempotency_key``, if any."""
    return s.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key))


def get_job(s: Session, job_id: str, owner: str | None = None) -> Job | None:
    """The job, or None if it does not exist or belongs to another owner (callers answer 404 alike)."""
    job = s.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError on a malformed cursor."""
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as err:
        raise ValueError("malformed cursor") from err


def list_jobs(
    s: Session, owner: str, *, status: str | None = None, limit: int = 50, cursor: str | None = None
) -> tuple[list[Job], str | None]:
    """Newest first, keyset-paginated on (created_at, id). Returns the page and the next cursor (None on
    the last page). Raises ValueError on a malformed cursor; ``limit`` below 1 counts as 1."""
    limit = max(1, int(limit))
    q = select(Job).where(Job.owner == owner)
    if status:
        q = q.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(s.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return page, encode_cursor(page[-1]) if len(rows) > limit else None


def queued_job_ids(s: Session, limit: int = 10) -> list[str]:
    """Oldest first: queued jobs a worker could claim now (the embedded local runner polls this)."""
    q = (
        select(Job.id)
        .where(
            Job.status == JobStatus.QUEUED,
            Job.cancel_requested.is_(False),
            Job.attempt < Job.max_attempts,
        )
        .order_by(Job.created_at, Job.id)
        .limit(limit)
    )
    return list(s.scalars(q))


def fair_queued_job_ids(s: Session, limit: int = 10, *, max_running: int = 0) -> list[str]:
    """Queued jobs a worker could claim now, fairest first: owners take turns.

    Owners are ordered by how many of their jobs run now, then by when one of their jobs last started
    (never first): the least recently served owner goes next, so owners alternate (A1, B1, C1, A2, B2,
    ...) and one owner's long queue never holds another's first job behind it. Within an owner, oldest
    first. Owners at ``max_running`` (0: no limit) are left out."""
    claimable = and_(
        Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False), Job.attempt < Job.max_attempts
    )
    waiting = select(Job.owner).where(claimable).distinct().scalar_subquery()
    served = (
        select(
            Job.owner,
            func.count().filter(Job.status == JobStatus.RUNNING).label("running"),
            func.max(Job.started_at).label("last_start"),
        )
        .where(Job.owner.in_(waiting))
        .group_by(Job.owner)
        .subquery()
    )
    q = select(Job.id).join(served, served.c.owner == Job.owner).where(claimable)
    if max_running > 0:
        q = q.where(served.c.running < max_running)
    q = q.order_by(served.c.running, served.c.last_start.asc().nulls_first(), Job.created_at, Job.id)
    return list(s.scalars(q.limit(limit)))


def count_jobs(s: Session, owner: str, *statuses: str) -> int:
    """How many of ``owner``'s jobs are in one of ``statuses``."""
    return s.scalar(select(func.count()).where(Job.owner == owner, Job.status.in_(statuses))) or 0


def mark_enqueued(s: Session, job_id: str) -> None:
    s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def claim_job(s: Session, job_id: str, worker: str, lease_s: float, *, max_running: int = 0) -> Job | None:
    """Compare-and-set: queued (or running with an expired lease) -> running, attempt + 1.

    Returns the claimed job, or None when another worker holds it or it is finished or cancelled
    (a duplicate delivery then does nothing), or when its owner already has ``max_running`` jobs
    running (0: no limit); such a job stays queued and is marked unsent, so the reaper wakes it again
    soon. The running quota is checked in the same UPDATE; two claims racing on PostgreSQL may overshoot
    it by one, never more than the number of racing workers.
    """
    now = utcnow()
    claimable = or_(
        Job.status == JobStatus.QUEUED,
        and_(Job.status == JobStatus.RUNNING, Job.lease_until < now),
    )
    conditions = [
        Job.id == job_id,
        claimable,
        Job.cancel_requested.is_(False),
        Job.attempt < Job.max_attempts,
    ]
    if max_running > 0:
        other = aliased(Job)
        running = (
            select(func.count())
            .where(other.owner == Job.owner, other.status == JobStatus.RUNNING, other.id != Job.id)
            .scalar_subquery()
        )
        conditions.append(running < max_running)
    res = s.execute(
        update(Job)
        .where(*conditions)
        .values(
            status=JobStatus.RUNNING,
            attempt=Job.attempt + 1,
            worker=worker,
            started_at=now,
            heartbeat_at=now,
            lease_until=now + timedelta(seconds=lease_s),
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        if max_running > 0:  # held back by the quota: unsent, so the reaper sends it again shortly
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
                .values(enqueued_at=None)
            )
        return None
    job = s.get(Job, job_id, populate_existing=True)
    append_event(s, job_id, "status", {"status": JobStatus.RUNNING, "attempt": job.attempt, "worker": worker})
    return job


def heartbeat(
    s: Session,
    job_id: str,
    attempt: int,
    lease_s: float,
    *,
    progress: float | None = None,
    phase: str | None = None,
) -> tuple[bool, bool]:
    """Extend the lease of our attempt. Returns (still ours, cancel requested); when it is no longer ours
    (reclaimed after a lost lease, finished, requeued) the answer is (False, False): stop at once and do
    not finish the job."""
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "lease_until": now + timedelta(seconds=lease_s)}
    if progress is not None:  # never backwards: a beat that waited for the lock may carry an older value
        values["progress"] = case(
            (or_(Job.progress.is_(None), Job.progress < progress), progress), else_=Job.progress
        )
    if phase is not None:
        values["phase"] = phase
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.RUNNING)
        .values(**values)
        .returning(Job.cancel_requested)
    )
    row = res.first()
    return (row is not None, bool(row[0]) if row is not None else False)


def finish_job(
    s: Session,
    job_id: str,
    attempt: int,
    status: JobStatus,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    retryable: bool | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """Running (our attempt) -> a terminal status. False if the attempt is no longer ours."""
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.RUNNING)
        .values(
            status=status,
            finished_at=utcnow(),
            lease_until=None,
            error_code=error_code,
            error_message=error_message,
            retryable=retryable,
            result=result,
            progress=1.0 if status == JobStatus.SUCCEEDED else Job.progress,
        )
    )
    if res.rowcount != 1:
        return False
    data: dict[str, Any] = {"status": status}
    if error_code:
        data |= {"error_code": error_code, "message": error_message, "retryable": retryable}
    append_event(s, job_id, "status", data)
    enqueue_delivery(s, job_id)
    return True


def request_cancel(s: Session, job_id: str) -> Job | None:
    """Queued -> cancelled at once; running -> cancel_requested (the worker stops at its next step).
    A finished job is returned unchanged."""
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now)
    )
    if res.rowcount == 1:
        append_event(s, job_id, "status", {"status": JobStatus.CANCELLED})
        enqueue_delivery(s, job_id)
    else:
        s.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING).values(cancel_requested=True)
        )
    return s.get(Job, job_id, populate_existing=True)


def in_open_sweep(s: Session, job: Job) -> bool:
    """Whether ``job`` belongs to a sweep that has not ended (its leaderboard still needs the job)."""
    if job.sweep_id is None:
        return False
    status = s.scalar(select(Sweep.status).where(Sweep.id == job.sweep_id))
    return status is not None and status not in TERMINAL


def delete_job(s: Session, job_id: str) -> bool:
    """Delete an ended job's row with its events, artifact rows and webhook deliveries (its files are
    the caller's to remove after the commit: ``store.files.remove_job_dir``). Compare-and-set on the
    status: False, and nothing deleted, unless the job exists and has ended."""
    res = s.execute(delete(Job).where(Job.id == job_id, Job.status.in_(TERMINAL)))
    if res.rowcount != 1:
        return False
    for table in (JobEvent, Artifact, WebhookDelivery):  # the foreign keys cascade; this holds without
        s.execute(delete(table).where(table.job_id == job_id))
    return True


def expired_job_ids(s: Session, ended_before: datetime, limit: int = 100) -> list[str]:
    """Oldest first: jobs that ended before ``ended_before``, except those of a sweep still open."""
    q = (
        select(Job.id)
        .outerjoin(Sweep, Sweep.id == Job.sweep_id)
        .where(
            Job.status.in_(TERMINAL),
            Job.finished_at < ended_before,
            or_(Job.sweep_id.is_(None), Sweep.id.is_(None), Sweep.status.in_(TERMINAL)),
        )
        .order_by(Job.finished_at, Job.id)
        .limit(limit)
    )
    return list(s.scalars(q))


def _unchanged(job: Job):
    """Compare-and-set guard: the row is still at ``job``'s attempt and unfinished, and if running, its
    lease is the one the caller saw (no heartbeat since: a worker that was only slow keeps its job)."""
    lease = Job.lease_until.is_(None) if job.lease_until is None else Job.lease_until == job.lease_until
    return and_(
        Job.id == job.id,
        Job.attempt == job.attempt,
        or_(Job.status == JobStatus.QUEUED, and_(Job.status == JobStatus.RUNNING, lease)),
    )


def _cancel_if_requested(s: Session, job: Job) -> bool:
    """A row whose owner asked to cancel it ends cancelled instead of being retried or failed."""
    res = s.execute(
        update(Job)
        .where(_unchanged(job), Job.cancel_requested.is_(True))
        .values(status=JobStatus.CANCELLED, finished_at=utcnow(), lease_until=None)
    )
    if res.rowcount == 1:
        append_event(s, job.id, "status", {"status": JobStatus.CANCELLED, "reason": "worker lost"})
        enqueue_delivery(s, job.id)
        return True
    return False


def fail_exhausted(s: Session, job: Job, code: str = "worker_lost") -> bool:
    """A job out of attempts -> failed with ``code`` (the reaper's last word). A job whose cancellation
    was requested ends ``cancelled`` instead. True if this call finished the job; False if the row moved
    on since ``job`` was read (claimed, finished, or its worker heartbeated again)."""
    if _cancel_if_requested(s, job):
        return True
    res = s.execute(
        update(Job)
        .where(_unchanged(job))
        .values(
            status=JobStatus.FAILED,
            error_code=code,
            retryable=True,
            finished_at=utcnow(),
            lease_until=None,
            error_message=f"the job lost its worker {job.attempt} time(s); giving up after {job.max_attempts}",
        )
    )
    if res.rowcount == 1:
        append_event(s, job.id, "status", {"status": JobStatus.FAILED, "error_code": code, "retryable": True})
        enqueue_delivery(s, job.id)
        return True
    return False


def stale_jobs(s: Session, *, unqueued_after_s: float = 30.0) -> list[Job]:
    """Jobs the reaper must act on, oldest first: running with an expired lease, and queued rows never
    enqueued (or enqueued long ago without a claim) for longer than ``unqueued_after_s``."""
    now = utcnow()
    old = now - timedelta(seconds=unqueued_after_s)
    q = select(Job).where(
        or_(
            and_(Job.status == JobStatus.RUNNING, Job.lease_until < now),
            and_(
                Job.status == JobStatus.QUEUED,
                Job.cancel_requested.is_(False),
                Job.created_at < old,
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < old),
            ),
        )
    )
    return list(s.scalars(q.order_by(Job.created_at, Job.id)))


def requeue(s: Session, job: Job, *, interrupted: bool = False) -> bool:
    """Give a job back to the queue; True when the caller must enqueue ``job.id`` now.

    ``interrupted``: the worker is stopping on purpose (SIGTERM, Ctrl-C) and gives its own attempt back;
    that attempt is not counted (the next claim reuses its number and its checkpoints), so a deploy or a
    restart never exhausts a job's attempts.

    ``job`` is a row as read earlier (from ``stale_jobs``, or a worker giving its own attempt back when
    interrupted); every change below is a compare-and-set against it:

    - running, no heartbeat since ``job`` was read -> queued (the attempt count is kept; the next claim
      adds one and resumes from the last checkpoint), marked enqueued, True;
    - queued but never (or long ago) enqueued -> marked enqueued, True;
    - out of attempts -> ``fail_exhausted`` (failed ``worker_lost``), False;
    - cancellation requested -> cancelled, False;
    - anything else (claimed, finished or requeued meanwhile: the row no longer matches ``job``) -> False.

    ``mark_enqueued`` after enqueueing is harmless; if the enqueue fails the row turns stale again after
    ``unqueued_after_s`` and the reaper tries again.
    """
    if _cancel_if_requested(s, job):
        return False
    if job.attempt >= job.max_attempts and not interrupted:
        fail_exhausted(s, job)
        return False
    now = utcnow()
    res = s.execute(
        update(Job)
        .where(_unchanged(job), Job.status == JobStatus.RUNNING)
        .values(
            status=JobStatus.QUEUED,
            lease_until=None,
            enqueued_at=now,
            worker=None,
            attempt=Job.attempt - 1 if interrupted else Job.attempt,
        )
    )
    if res.rowcount == 1:
        reason = "interrupted" if interrupted else "worker lost"
        append_event(
            s, job.id, "status", {"status": JobStatus.QUEUED, "reason": f"{reason}; resuming from checkpoint"}
        )
        return True
    res = s.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.status == JobStatus.QUEUED,
            Job.attempt == job.attempt,
            Job.cancel_requested.is_(False),
        )
        .values(enqueued_at=now)
    )
    return res.rowcount == 1


# --- events ---


def append_event(s: Session, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent:
    """Append the job's next event: seq = previous + 1, gapless per job (the SSE id).

    Concurrent appenders (the worker's reporter, the API cancelling, the reaper) are serialised per job:
    on PostgreSQL by locking the job row (``SELECT ... FOR UPDATE``, held to the end of the caller's
    transaction, which also orders the events as their transactions commit); on SQLite by the write lock
    every transaction takes. Should a unique (job_id, seq) conflict still happen, the insert is retried
    inside a SAVEPOINT, so the caller's transaction survives.
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    tries = 5
    for attempt in range(tries):
        seq = (s.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)) or 0) + 1
        ev = JobEvent(job_id=job_id, seq=seq, kind=kind, data=data)
        try:
            with s.begin_nested():
                s.add(ev)
            return ev
        except IntegrityError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def events_after(s: Session, job_id: str, after_seq: int = 0, limit: int = 500) -> list[JobEvent]:
    q = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
        .order_by(JobEvent.seq)
        .limit(limit)
    )
    return list(s.scalars(q))


# --- artifacts and uploads ---


def add_artifact(
    s: Session, job_id: str, attempt: int, name: str, path: str, size: int, sha256: str, media_type: str
) -> Artifact:
    """Record a file (``path`` relative to the artifact root); replaces an earlier attempt's same name."""
    old = s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if old is not None:
        old.attempt, old.path, old.size, old.sha256, old.media_type = attempt, path, size, sha256, media_type
        old.created_at = utcnow()
        s.flush()
        return old
    art = Artifact(
        job_id=job_id, attempt=attempt, name=name, path=path, size=size, sha256=sha256, media_type=media_type
    )
    s.add(art)
    s.flush()
    return art


def list_artifacts(s: Session, job_id: str) -> list[Artifact]:
    return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(s: Session, job_id: str, name: str) -> Artifact | None:
    return s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def add_upload(
    s: Session,
    owner: str,
    kind: str,
    filename: str,
    path: str,
    size: int,
    sha256: str,
    media_type: str,
    *,
    source_sha256: str | None = None,
    tensors: dict[str, list[int]] | None = None,
) -> Upload:
    """Record a stored upload. ``sha256`` is the stored file's; ``source_sha256`` the body's as sent,
    when the server converted it (default: the same); ``tensors`` a weights file's name -> shape."""
    up = Upload(
        owner=owner,
        kind=kind,
        filename=filename,
        path=path,
        size=size,
        sha256=sha256,
        source_sha256=source_sha256 or sha256,
        tensors=tensors,
        media_type=media_type,
    )
    s.add(up)
    s.flush()
    return up


def find_upload(s: Session, owner: str, kind: str, source_sha256: str) -> Upload | None:
    """``owner``'s oldest upload of ``kind`` whose body as sent had this sha256 (lowercase hex), if any;
    never another owner's."""
    q = select(Upload).where(
        Upload.owner == owner, Upload.source_sha256 == source_sha256.lower(), Upload.kind == kind
    )
    return s.scalar(q.order_by(Upload.created_at, Upload.id).limit(1))


def get_upload(s: Session, upload_id: str, owner: str | None = None) -> Upload | None:
    up = s.get(Upload, upload_id)
    if up is None or (owner is not None and up.owner != owner):
        return None
    return up


def list_uploads(
    s: Session, owner: str, *, limit: int = 50, cursor: str | None = None, sha256: str | None = None
) -> tuple[list[Upload], str | None]:
    """The owner's uploads, newest first, keyset-paginated like ``list_jobs`` (ValueError on a bad
    cursor); only those whose body as sent had ``sha256`` when given. Returns the page and the next
    cursor (None on the last page)."""
    limit = max(1, int(limit))
    q = select(Upload).where(Upload.owner == owner)
    if sha256:
        q = q.where(Upload.source_sha256 == sha256.lower())
    if cursor:
        created, upload_id = decode_cursor(cursor)
        q = q.where(
            or_(Upload.created_at < created, and_(Upload.created_at == created, Upload.id < upload_id))
        )
    rows = list(s.scalars(q.order_by(Upload.created_at.desc(), Upload.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return page, encode_cursor(page[-1]) if len(rows) > limit else None  # type: ignore[arg-type]


def upload_bytes(s: Session, owner: str) -> int:
    """The total size of ``owner``'s uploads, in bytes."""
    return int(s.scalar(select(func.coalesce(func.sum(Upload.size), 0)).where(Upload.owner == owner)) or 0)


# JobSpec (section, field) pairs that may hold ``upload:<id>``.
UPLOAD_REF_FIELDS = (("model", "weights"), ("kd", "teacher"), ("data", "root"))


def unfinished_jobs_using(s: Session, upload_id: str, owner: str) -> list[str]:
    """Ids of ``owner``'s queued or running jobs whose spec names ``upload:<id>`` (a job may only name
    its owner's uploads, so no one else's jobs need looking at)."""
    ref = f"upload:{upload_id}"
    q = select(Job.id, Job.spec).where(
        Job.owner == owner, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))
    )
    return [
        job_id
        for job_id, spec in s.execute(q.order_by(Job.created_at, Job.id))
        if any((spec.get(sec) or {}).get(field) == ref for sec, field in UPLOAD_REF_FIELDS)
    ]


def delete_upload(s: Session, upload_id: str, owner: str) -> Upload | None:
    """Delete the owner's upload row; returns it (its file is the caller's to remove after the commit),
    or None if there is no such upload of this owner."""
    up = get_upload(s, upload_id, owner=owner)
    if up is None:
        return None
    s.execute(delete(Upload).where(Upload.id == upload_id, Upload.owner == owner))
    return up


# --- API keys ---

KEY_PREFIX = "pk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(s: Session, owner: str, name: str = "") -> tuple[ApiKey, str]:
    """A new key for ``owner``; the plaintext is returned once and only its sha256 is stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(owner=owner, name=name, prefix=plaintext[:10], hash=hash_key(plaintext))
    s.add(key)
    s.flush()
    return key, plaintext


def owner_of_key(s: Session, plaintext: str) -> str | None:
    """The owner of a valid, unrevoked key, else None."""
    key = s.scalar(select(ApiKey).where(ApiKey.hash == hash_key(plaintext), ApiKey.revoked_at.is_(None)))
    return key.owner if key else None


def revoke_api_key(s: Session, key_id: str, owner: str) -> bool:
    res = s.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.owner == owner, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return res.rowcount == 1


def list_api_keys(s: Session, owner: str) -> list[ApiKey]:
    return list(s.scalars(select(ApiKey).where(ApiKey.owner == owner).order_by(ApiKey.created_at)))


# --- counters shown in /metrics ---

# counted by the reaper (or the local runner), shown by the API (api/metrics.py): names without _total
RETENTION_DELETED = "jobs_retention_deleted"
WEBHOOKS_DELIVERED = "webhook_deliveries_delivered"
WEBHOOKS_FAILED = "webhook_deliveries_failed"


def bump_counter(s: Session, name: str, by: int = 1) -> None:
    """Add ``by`` to the counter ``name`` (created at 0 the first time)."""
    for _ in range(3):
        res = s.execute(
            update(ServiceCounter).where(ServiceCounter.name == name).values(value=ServiceCounter.value + by)
        )
        if res.rowcount == 1:
            return
        try:
            with s.begin_nested():
                s.add(ServiceCounter(name=name, value=by))
            return
        except IntegrityError:  # another process created it meanwhile: add to theirs
            continue
    raise RuntimeError(f"counter {name!r} could not be updated")


def counters(s: Session) -> dict[str, int]:
    """Every counter by name."""
    return {name: int(value) for name, value in s.execute(select(ServiceCounter.name, ServiceCounter.value))}
