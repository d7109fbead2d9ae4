"""``execute(job_id)``: claim a queued job, run the engine on it, record what it made, finish the row.

The database row is the truth and the queue only a wake-up call: the claim is one compare-and-set, so a
duplicate delivery (or a job cancelled while queued) finds nothing to claim and returns None. Each
attempt works in ``<artifacts>/<job>/attempt-<n>/``; a retry first copies the latest earlier attempt's
``checkpoints/`` there, and the engine resumes from them. Torch is imported only when a job runs.

With a bucket as the store (OBJECT_STORE_URL) that directory is this host's scratch: the uploads a job
names are downloaded to a local cache first, checkpoints go up as they are written (and come down for a
resume, worker/checkpoints.py), and the artifacts go up before their rows are written.

Outcomes: ``succeeded``; ``cancelled`` (asked for while running); ``failed`` with the engine's code and
``retryable`` False for a ``PruningError`` (bad data, unreachable target, ...), a spec the engine no
longer accepts, or running out of host or GPU memory (``out_of_memory``: another attempt would too; the
message says what to lower); ``failed``/``internal_error`` with ``retryable`` True for anything else (the traceback
goes to the log, one line to the row). A KeyboardInterrupt/SystemExit (the local runner stopping) gives
the attempt back to the queue, so the next start resumes it. So does a lost process of a job on several
GPUs (``RankLost``), counted as an attempt: like a dead worker, the next attempt resumes from the last
checkpoint, until ``max_attempts``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pruning_core.errors import Cancelled, DataError, PruningError, RankLost, WeightsError, one_line
from pruning_core.settings import Settings, get_settings
from pruning_core.spec import JobSpec, SpecError, parse_spec
from store import repo
from store.db import make_engine, read_sessions, session_scope
from store.files import attempt_dir, media_type, relative_to_root, sha256_file
from store.models import Job, JobStatus
from store.objects import ObjectStore, artifact_store, local_copy, upload_store

from .checkpoints import CHECKPOINTS, CheckpointSync, fetch_checkpoints
from .cleanup import clean_job
from .dbretry import is_transient, retry_write
from .reporter import TIME_UP, StoreReporter
from .sweeps import Enqueue, after_job

log = logging.getLogger(__name__)

UPLOAD_PREFIX = "upload:"
TIME_LIMIT_MESSAGE = "the job ran past its time limit"
# (section, field) of the JobSpec that may name a file, and the error a bad reference raises.
UPLOAD_FIELDS: tuple[tuple[str, str, type[PruningError]], ...] = (
    ("model", "weights", WeightsError),
    ("kd", "teacher", WeightsError),
    ("data", "root", DataError),
)
KEEP_AS_IS = {("kd", "teacher"): "dense"}  # values that name no file


@dataclass(frozen=True)
class Claimed:
    """What execute needs of the claimed row (plain values: no session outlives its transaction)."""

    id: str
    owner: str
    attempt: int
    spec: dict[str, Any]


def execute(
    job_id: str, *, worker_name: str, settings: Settings | None = None, enqueue: Enqueue | None = None
) -> str | None:
    """Run job ``job_id`` here if it can be claimed. Returns the final status, or None when there was
    nothing to claim or the attempt was taken over by another worker (it then writes nothing final).
    ``enqueue`` sends the jobs a sweep creates when this one ends it (none: embedded mode's runner finds
    them in the database)."""
    settings = settings or get_settings()
    engine = make_engine(settings.sqlalchemy_url)
    try:
        status = _execute(engine, job_id, worker_name, settings)
        if status is not None:  # this attempt ended the job: its sweep may move on
            after_job(engine, job_id, settings, enqueue or _polled)
        return status
    finally:
        engine.dispose()


def _polled(job_id: str) -> None:
    """Embedded mode sends nothing: its runner polls the database for queued jobs."""


def _execute(engine: Engine, job_id: str, worker_name: str, settings: Settings) -> str | None:
    with session_scope(engine) as s:
        job = repo.claim_job(
            s, job_id, worker_name, settings.lease_s, max_running=settings.quota_running_jobs
        )
        if job is None:
            log.info("job %s: nothing to claim (finished, cancelled or held by another worker)", job_id)
            return None
        claimed = Claimed(job.id, job.owner, job.attempt, dict(job.spec))
    log.info("job %s: attempt %d claimed by %s", job_id, claimed.attempt, worker_name)
    reporter = StoreReporter(
        engine,
        job_id,
        claimed.attempt,
        lease_s=settings.lease_s,
        heartbeat_s=settings.heartbeat_s,
        planned_epochs=_planned_epochs(claimed.spec),
        db_retry_s=settings.db_retry_s,
    ).start()
    try:
        return _run_claimed(engine, claimed, reporter, settings)
    except (KeyboardInterrupt, SystemExit):
        reporter.close()
        _give_back(engine, claimed)
        raise
    finally:
        reporter.close()


def _run_claimed(engine: Engine, job: Claimed, reporter: StoreReporter, settings: Settings) -> str | None:
    try:
        uploads, store = upload_store(settings), artifact_store(settings)
        spec = parse_spec(
            resolve_uploads(
                engine, job.spec, job.owner, uploads, settings.uploads_dir, settings.upload_cache_max_bytes
            )
        )
        scratch = settings.artifacts_dir  # the store itself, or this host's scratch beside a bucket
        workdir = attempt_dir(scratch, job.id, job.attempt)
        fetch_checkpoints(store, scratch, job.id, job.attempt)
        resumed_from = copy_checkpoints(scratch, job.id, job.attempt)
        if resumed_from is not None:
            reporter.message(f"resuming from the checkpoints of attempt {resumed_from}")
        from pruning_core.jobs import launch  # torch: only in the process that runs a job

        with CheckpointSync(store, scratch, workdir / CHECKPOINTS, every_s=settings.heartbeat_s):
            result = launch.run_job(spec, workdir, reporter, job_id=job.id)  # resources.gpus processes
        reporter.close()
        if reporter.lost:
            log.warning("job %s attempt %d is no longer ours; not recording it", job.id, job.attempt)
            return None
    except RankLost as err:
        return _rank_lost(engine, job, reporter, err)
    except Cancelled as err:
        if TIME_UP.is_set():  # stopped by the soft time limit's flag, not by a user
            return _fail(engine, job, reporter, settings, "time_limit", TIME_LIMIT_MESSAGE, retryable=False)
        return _finish(engine, job, reporter, settings, JobStatus.CANCELLED, message=str(err) or "cancelled")
    except PruningError as err:
        msg = one_line(err, USER_MESSAGE_MAX)
        return _fail(engine, job, reporter, settings, err.code, msg, retryable=False)
    except SpecError as err:
        msg = "; ".join(err.problems)
        return _fail(engine, job, reporter, settings, "invalid_spec", msg, retryable=False)
    except Exception as err:
        if type(err).__name__ == "SoftTimeLimitExceeded":  # a Celery soft limit that still raises, by name
            return _fail(engine, job, reporter, settings, "time_limit", TIME_LIMIT_MESSAGE, retryable=False)
        if _out_of_memory(err):  # another attempt would run out the same way
            log.warning("job %s attempt %d ran out of memory: %s", job.id, job.attempt, one_line(err, 500))
            msg = _oom_message(err, job.spec)
            return _fail(engine, job, reporter, settings, "out_of_memory", msg, retryable=False)
        log.exception("job %s attempt %d failed", job.id, job.attempt)
        return _fail(engine, job, reporter, settings, "internal_error", one_line(err, 500), retryable=True)
    # Outside the try: a database still unreachable after db_retry_s must not turn a trained job into
    # a failed one; the error goes up (Celery retries the task; the lease lapses and the reaper resumes).
    try:
        return _succeed(engine, job, result, settings)
    except Exception as err:
        if is_transient(err):
            raise
        log.exception("job %s attempt %d: recording its results failed", job.id, job.attempt)
        return _fail(engine, job, reporter, settings, "internal_error", one_line(err, 500), retryable=True)


# --- finishing ---


def _succeed(engine: Engine, job: Claimed, result: Any, settings: Settings) -> str | None:
    """Record every artifact and mark the row succeeded, in one transaction (all or nothing), retried
    while the database is unreachable; then drop the job's checkpoints and other attempts' files."""
    root, store = settings.artifacts_dir, artifact_store(settings)
    files = [(name, Path(path)) for name, path in sorted(result.artifacts.items())]
    records = [
        (name, relative_to_root(root, p), p.stat().st_size, sha256_file(p), media_type(name))
        for name, p in files
    ]
    for (_, rel, _, digest, _), (_, path) in zip(records, files, strict=True):
        store.put_file(rel, path, sha256=digest)  # before its row: a recorded artifact is always there

    def record(s: Session) -> bool:
        if not repo.finish_job(s, job.id, job.attempt, JobStatus.SUCCEEDED, result=summarize(result.report)):
            return _already(s, job, JobStatus.SUCCEEDED)
        for name, rel, size, digest, mtype in records:
            repo.add_artifact(s, job.id, job.attempt, name, rel, size, digest, mtype)
        return True

    if not retry_write(engine, record, for_s=settings.db_retry_s, what=f"finishing job {job.id}"):
        log.warning(
            "job %s attempt %d is no longer ours; its artifacts are not recorded", job.id, job.attempt
        )
        return None
    clean_job(settings, job.id, keep={rel for _, rel, *_ in records})
    log.info("job %s attempt %d succeeded (%d artifacts)", job.id, job.attempt, len(records))
    return JobStatus.SUCCEEDED.value


def _already(s: Session, job: Claimed, status: JobStatus) -> bool:
    """After a retry: did our earlier try commit ``status`` (its COMMIT's answer was lost)?"""
    row = s.get(Job, job.id, populate_existing=True)
    return row is not None and row.attempt == job.attempt and row.status == status


def _fail(
    engine: Engine,
    job: Claimed,
    reporter: StoreReporter,
    settings: Settings,
    code: str,
    message: str,
    retryable: bool,
) -> str | None:
    log.warning("job %s attempt %d failed: %s: %s", job.id, job.attempt, code, message)
    return _finish(
        engine, job, reporter, settings, JobStatus.FAILED, message=message, code=code, retryable=retryable
    )


def _finish(
    engine: Engine,
    job: Claimed,
    reporter: StoreReporter,
    settings: Settings,
    status: JobStatus,
    *,
    message: str,
    code: str | None = None,
    retryable: bool | None = None,
) -> str | None:
    """A terminal status with a ``message`` event first; None if the attempt is no longer ours."""
    reporter.close()
    if reporter.lost:
        log.warning("job %s attempt %d stopped: no longer ours", job.id, job.attempt)
        return None
    text = f"{status.value}: {message}" if code is None else f"failed ({code}): {message}"
    reporter.event("message", {"text": text})

    def record(s: Session) -> bool:
        done = repo.finish_job(
            s,
            job.id,
            job.attempt,
            status,
            error_code=code,
            error_message=message if code else None,
            retryable=retryable,
        )
        return done or _already(s, job, status)

    if not retry_write(engine, record, for_s=settings.db_retry_s, what=f"finishing job {job.id}"):
        return None
    clean_job(settings, job.id, keep=set())  # no artifacts: checkpoints and all go
    return status.value


def _give_back(engine: Engine, job: Claimed) -> None:
    """Interrupted (the runner is stopping): back to the queue now, rather than after the lease."""
    try:
        with session_scope(engine) as s:
            row = s.get(Job, job.id)
            done = row is not None and row.attempt == job.attempt and repo.requeue(s, row, interrupted=True)
    except Exception:  # the reaper requeues it once the lease expires
        log.warning("job %s: could not requeue after an interrupt", job.id, exc_info=True)
        return
    if done:
        log.info("job %s attempt %d interrupted; queued again", job.id, job.attempt)
    else:
        log.warning("job %s attempt %d interrupted; it was no longer ours to requeue", job.id, job.attempt)


def _rank_lost(engine: Engine, job: Claimed, reporter: StoreReporter, err: RankLost) -> None:
    """A process of the job died: back to the queue as a lost worker's attempt (``repo.requeue``
    counts it, and fails the job ``worker_lost`` once out of attempts); the poll or the reaper
    enqueues it again, and the next attempt resumes from the checkpoints."""
    log.warning("job %s attempt %d lost a process: %s", job.id, job.attempt, one_line(err, 500))
    reporter.close()
    if not reporter.lost:
        reporter.event("message", {"text": f"a process of the job ended: {one_line(err, 500)}; resuming"})
        with session_scope(engine) as s:
            row = s.get(Job, job.id)
            if row is not None and row.attempt == job.attempt:
                repo.requeue(s, row)
    return None


# --- inputs ---


def resolve_uploads(
    engine: Engine,
    spec: dict[str, Any],
    owner: str,
    uploads: ObjectStore,
    cache: Path,
    cache_max_bytes: int | None = None,
) -> dict[str, Any]:
    """The spec with every ``upload:<id>`` replaced by a file on this host: the upload's own file in a
    local upload directory, or its copy under ``cache`` downloaded from a bucket (once, checked
    against its sha256; the least recently used copies removed past ``cache_max_bytes``).

    The upload must exist, belong to the job's owner, and its file must be there. Any other file path is
    refused: clients name files only by upload id (the engine unpickles some data sets under a root).
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.items()}
    for section, field, error in UPLOAD_FIELDS:
        value = (out.get(section) or {}).get(field)
        if value is None or KEEP_AS_IS.get((section, field)) == value:
            continue
        if not isinstance(value, str) or not value.startswith(UPLOAD_PREFIX):
            raise error(f"{section}.{field} must be an upload reference `upload:<id>`, not a path")
        upload_id = value.removeprefix(UPLOAD_PREFIX)
        with read_sessions(engine)() as s:
            up = repo.get_upload(s, upload_id, owner=owner)
            rel, digest = (up.path, up.sha256) if up is not None else (None, None)
        if rel is None:
            raise error(f"{section}.{field}: upload {upload_id} not found")
        try:
            uploads.local_path(rel)  # ValueError: a path that leaves the store
        except ValueError:
            raise error(f"{section}.{field}: upload {upload_id} has an invalid path") from None
        try:
            path = local_copy(uploads, rel, cache, digest, cache_max_bytes=cache_max_bytes)
        except FileNotFoundError:
            raise error(f"{section}.{field}: the file of upload {upload_id} is missing") from None
        except ValueError as err:
            raise error(f"{section}.{field}: upload {upload_id}: {err}") from None
        out[section][field] = str(path)
    return out


def copy_checkpoints(artifacts_root: Path, job_id: str, attempt: int) -> int | None:
    """Copy the newest earlier attempt's ``checkpoints/`` into this attempt's; the attempt copied, if any."""
    dest = attempt_dir(artifacts_root, job_id, attempt) / "checkpoints"
    for prev in range(attempt - 1, 0, -1):
        src = attempt_dir(artifacts_root, job_id, prev) / "checkpoints"
        files = sorted(p for p in src.glob("*.pt") if p.is_file()) if src.is_dir() else []
        if files:
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                if not (dest / f.name).exists():
                    shutil.copy2(f, dest / f.name)
            return prev
    return None


def _planned_epochs(spec: dict[str, Any]) -> int:
    try:
        s = JobSpec.model_validate(spec).schedule
    except Exception:
        return 0
    return s.dense_epochs + s.epochs


# --- outputs ---


def summarize(report: Any) -> dict[str, Any]:
    """The short summary kept in ``Job.result`` (the whole report is the ``report.json`` artifact).

    Latency: the throughput batch's medians, and the speed-up with its 95 % interval and verdict.
    """
    lat = report.latency
    at = max(lat.batches, key=lambda b: b.batch_size) if lat is not None else None

    def cost(c: Any, ms: Any) -> dict[str, Any]:
        return {"macs": c.macs, "params": c.params, "top1": c.top1, "latency_ms": ms.median if ms else None}

    return {
        "method": report.method,
        "model": report.model,
        "data": report.data,
        "device": report.device,
        "target_macs_ratio": report.target_macs_ratio,
        "achieved_macs_ratio": report.achieved_macs_ratio,
        "params_ratio": report.params_ratio,
        "latency_speedup": report.latency_speedup,
        "latency_speedup_interval": [at.speedup.low, at.speedup.high] if at else None,
        "latency_verdict": at.verdict if at else None,
        "latency_batch_size": at.batch_size if at else None,
        "latency_busy": lat.busy if lat is not None else None,
        "latency_implausible": lat.implausible if lat is not None else None,
        "dense": cost(report.dense, at.dense_ms if at else None),
        "pruned": cost(report.pruned, at.pruned_ms if at else None),
        # right after the physical pruning, before recovery training (report.json's after_prune)
        "top1_after_prune": report.after_prune.top1 if report.after_prune is not None else None,
    }


def _out_of_memory(err: BaseException) -> bool:
    """Host memory (MemoryError) or GPU memory (torch.cuda.OutOfMemoryError, by name: no torch import;
    older builds raise a RuntimeError that says so)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _oom_message(err: BaseException, spec: dict[str, Any]) -> str:
    """What ran out and what the user can lower, with the values they asked for."""
    where = "host" if isinstance(err, MemoryError) else "GPU"
    data, schedule = spec.get("data") or {}, spec.get("schedule") or {}
    sizes = f"batch_size {schedule.get('batch_size', 'default')}, image_size {data.get('image_size') or 'default'}"
    return (
        f"the job ran out of {where} memory ({sizes}); lower schedule.batch_size or data.image_size, "
        "use fewer data.num_workers, or pick a smaller model"
    )


# A PruningError's message is the engine's own and may list every wrong key of a weights file: kept
# whole up to a bound; any other exception's text is cut shorter (it is not written for users).
USER_MESSAGE_MAX = 64 * 1024


__all__ = ["execute", "resolve_uploads", "copy_checkpoints", "summarize"]
