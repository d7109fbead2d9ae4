"""A job's events: a JSON page (``?after=N``), or a live ``text/event-stream`` resumable with
``Last-Event-ID``. The SSE id is the event's per-job sequence number; the stream polls the database in
short sessions and ends once the job is finished and its last event has been sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse

from store import repo
from store.models import TERMINAL, Job

from ..auth import OwnerDep
from ..deps import ReadSessionsDep
from ..problems import PROBLEM_SCHEMA
from ..schemas import EventOut, EventPage, event_out
from .jobs import owned_job

router = APIRouter(tags=["events"], responses={"4XX": PROBLEM_SCHEMA})

POLL_S = 0.5
PING_S = 15
BATCH = 500
MAX_SEQ = 2**31 - 1  # job_events.seq is a 32-bit integer column


def _fetch(
    sessions: sessionmaker[Session], job_id: str, after: int, limit: int
) -> tuple[list[EventOut], bool]:
    """Events after ``after`` and whether the job is finished. The status is read first, so a finished
    job's last event (written in the same transaction as its status) is in the page."""
    with sessions() as s:
        job = s.get(Job, job_id)
        done = job is None or job.status in TERMINAL
        return [event_out(e) for e in repo.events_after(s, job_id, after, limit)], done


async def _stream(sessions: sessionmaker[Session], job_id: str, after: int) -> AsyncIterator[dict[str, str]]:
    while True:
        events, done = await anyio.to_thread.run_sync(_fetch, sessions, job_id, after, BATCH)
        for ev in events:
            yield {"id": str(ev.id), "event": ev.kind, "data": json.dumps(ev.data)}
            after = ev.id
        if len(events) == BATCH:
            continue
        if done:
            return
        await anyio.sleep(POLL_S)


@router.get(
    "/v1/jobs/{job_id}/events",
    operation_id="job_events",
    response_model=EventPage,
    responses={200: {"content": {"text/event-stream": {}}, "description": "A page, or a live stream"}},
)
def job_events(
    job_id: str,
    request: Request,
    sessions: ReadSessionsDep,
    owner: OwnerDep,
    after: Annotated[
        int, Query(ge=0, le=MAX_SEQ, description="Events with a sequence number above this")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_SEQ)] = None,
):
    """With `Accept: text/event-stream`: a live stream (`id` = sequence number, `event` = kind, `data` =
    JSON) from `Last-Event-ID` (or `after`), ending when the job has finished. Otherwise a JSON page."""
    with sessions() as s:
        owned_job(s, owner, job_id)
    if accept and "text/event-stream" in accept:
        start = last_event_id if last_event_id is not None else after
        return EventSourceResponse(
            _stream(sessions, job_id, start), ping=PING_S, headers={"Cache-Control": "no-store"}
        )
    items, _ = _fetch(sessions, job_id, after, limit)
    return EventPage(items=items, next_after=items[-1].id if items else after)
