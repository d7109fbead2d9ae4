"""The reaper: gives jobs whose worker vanished back to the queue, and wakes jobs the broker never saw.

- running, lease expired (no heartbeat for ``lease_s``): re-queued and enqueued again (the next attempt
  resumes from the last checkpoint), failed ``worker_lost`` once ``max_attempts`` are used up, or
  cancelled if its owner asked for that meanwhile (``repo.requeue`` decides, by compare-and-set);
- queued, never enqueued (the API crashed between commit and enqueue, or the broker was down) for
  ``UNQUEUED_AFTER_S``, or enqueued more than ``REENQUEUE_AFTER_S`` ago (a message lost by the broker):
  enqueued again. A duplicate message is harmless (the claim is a compare-and-set), but not free, so a
  row that merely waits behind busy workers is re-sent rarely.

``python -m worker.reaper`` runs it every ``lease_s / 4`` seconds against Celery (by task name).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from pruning_core.settings import Settings, get_settings
from store import repo
from store.db import make_engine, session_scope
from store.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

UNQUEUED_AFTER_S = 30.0
REENQUEUE_AFTER_S = 3600.0


def reap_once(
    engine: Engine,
    enqueue: Callable[[str], None],
    settings: Settings,
    *,
    unqueued_after_s: float = UNQUEUED_AFTER_S,
    reenqueue_after_s: float = REENQUEUE_AFTER_S,
    unsent: set[str] | None = None,
) -> dict[str, int]:
    """One pass; returns counts: ``requeued``, ``enqueued``, ``failed``, ``cancelled``, ``enqueue_errors``.

    ``unsent`` (kept by a long-running caller between passes) holds the jobs whose enqueue failed, so they
    are sent again on the next pass however recently their row says they were queued.
    """
    counts = {"requeued": 0, "enqueued": 0, "failed": 0, "cancelled": 0, "enqueue_errors": 0}
    unsent = unsent if unsent is not None else set()
    with session_scope(engine) as s:
        jobs = repo.stale_jobs(s, unqueued_after_s=unqueued_after_s)
        retry = [j for j in (repo.get_job(s, i) for i in sorted(unsent)) if j is not None]
    resend = {j.id for j in retry if j.status == JobStatus.QUEUED}
    jobs += [j for j in retry if j.id in resend and j.id not in {j2.id for j2 in jobs}]
    unsent.clear()
    resend_before = utcnow() - timedelta(seconds=reenqueue_after_s)
    for job in jobs:
        if job.status == JobStatus.RUNNING or job.attempt >= job.max_attempts:
            # requeue: running -> queued (True); or, out of attempts -> failed worker_lost, or cancel
            # requested -> cancelled, or the row moved on (a heartbeat, a claim) -> unchanged (False).
            with session_scope(engine) as s:
                send = repo.requeue(s, job)
                status = s.get(Job, job.id, populate_existing=True).status
            if send:
                counts["requeued"] += 1
                log.warning("job %s: attempt %d lost its worker; queued again", job.id, job.attempt)
            elif status in (JobStatus.FAILED, JobStatus.CANCELLED) and status != job.status:
                counts["failed" if status == JobStatus.FAILED else "cancelled"] += 1
                log.warning(
                    "job %s: worker lost (attempt %d of %d): %s",
                    job.id,
                    job.attempt,
                    job.max_attempts,
                    status,
                )
            if not send:
                continue
        elif job.id not in resend and job.enqueued_at and _aware(job.enqueued_at) > resend_before:
            continue  # sent a while ago and not lost as far as we know: waiting for a free worker
        if _enqueue(engine, enqueue, job):
            counts["enqueued"] += 1
        else:
            counts["enqueue_errors"] += 1
            unsent.add(job.id)
    return counts


def _aware(t: datetime) -> datetime:
    """SQLite gives naive datetimes back (stored as UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _enqueue(engine: Engine, enqueue: Callable[[str], None], job: Job) -> bool:
    try:
        enqueue(job.id)
    except Exception:  # the broker is down: try again on the next pass
        log.warning("could not enqueue job %s", job.id, exc_info=True)
        return False
    with session_scope(engine) as s:
        repo.mark_enqueued(s, job.id)
    return True


def interval_s(settings: Settings) -> float:
    return max(1.0, settings.lease_s / 4)


def run_forever(
    engine: Engine, enqueue: Callable[[str], None], settings: Settings, stop: threading.Event
) -> None:
    unsent: set[str] = set()
    while not stop.is_set():
        try:
            counts = reap_once(engine, enqueue, settings, unsent=unsent)
            if any(counts.values()):
                log.info("reaper: %s", counts)
        except Exception:  # the database is down: try again next round
            log.warning("reaper pass failed", exc_info=True)
        stop.wait(interval_s(settings))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if not settings.redis_url:
        raise SystemExit("REDIS_URL is not set: in embedded mode `python -m worker.local` reaps")
    from .celery_app import enqueuer, make_app

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = make_engine(settings.sqlalchemy_url)
    log.info("reaper: every %.1f s, lease %.0f s", interval_s(settings), settings.lease_s)
    run_forever(engine, enqueuer(make_app(settings)), settings, stop)
    engine.dispose()


if __name__ == "__main__":
    main()
