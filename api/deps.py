"""Typed dependencies: the app's one Settings, database sessions, and the caller's owner (auth.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from pruning_core.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request. Writers commit explicitly (``s.commit()``) before side effects such as
    enqueueing; whatever is left uncommitted is rolled back when the request ends."""
    with request.app.state.sessions() as s:
        yield s


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
SessionDep = Annotated[Session, Depends(get_session)]
