"""Embedded mode (no Redis): poll the database for queued jobs and run each in a fresh child process.

``python -m worker.local``: queued jobs in a fair order (round-robin across owners, owners at their
running quota skipped: ``repo.fair_queued_job_ids``), one at a time, each through the same
``execute(job_id)`` as a Celery worker, in a child started with the ``spawn`` method (a clean
interpreter: torch and CUDA state never outlive a job, and this process never imports torch). The
reaper runs here too, with a no-op enqueue: the poll itself picks queued rows up; so do retention and
the webhook pump.

Time limit (``job_time_limit_s``, as Celery's): at the soft limit the child sets ``TIME_UP``
(``reporter.on_soft_time_limit``, which raises nothing), so the job's next cancel check (every training
step) stops it and ``execute`` records it as Celery's soft limit: ``failed``, ``time_limit``, not
retryable. At the hard limit the parent kills the child's process group and fails the row itself
(a phase with no cancel check that outlasts the soft limit ends there).

SIGTERM / SIGINT: stop polling; a running child gets one SIGINT, so the engine checkpoints at its next
step and the job goes back to the queue (the next start resumes it); after a grace period it is killed
(its lease then expires and the reaper requeues it).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

from sqlalchemy import Engine

from pruning_core.settings import Settings, get_settings
from store import repo
from store.db import make_engine, migrate, read_sessions, session_scope
from store.models import JobStatus

from .cleanup import sweep_store
from .lost import hand_on_lost
from .reaper import SWEEP_EVERY_S, interval_s, reap_once
from .reporter import on_soft_time_limit
from .retention import purge_expired
from .sweeps import advance_open
from .webhooks import start_pump

log = logging.getLogger(__name__)

EXIT_DONE, EXIT_NOTHING, EXIT_INTERRUPTED = 0, 3, 4
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


TIME_LIMIT_CODE = "time_limit"


def next_queued(
    engine: Engine, skip: set[str] | frozenset[str] = frozenset(), *, max_running: int = 0
) -> str | None:
    """The fairest queued job that can be claimed (``repo.fair_queued_job_ids``), skipping ``skip``."""
    with read_sessions(engine)() as s:  # a poll only reads: it never waits for SQLite's write lock
        ids = repo.fair_queued_job_ids(s, limit=len(skip) + 1, max_running=max_running)
    return next((i for i in ids if i not in skip), None)


def _child(job_id: str, worker_name: str, settings: Settings) -> None:
    """The child: its own process group (a terminal's Ctrl-C reaches only the parent, which forwards
    exactly one SIGINT), the soft time limit armed, then ``execute``. The exit code tells the parent
    what happened."""
    os.setpgrp()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    from .execute import execute

    signal.signal(signal.SIGALRM, on_soft_time_limit)
    signal.setitimer(signal.ITIMER_REAL, settings.job_soft_time_limit_s)
    try:
        status = execute(job_id, worker_name=worker_name, settings=settings)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    sys.exit(EXIT_DONE if status else EXIT_NOTHING)


class LocalRunner:
    def __init__(self, settings: Settings, *, poll_s: float = 1.0, grace_s: float = 60.0):
        self.settings, self.poll_s, self.grace_s = settings, poll_s, grace_s
        self.worker_name = f"local@{socket.gethostname()}:{os.getpid()}"
        self.engine = make_engine(settings.sqlalchemy_url)
        self.ctx = multiprocessing.get_context("spawn")
        self._last_reap = float("-inf")
        self._next_sweep = 0.0  # monotonic time of the next sweep of ended jobs' files
        self._skip: dict[str, float] = {}  # job id -> until (monotonic): nothing was claimable

    def run(self, stop: threading.Event) -> None:
        log.info("local runner %s: polling %s", self.worker_name, _safe_url(self.settings.sqlalchemy_url))
        pump = start_pump(self.engine, self.settings, stop)  # job-ended webhooks, from the outbox
        while not stop.is_set():
            try:
                self._maybe_reap()
                job_id = next_queued(
                    self.engine, self._skipped(), max_running=self.settings.quota_running_jobs
                )
            except Exception:  # database unavailable: wait and try again
                log.warning("poll failed", exc_info=True)
                stop.wait(self.poll_s)
                continue
            if job_id is None:
                stop.wait(self.poll_s)
                continue
            code = self.run_child(job_id, stop)
            if code == EXIT_NOTHING:
                self._skip[job_id] = time.monotonic() + 10 * self.poll_s
            elif code == EXIT_INTERRUPTED:
                log.info("job %s: interrupted", job_id)
            elif code != EXIT_DONE:
                # The child died (killed, out of memory): its attempt goes back to the queue now.
                log.warning("job %s: child exited with %s", job_id, code)
                hand_on_lost(self.engine, job_id, self.worker_name, self.settings)
        pump.join(self.settings.webhook_timeout_s * 3)  # an attempt under way ends (or its claim lapses)
        self.engine.dispose()
        log.info("local runner stopped")

    def run_child(self, job_id: str, stop: threading.Event) -> int | None:
        """Run one job in a fresh child; returns its exit code."""
        p = self.ctx.Process(
            target=_child, args=(job_id, self.worker_name, self.settings), name=f"job-{job_id}"
        )
        p.start()
        deadline = time.monotonic() + self.settings.job_time_limit_s
        interrupted_at: float | None = None
        while True:
            p.join(0.5)
            if p.exitcode is not None:
                return p.exitcode
            now = time.monotonic()
            if now > deadline:
                log.warning("job %s ran past its hard time limit; killing it", job_id)
                _kill_group(p)
                self._fail_time_limit(job_id)
                return p.exitcode
            if stop.is_set() and interrupted_at is None:
                log.info("stopping: interrupting job %s (it checkpoints and goes back to the queue)", job_id)
                _signal(p.pid, signal.SIGINT)
                interrupted_at = now
            elif interrupted_at is not None and now - interrupted_at > self.grace_s:
                log.warning("job %s did not stop within %.0f s; killing it", job_id, self.grace_s)
                p.kill()
                p.join()
                return p.exitcode
            self._maybe_reap()

    def _fail_time_limit(self, job_id: str) -> None:
        """The killed child's attempt (still running under this runner) -> failed ``time_limit``."""
        try:
            with session_scope(self.engine) as s:
                job = repo.get_job(s, job_id)
                if job is not None and job.status == JobStatus.RUNNING and job.worker == self.worker_name:
                    repo.finish_job(
                        s,
                        job_id,
                        job.attempt,
                        JobStatus.FAILED,
                        error_code=TIME_LIMIT_CODE,
                        error_message=f"the job ran past its time limit ({self.settings.job_time_limit_s} s)",
                        retryable=False,
                    )
        except Exception:  # the lease then expires and the reaper acts on it
            log.warning("job %s: could not record its time limit", job_id, exc_info=True)

    def _maybe_reap(self) -> None:
        if time.monotonic() - self._last_reap < interval_s(self.settings):
            return
        self._last_reap = time.monotonic()
        if self._last_reap >= self._next_sweep:
            self._next_sweep = self._last_reap + SWEEP_EVERY_S
            try:
                purge_expired(self.engine, self.settings)
                sweep_store(self.engine, self.settings)
            except Exception:
                log.warning("sweeping ended jobs' files failed", exc_info=True)
        try:
            counts = reap_once(self.engine, lambda _job_id: None, self.settings)
            advance_open(self.engine, self.settings, lambda _job_id: None)  # sweeps: see worker.sweeps
        except Exception:
            log.warning("reaper pass failed", exc_info=True)
            return
        if any(counts.values()):
            log.info("reaper: %s", counts)

    def _skipped(self) -> set[str]:
        now = time.monotonic()
        self._skip = {k: t for k, t in self._skip.items() if t > now}
        return set(self._skip)


def _kill_group(p: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL the child and whatever it started (data loader workers): it leads its own group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
    p.kill()  # in case it had not made its own group yet
    p.join()


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _safe_url(url: str) -> str:
    """The database URL without a password, for the log."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    settings = get_settings()
    migrate(settings.sqlalchemy_url)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    LocalRunner(settings).run(stop)


if __name__ == "__main__":
    main()
