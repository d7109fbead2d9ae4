"""The reads the pages need beyond store.repo's: the jobs list filtered by method as well as status
(the same keyset pages as ``repo.list_jobs``, on the same index order). Owner-scoped like every read."""

from __future__ import annotations

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from store import repo
from store.models import Job, JobEvent


def list_jobs(
    s: Session, owner: str, *, status: str | None, method: str | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """The owner's jobs, newest first, keyset-paginated; the page and the next cursor (None: last page).
    Raises ValueError on a malformed cursor."""
    q = select(Job).where(Job.owner == owner)
    if status:
        q = q.where(Job.status == status)
    if method:
        q = q.where(Job.method == method)
    if cursor:
        created, job_id = repo.decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(s.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return page, repo.encode_cursor(page[-1]) if len(rows) > limit else None


EPOCH_EVENTS_MAX = 2000  # the chart's points: more epochs than any job's phases add up to in practice


def epoch_events(s: Session, job_id: str) -> list[JobEvent]:
    """The job's ``epoch`` events, oldest first (the chart)."""
    q = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "epoch")
        .order_by(JobEvent.seq)
        .limit(EPOCH_EVENTS_MAX)
    )
    return list(s.scalars(q))


def recent_events(s: Session, job_id: str, n: int) -> list[JobEvent]:
    """The job's last ``n`` events, newest first."""
    q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc()).limit(n)
    return list(s.scalars(q))
