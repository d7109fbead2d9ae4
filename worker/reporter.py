"""``StoreReporter``: the engine's Reporter, writing a running job's events, progress and heartbeat.

Every write is its own short transaction. A daemon thread renews the lease every ``heartbeat_s`` (so a
long step, a graph build or an export never lets the lease lapse while the process lives) and reads the
cancel flag; ``cancelled()`` only returns what the last heartbeat saw, so the engine can ask between
every step for free. If the attempt is no longer ours (the reaper gave it to another worker), the
reporter says "cancelled" too, so the engine stops at its next step and this attempt writes nothing
more. Torch-free: the engine's ``Reporter`` protocol is matched by shape.

Events count epochs from 1 within their phase, as the CLI and the report show them (the engine's
records count from 0, as its checkpoints do); an ``epoch`` event also carries the line ``prune run``
prints for it (``text``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from pruning_core.artifacts.report import epoch_line
from store import repo
from store.db import session_scope

from .dbretry import retry_write

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0
# Set by a soft time limit (the local runner's SIGALRM, Celery's SIGUSR1): the job's next cancel check
# (every training step) stops it and ``execute`` records ``time_limit``. Nothing is raised from the
# signal handler: an exception raised there can land in Python code that C++ called (torch's import,
# autograd hooks), and pybind11 then aborts the process ("terminate called after throwing an instance
# of 'pybind11::error_already_set'"), leaving the row running.
TIME_UP = threading.Event()


def on_soft_time_limit(_signum: int, _frame: object) -> None:
    """The soft time limit's signal handler: sets ``TIME_UP``, raises nothing (see above)."""
    TIME_UP.set()


def _json_safe(value: Any) -> Any:
    """Event data goes into a JSON column: NaN/inf become None, tuples lists, unknown objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


class StoreReporter:
    """Reporter for attempt ``attempt`` of job ``job_id``. Call ``start()`` before and ``close()`` after."""

    def __init__(
        self,
        engine: Engine,
        job_id: str,
        attempt: int,
        *,
        lease_s: float,
        heartbeat_s: float,
        planned_epochs: int = 0,
        progress_every_s: float = PROGRESS_EVERY_S,
        db_retry_s: float = 0.0,
    ):
        self.engine, self.job_id, self.attempt = engine, job_id, attempt
        self.lease_s, self.heartbeat_s = lease_s, max(0.05, heartbeat_s)
        self.progress_every_s = progress_every_s
        self.db_retry_s = db_retry_s  # how long an event write waits out an unreachable database
        self.planned_epochs = planned_epochs  # an estimate: all phases' epochs from the spec
        self.lost = False  # the attempt was taken from us (reaped): write nothing final
        self.cancel_requested = False
        self._phase: str | None = None
        self._phase_epochs = 0
        self._steps = 1
        self._epochs_before = 0  # epochs of the phases already finished in this attempt
        self._progress = 0.0
        self._last_progress_write = 0.0
        self._last_try = time.monotonic()  # of the last heartbeat, successful or not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> StoreReporter:
        self._thread = threading.Thread(target=self._beat_loop, name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beat(progress=self._progress or None)

    def beat(self, *, progress: float | None = None) -> None:
        """Renew the lease; read the cancel flag. A database error is logged, never raised."""
        self._last_try = time.monotonic()
        try:
            with session_scope(self.engine) as s:
                ours, cancel = repo.heartbeat(
                    s, self.job_id, self.attempt, self.lease_s, progress=progress, phase=self._phase
                )
        except Exception:  # a transient database error must not kill the job; the next beat retries
            log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)
            return
        if not ours and not self.lost:
            log.warning("job %s attempt %d is no longer ours; stopping", self.job_id, self.attempt)
        self.lost = self.lost or not ours
        self.cancel_requested = self.cancel_requested or cancel

    # --- the engine's Reporter protocol ---

    def phase(self, name: str, epochs: int, steps_per_epoch: int) -> None:
        if self._phase is not None and name != self._phase:
            self._epochs_before += self._phase_epochs
        self._phase, self._phase_epochs, self._steps = name, epochs, max(1, steps_per_epoch)
        self.event("phase", {"name": name, "epochs": epochs, "steps_per_epoch": steps_per_epoch})
        self.beat(progress=self._progress or None)

    def step(self, phase: str, epoch: int, step: int, loss: float) -> None:
        self._advance(epoch + step / self._steps)
        now = time.monotonic()
        if now - self._last_progress_write >= self.progress_every_s:
            self._last_progress_write = now
            data = {"progress": round(self._progress, 4), "phase": phase, "epoch": epoch + 1, "step": step}
            if math.isfinite(loss):
                data["loss"] = loss
            self.event("progress", data)
            self.beat(progress=self._progress)

    def epoch(self, record: dict[str, Any]) -> None:
        self._advance(record.get("epoch", 0) + 1)
        self.event("epoch", record | {"epoch": record.get("epoch", 0) + 1, "text": epoch_line(record)})

    def pruned(self, data: dict[str, Any]) -> None:
        """The network physically pruned: MACs and params before and after (``engine.report_pruned``)."""
        self.event("pruned", data)

    def message(self, text: str) -> None:
        self.event("message", {"text": text})

    def cancelled(self) -> bool:
        # Normally the heartbeat thread keeps the flag fresh; beat here too if it fell behind.
        if time.monotonic() - self._last_try > 2 * self.heartbeat_s:
            self.beat()
        return self.cancel_requested or self.lost or TIME_UP.is_set()

    # --- helpers ---

    def _advance(self, epochs_in_phase: float) -> None:
        """Progress over all planned epochs (never backwards; at most 0.99 until the job finishes)."""
        done = self._epochs_before + epochs_in_phase
        total = max(self.planned_epochs, self._epochs_before + self._phase_epochs, 1)
        self._progress = max(self._progress, min(0.99, done / total))

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """Append one event unless the attempt was lost; a seq race or an unreachable database is retried
        for up to ``db_retry_s`` (the engine waits meanwhile). Never raises."""
        if self.lost:
            return
        try:
            retry_write(
                self.engine,
                lambda s: repo.append_event(s, self.job_id, kind, _json_safe(data)),
                for_s=max(self.db_retry_s, 1.0),
                what=f"event of job {self.job_id}",
                also=(IntegrityError,),
            )
        except Exception:
            log.warning("event of job %s lost", self.job_id, exc_info=True)
