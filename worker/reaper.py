"""The reaper: gives jobs whose worker vanished back to the queue, and wakes jobs the broker never saw.

- running, lease expired (no heartbeat for ``lease_s``): re-queued and enqueued again (the next attempt
  resumes from the last checkpoint), failed ``worker_lost`` once ``max_attempts`` are used up, or
  cancelled if its owner asked for that meanwhile (``repo.requeue`` decides, by compare-and-set);
- queued, never enqueued (the API crashed between commit and enqueue, or the broker was down) for
  ``unqueued_after_s`` (a setting), or enqueued more than ``REENQUEUE_AFTER_S`` ago (a message lost by the broker):
  enqueued again. A duplicate message is harmless (the claim is a compare-and-set), but not free, so a
  row that merely waits behind busy workers is re-sent rarely;
- every queued job, when the broker lost its messages (Redis restarted with nothing on disk, or was
  flushed): ``BrokerMarker`` keeps a key in Redis, and finding it gone means the queue was lost too.

A job the reaper ends (failed ``worker_lost``, cancelled) has its files cleaned up like any other.
Once an hour it also deletes ended jobs past ``JOB_RETENTION_DAYS`` (worker/retention.py), and a thread
of it delivers job-ended webhooks from their outbox (worker/webhooks.py).

``python -m worker.reaper`` runs it every ``lease_s / 4`` seconds against Celery (by task name).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from pruning_core.settings import Settings, get_settings
from store import repo
from store.db import make_engine, read_sessions, session_scope
from store.models import Job, JobStatus, utcnow

from .cleanup import clean_job, sweep_store
from .retention import purge_expired
from .sweeps import advance_open
from .webhooks import start_pump

log = logging.getLogger(__name__)

REENQUEUE_AFTER_S = 3600.0
BROKER_MARKER_KEY = "pruning:reaper:broker-marker"
SWEEP_EVERY_S = 3600.0  # how often ended jobs' directories are swept (see cleanup.sweep)


def reap_once(
    engine: Engine,
    enqueue: Callable[[str], None],
    settings: Settings,
    *,
    unqueued_after_s: float | None = None,
    reenqueue_after_s: float = REENQUEUE_AFTER_S,
    unsent: set[str] | None = None,
) -> dict[str, int]:
    """One pass; returns counts: ``requeued``, ``enqueued``, ``failed``, ``cancelled``, ``enqueue_errors``.

    ``unsent`` (kept by a long-running caller between passes) holds the jobs whose enqueue failed, so they
    are sent again on the next pass however recently their row says they were queued.
    """
    counts = {"requeued": 0, "enqueued": 0, "failed": 0, "cancelled": 0, "enqueue_errors": 0}
    unsent = unsent if unsent is not None else set()
    if unqueued_after_s is None:
        unqueued_after_s = settings.unqueued_after_s
    with read_sessions(engine)() as s:  # reads only: no SQLite write lock while it looks
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
                clean_job(settings, job.id, keep=set())
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


class BrokerMarker:
    """A key kept in the broker's Redis database. Its absence means Redis lost its data (restarted with
    nothing on disk, flushed), and with it every queued message: ``lost()`` is then True once, and the
    key is set again. True on the very first pass too, which costs one harmless message per queued job."""

    def __init__(self, redis_url: str):
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)

    def lost(self) -> bool:
        return bool(self.client.set(BROKER_MARKER_KEY, utcnow().isoformat(), nx=True))

    def close(self) -> None:
        self.client.close()


def queued_ids(engine: Engine) -> set[str]:
    """Every queued job a worker could claim (all of them need a message after the broker lost its own)."""
    with read_sessions(engine)() as s:
        return set(repo.queued_job_ids(s, limit=1_000_000))


def run_forever(
    engine: Engine,
    enqueue: Callable[[str], None],
    settings: Settings,
    stop: threading.Event,
    marker: BrokerMarker | None = None,
) -> None:
    unsent: set[str] = set()
    next_sweep = 0.0
    while not stop.is_set():
        try:
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_EVERY_S
                purge_expired(engine, settings)  # retention (JOB_RETENTION_DAYS); it logs what it deletes
                if n := sweep_store(engine, settings):
                    log.info("reaper: deleted %d file(s) of ended jobs", n)
            if marker is not None:
                queued = queued_ids(engine)  # read before the marker is reset: a failure keeps it unset
                if marker.lost():
                    log.warning("the broker lost its messages: enqueueing %d queued job(s)", len(queued))
                    unsent |= queued
            counts = reap_once(engine, enqueue, settings, unsent=unsent)
            if any(counts.values()):
                log.info("reaper: %s", counts)
            advance_open(engine, settings, enqueue)  # sweeps whose last job ended without moving them on
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
    marker = BrokerMarker(settings.redis_url)
    log.info("reaper: every %.1f s, lease %.0f s", interval_s(settings), settings.lease_s)
    pump = start_pump(engine, settings, stop)  # job-ended webhooks, from the outbox
    run_forever(engine, enqueuer(make_app(settings)), settings, stop, marker)
    pump.join(settings.webhook_timeout_s * 3)  # an attempt under way ends (or its claim lapses)
    marker.close()
    engine.dispose()


if __name__ == "__main__":
    main()
