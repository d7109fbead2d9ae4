"""Database writes that outlast a database restart: a short transaction, retried while the database is
unreachable (connection refused, dropped, pool exhausted, SQLite locked), with a growing pause.

The worker must not lose a finished job, nor fail it, because PostgreSQL restarted while it trained: its
heartbeat simply tries again at the next beat, and its events and its final write go through here.
A transaction whose COMMIT was lost in flight may have committed: every write retried here is either a
compare-and-set the caller can recognise as already done (finish) or harmless if repeated (an event).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from store.db import session_scope

log = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_PAUSE_S, MAX_PAUSE_S = 0.1, 2.0


def is_transient(err: BaseException) -> bool:
    """True for errors that say "the database is not there right now", not "this write is wrong"."""
    if isinstance(err, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(err, DBAPIError) and bool(err.connection_invalidated)


def retry_write(
    engine: Engine,
    fn: Callable[[Session], T],
    *,
    for_s: float,
    what: str,
    also: tuple[type[BaseException], ...] = (),
) -> T:
    """``fn(session)`` in its own transaction, retried for up to ``for_s`` seconds on a transient error
    (and on ``also``, e.g. a unique-seq race). The last error is raised once the time is up."""
    deadline = time.monotonic() + for_s
    pause, tries = FIRST_PAUSE_S, 0
    while True:
        tries += 1
        try:
            with session_scope(engine) as s:
                return fn(s)
        except Exception as err:
            if not (is_transient(err) or isinstance(err, also)) or time.monotonic() + pause > deadline:
                raise
            if tries == 1 or tries % 10 == 0:  # one line per outage, then now and then
                log.warning("%s: database unavailable (%s); retrying", what, type(err).__name__)
            time.sleep(pause)
            pause = min(MAX_PAUSE_S, pause * 2)
