"""A job whose process died while its worker lived, handed on at once instead of after its lease.

Used by the Celery worker (``celery_app``, on ``WorkerLostError``) and the local runner; the reaper
covers the case where nobody saw the death (the lease lapses).
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from pruning_core.settings import Settings
from store import repo
from store.db import session_scope
from store.models import Job, JobStatus

from .cleanup import clean_job

log = logging.getLogger(__name__)


def hand_on_lost(engine: Engine, job_id: str, worker: str, settings: Settings) -> bool:
    """The process running ``job_id`` for ``worker`` died, and its parent saw it: requeue the attempt now
    rather than after its lease (failed ``worker_lost`` once ``max_attempts`` are used, cancelled if
    asked). True when it is queued again (the caller sees that it gets a message). Never raises: if the
    database is unreachable the reaper does it once the lease lapses."""
    try:
        with session_scope(engine) as s:
            job = s.get(Job, job_id)
            if job is None or job.status != JobStatus.RUNNING or job.worker != worker:
                return False
            attempt = job.attempt
            send = repo.requeue(s, job)
            status = s.get(Job, job_id, populate_existing=True).status
    except Exception:
        log.warning("job %s: could not hand it on after its process died", job_id, exc_info=True)
        return False
    if status in (JobStatus.FAILED, JobStatus.CANCELLED):
        clean_job(settings, job_id, keep=set())
    log.warning("job %s: the process of attempt %d died; now %s", job_id, attempt, status)
    return send
