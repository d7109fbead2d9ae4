"""Once a job has ended, its directory keeps only what its artifact rows point at: the checkpoints and
the files of every attempt that did not finish it are deleted (a long job's checkpoints can weigh as
much as its model, once per attempt). With a bucket (OBJECT_STORE_URL) the same holds for the job's
objects, and this host's scratch copies go whole."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import Engine, select

from pruning_core.settings import Settings
from store.db import read_sessions
from store.models import Artifact, Job, JobStatus
from store.objects import artifact_store

log = logging.getLogger(__name__)

ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def clean_job_files(artifacts_root: Path, job_id: str, keep: set[str]) -> int:
    """Delete every file under ``<artifacts_root>/<job_id>/`` but ``keep`` (paths relative to the root,
    as the artifact rows store them), then the empty directories. Returns the number of files deleted;
    never raises (a file left behind costs disk, not the job)."""
    job_dir = artifacts_root / job_id
    if not job_dir.is_dir() or job_dir.is_symlink():
        return 0
    deleted = 0
    try:
        for path in sorted(job_dir.rglob("*"), reverse=True):  # children before their directories
            rel = path.relative_to(artifacts_root).as_posix()
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif rel not in keep:
                path.unlink()
                deleted += 1
        if not keep:
            shutil.rmtree(job_dir, ignore_errors=True)
    except OSError:
        log.warning("job %s: cleaning its files failed", job_id, exc_info=True)
    return deleted


def clean_job(settings: Settings, job_id: str, keep: set[str]) -> int:
    """``clean_job_files`` where the job's files are kept: the artifact directory, or, with a bucket
    (OBJECT_STORE_URL), its objects but ``keep`` and all of this host's scratch copies. Never raises."""
    store = artifact_store(settings)
    if not store.remote:
        return clean_job_files(settings.artifacts_dir, job_id, keep)
    deleted = clean_job_files(settings.artifacts_dir, job_id, set())  # scratch: the bucket has them
    try:
        deleted += store.delete([k for k in store.list(f"{job_id}/") if k not in keep])
    except Exception:
        log.warning("job %s: cleaning its objects failed", job_id, exc_info=True)
    return deleted


def _kept_paths(engine: Engine, ids: list[str]) -> dict[str, set[str]]:
    """Of the jobs ``ids``, those that ended, each with the paths its artifact rows keep."""
    with read_sessions(engine)() as s:
        ended = set(s.scalars(select(Job.id).where(Job.id.in_(ids), Job.status.in_(ENDED))))
        rows = s.execute(select(Artifact.job_id, Artifact.path).where(Artifact.job_id.in_(ended)))
        keep: dict[str, set[str]] = {j: set() for j in ended}
        for job_id, path in rows:
            keep[job_id].add(path)
    return keep


def sweep(engine: Engine, artifacts_root: Path, batch: int = 500) -> int:
    """Clean the directory of every job that has ended, keeping its artifacts: what the clean-up at a
    job's end could not reach (a job cancelled while queued after a lost attempt, jobs that ended before
    clean-up existed, a clean-up that failed). Reads only. Returns the number of files deleted."""
    if not artifacts_root.is_dir():
        return 0
    ids = sorted(p.name for p in artifacts_root.iterdir() if p.is_dir() and not p.is_symlink())
    deleted = 0
    for i in range(0, len(ids), batch):
        for job_id, paths in _kept_paths(engine, ids[i : i + batch]).items():
            deleted += clean_job_files(artifacts_root, job_id, paths)
    return deleted


def sweep_store(engine: Engine, settings: Settings, batch: int = 500) -> int:
    """``sweep`` for this host's directory, and, with a bucket, for the objects of every ended job
    (their checkpoints, the files of attempts that did not finish them). Returns the files deleted."""
    deleted = sweep(engine, settings.artifacts_dir, batch)
    store = artifact_store(settings)
    if not store.remote:
        return deleted
    by_job: dict[str, list[str]] = {}
    for key in store.list():
        by_job.setdefault(key.split("/", 1)[0], []).append(key)
    ids = sorted(by_job)
    for i in range(0, len(ids), batch):
        for job_id, paths in _kept_paths(engine, ids[i : i + batch]).items():
            deleted += store.delete([k for k in by_job[job_id] if k not in paths])
    return deleted
