"""The Celery app: one job at a time per worker (one worker per GPU), a fresh child process per job.

Start a worker with ``celery -A worker.celery_app worker`` (REDIS_URL, DATABASE_URL in the environment).
The task is a thin wrapper over ``execute(job_id)``; the database row, not the broker, is the truth.

Why these settings:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after the job ran,
  so a worker killed mid-job does not lose it (the row's claim makes the redelivery harmless).
- ``worker_prefetch_multiplier=1``, concurrency 1: a busy GPU worker holds no other job hostage.
- ``worker_max_tasks_per_child=1``: each job runs in a fresh child, so torch (imported only there, never
  in this module or the parent) and CUDA state never leak between jobs.
- ``visibility_timeout`` above the hard time limit (in every place Celery reads it): Redis would
  otherwise redeliver a long job to a second worker while the first still runs it.
- ``JobRequest``: when the child running a job dies (SIGKILL, out of memory), the parent gives the
  attempt back in the database before Celery redelivers the message, so the redelivery resumes the job
  at once instead of finding it held until its lease lapses.
- The soft time limit only flags the job (``flag_soft_time_limit``): billiard's handler raises
  ``SoftTimeLimitExceeded`` wherever the signal lands, and inside torch's C++ that aborts the child.
"""

from __future__ import annotations

import signal
import threading

from celery import Celery
from celery.exceptions import WorkerLostError
from celery.worker.request import Request
from sqlalchemy.exc import DBAPIError

from pruning_core.settings import Settings, get_settings

TASK_NAME = "pruning.run_job"
QUEUE = "pruning"
DB_RETRIES, DB_RETRY_S = 20, 15


def celery_config(settings: Settings) -> dict:
    visibility = {"visibility_timeout": settings.job_time_limit_s + 600}
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_max_tasks_per_child": 1,
        "task_time_limit": settings.job_time_limit_s,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "broker_transport_options": dict(visibility),
        "result_backend_transport_options": dict(visibility),
        "task_ignore_result": True,
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
    }


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("pruning", broker=settings.redis_url)
    app.conf.update(celery_config(settings))
    return app


def enqueuer(app: Celery):
    """``enqueue(job_id)`` by task name (task id = job id), as the API does."""

    def enqueue(job_id: str) -> None:
        app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=QUEUE)

    return enqueue


class JobRequest(Request):
    """A task request whose failure by a lost child hands the job on (runs in the worker's parent)."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):  # noqa: ANN001
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # billiard wraps it with its traceback
        if isinstance(exc, WorkerLostError) and self.args:
            _hand_on(str(self.args[0]), self.hostname or "celery")
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


HAND_ON_WAIT_S = 15.0


def _hand_on(job_id: str, worker: str) -> None:
    """In a thread, waited for at most ``HAND_ON_WAIT_S``: an unreachable database must not stall the
    worker's consumer loop (the reaper hands the job on after its lease instead)."""
    import threading

    from store.db import make_engine

    from .lost import hand_on_lost

    def run() -> None:
        settings = get_settings()
        engine = make_engine(settings.sqlalchemy_url, pool_size=1, max_overflow=0, wait_s=10)
        try:
            hand_on_lost(engine, job_id, worker, settings)
        finally:
            engine.dispose()

    t = threading.Thread(target=run, name=f"hand-on-{job_id}", daemon=True)
    t.start()
    t.join(HAND_ON_WAIT_S)


def flag_soft_time_limit() -> bool:
    """In a prefork child, make Celery's soft time limit (SIGUSR1) set ``TIME_UP`` instead of raising
    ``SoftTimeLimitExceeded`` (``reporter.on_soft_time_limit`` says why); the job then stops at its next
    training step as ``time_limit``. Only billiard's own handler is replaced: elsewhere (a solo
    worker) SIGUSR1 is Celery's traceback dump and stays. True when it was replaced."""
    from billiard.pool import SIG_SOFT_TIMEOUT, soft_timeout_sighandler

    from .reporter import on_soft_time_limit

    if SIG_SOFT_TIMEOUT is None or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(SIG_SOFT_TIMEOUT) is not soft_timeout_sighandler:
        return False
    signal.signal(SIG_SOFT_TIMEOUT, on_soft_time_limit)
    return True


app = make_app()


@app.task(name=TASK_NAME, bind=True, max_retries=DB_RETRIES, Request=JobRequest)
def run_job(self, job_id: str) -> str | None:
    from .execute import execute  # imports no torch itself; the engine does, inside this child

    flag_soft_time_limit()  # a fresh child per job (max_tasks_per_child=1): nothing to restore
    try:
        return execute(job_id, worker_name=self.request.hostname or "celery", enqueue=enqueuer(self.app))
    except DBAPIError as err:
        # The database was unreachable (execute handles everything else itself): try again later
        # rather than drop the wake-up call. A redelivery after a claim finds nothing to claim.
        raise self.retry(exc=err, countdown=DB_RETRY_S) from err
