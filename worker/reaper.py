"""The reaper: gives jobs whose worker vanished back to the queue, and wakes jobs the broker never saw.

- running, lease expired (no heartbeat for ``lease_s``): re-queued and enqueued again (the next attempt
  resumes from the last checkpoint), or failed ``worker_lost`` once ``max_attempts`` are used up;
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
) -> dict[str, int]:
    """One pass; returns counts: ``requeued``, ``enqueued``, ``failed``, ``enqueue_errors``."""
    counts = {"requeued": 0, "enqueued": 0, "failed": 0, "enqueue_errors": 0}
    with session_scope(engine) as s:
        jobs = repo.stale_jobs(s, unqueued_after_s=unqueued_after_s)
    resend_before = utcnow() - timedelta(seconds=reenqueue_after_s)
    for job in jobs:
        if job.attempt >= job.max_attempts:
            with session_scope(engine) as s:
                if repo.fail_exhausted(s, job, "worker_lost"):
                    counts["failed"] += 1
                    log.warning("job %s failed: worker lost %d time(s)", job.id, job.attempt)
            continue
        if job.status == JobStatus.RUNNING:
            with session_scope(engine) as s:
                if not repo.requeue(s, job):
                    continue  # it finished or was claimed meanwhile
            counts["requeued"] += 1
            log.warning("job %s: attempt %d lost its worker; queued again", job.id, job.attempt)
        elif job.enqueued_at is not None and _aware(job.enqueued_at) > resend_before:
            continue  # sent recently: it is waiting for a free worker
        if _enqueue(engine, enqueue, job):
            counts["enqueued"] += 1
        else:
            counts["enqueue_errors"] += 1
    return counts


def _aware(t: datetime) -> datetime:
    """SQLite gives naive datetimes back (stored as UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _enqueue(engine: Engine, enqueue: Callable[[str], None], job: Job) -> bool:
    try:
        enqueue(job.id)
    except Exception:  # the broker is down: the row stays un-enqueued and the next pass retries
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
    while not stop.is_set():
        try:
            counts = reap_once(engine, enqueue, settings)
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
