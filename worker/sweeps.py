"""Moving sweeps on from the worker side: after each job of a sweep ends (``after_job``, called by
``execute``) and on every reaper pass (``advance_open``: a worker killed between its job's end and its
call, a job ended by the reaper or the API). ``store.sweeps.advance`` is a compare-and-set, so the two
never create children twice nor end a sweep twice."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import Engine

from pruning_core.settings import Settings
from store import sweeps
from store.db import read_sessions, session_scope
from store.models import Job
from store.objects import artifact_store, upload_store

log = logging.getLogger(__name__)

Enqueue = Callable[[str], None]


def advance(engine: Engine, sweep_id: str, settings: Settings, enqueue: Enqueue) -> list[str]:
    """Advance one sweep (``store.sweeps.advance``) and enqueue the jobs it created. Returns their ids."""
    with session_scope(engine) as s:
        ids = sweeps.advance(s, sweep_id, artifact_store(settings), upload_store(settings))
    for job_id in ids:  # a failed send is the reaper's: the row stays queued and unsent
        try:
            enqueue(job_id)
        except Exception:
            log.warning("sweep %s: could not enqueue job %s", sweep_id, job_id, exc_info=True)
    if ids:
        log.info("sweep %s: %d job(s) created from the dense job's weights", sweep_id, len(ids))
    return ids


def after_job(engine: Engine, job_id: str, settings: Settings, enqueue: Enqueue) -> None:
    """If ``job_id`` belongs to a sweep, advance it, sending the jobs it creates with ``enqueue`` (the
    Celery worker's by task name; embedded mode's runner polls the database instead). Never raises: the
    reaper re-checks every open sweep."""
    try:
        with read_sessions(engine)() as s:
            job = s.get(Job, job_id)
            sweep_id = job.sweep_id if job is not None else None
        if sweep_id is not None:
            advance(engine, sweep_id, settings, enqueue)
    except Exception:
        log.warning("job %s: advancing its sweep failed; the reaper will", job_id, exc_info=True)


def advance_open(engine: Engine, settings: Settings, enqueue: Enqueue) -> int:
    """Advance every sweep that has not ended; returns how many jobs were created."""
    with read_sessions(engine)() as s:
        ids = sweeps.open_sweep_ids(s)
    created = 0
    for sweep_id in ids:
        try:
            created += len(advance(engine, sweep_id, settings, enqueue))
        except Exception:
            log.warning("sweep %s: advancing it failed", sweep_id, exc_info=True)
    return created
