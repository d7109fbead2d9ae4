"""``celery -A tests.crashing_app worker``: the real Celery app, but every job's process is killed
(SIGKILL, as the out-of-memory killer would) at its first training step: a job that always crashes its
worker. The pool's children are forked from the process that imported this, so they inherit the patch."""

from __future__ import annotations

import os
import signal

from worker.celery_app import app
from worker.reporter import StoreReporter


def _die(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


StoreReporter.step = _die  # type: ignore[method-assign]

__all__ = ["app"]
