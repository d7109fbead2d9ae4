"""Once a job has ended, its directory keeps only what its artifact rows point at: the checkpoints and
the files of every attempt that did not finish it are deleted (a long job's checkpoints can weigh as
much as its model, once per attempt)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


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
