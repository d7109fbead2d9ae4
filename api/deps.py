"""Typed dependencies: the app's one Settings, database sessions, and the caller's owner (auth.py).

There is deliberately no per-request session: a yield dependency would keep its connection (and on
SQLite the write lock) from the route's first query until its clean-up, across thread hops (response
validation runs on another pooled thread) that a burst of requests can starve. Routes open
``with sessions() as s:`` around the queries instead, so a connection is held only while used; GETs
use the read-only ones, which never take SQLite's write lock.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from pruning_core.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessions(request: Request) -> sessionmaker[Session]:
    """Sessions for a route that writes: commit explicitly (``s.commit()``) before side effects such as
    enqueueing; whatever is left uncommitted is rolled back when the ``with`` block ends."""
    return request.app.state.sessions


def get_read_sessions(request: Request) -> sessionmaker[Session]:
    """Sessions for a route that only reads."""
    return request.app.state.read_sessions


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
ReadSessionsDep = Annotated[sessionmaker[Session], Depends(get_read_sessions)]
