"""Retention: with ``JOB_RETENTION_DAYS`` set, ended jobs older than that (by when they ended) are
deleted with their events, artifacts, webhook deliveries and files, as ``DELETE /v1/jobs/{id}`` would;
queued and running jobs, and the jobs of a sweep still open, stay. Run by the reaper (and the local
runner) once an hour; each deletion is logged and counted (``jobs_retention_deleted_total`` in the
API's /metrics)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import Engine

from pruning_core.settings import Settings
from store import repo
from store.db import read_sessions, session_scope
from store.models import utcnow
from store.objects import artifact_store

log = logging.getLogger(__name__)

BATCH = 100


def purge_expired(engine: Engine, settings: Settings, *, batch: int = BATCH) -> int:
    """Delete every ended job past ``settings.job_retention_days``; returns how many (0 when unset)."""
    days = settings.job_retention_days
    if days is None:
        return 0
    before = utcnow() - timedelta(days=days)
    total = 0
    while True:
        with read_sessions(engine)() as s:
            ids = repo.expired_job_ids(s, before, batch)
        with session_scope(engine) as s:
            deleted = [job_id for job_id in ids if repo.delete_job(s, job_id)]
            if deleted:
                repo.bump_counter(s, repo.RETENTION_DELETED, len(deleted))
        for job_id in deleted:
            _remove_files(settings, job_id)
            log.info("retention: job %s deleted (ended more than %g day(s) ago)", job_id, days)
        total += len(deleted)
        if len(ids) < batch or not deleted:
            break
    if total:
        log.info("retention: %d ended job(s) deleted with their files (JOB_RETENTION_DAYS=%g)", total, days)
    return total


def _remove_files(settings: Settings, job_id: str) -> None:
    try:
        artifact_store(settings).delete_prefix(f"{job_id}/")
    except Exception:  # only storage (a directory or a bucket): the row, and every link to the files, is gone
        log.warning("retention: job %s deleted, but removing its files failed", job_id, exc_info=True)
