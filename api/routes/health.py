"""Liveness, readiness (database and, when configured, the broker and the bucket) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from store.objects import artifact_store

from .. import queue
from ..auth import OwnerDep
from ..deps import SettingsDep
from ..problems import PROBLEM_SCHEMA, Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (answered on the event loop: never queued behind a burst on the threads)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: PROBLEM_SCHEMA})
def readyz(request: Request, settings: SettingsDep) -> dict[str, Any]:
    """The database answers `SELECT 1`; with REDIS_URL set, the broker answers a ping; with
    OBJECT_STORE_URL set, the bucket answers (HEAD, 2 s at most)."""
    checks: dict[str, str] = {}
    try:
        with request.app.state.read_sessions() as s:  # never waits for SQLite's write lock
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as err:
        checks["database"] = f"unreachable ({type(err).__name__})"
    if settings.redis_url:
        try:
            queue.ping(settings)
            checks["broker"] = "ok"
        except Exception as err:
            checks["broker"] = f"unreachable ({type(err).__name__})"
    else:
        checks["broker"] = "embedded (no broker)"
    if settings.object_store_url:
        try:
            artifact_store(settings).ping()
            checks["object_store"] = "ok"
        except Exception as err:
            checks["object_store"] = f"unreachable ({type(err).__name__})"
    bad = [k for k, v in checks.items() if v.startswith("unreachable")]
    if bad:
        raise Problem(503, f"Not ready: {', '.join(bad)} unreachable.", slug="not-ready", checks=checks)
    return {"status": "ready", "checks": checks}


@router.get("/metrics", response_class=Response, responses={"4XX": PROBLEM_SCHEMA})
def metrics(request: Request, _owner: OwnerDep) -> Response:
    """Prometheus text format. Needs an API key (Prometheus: `authorization: {credentials: <key>}`): the
    counts name no one, but they are no business of anonymous callers either."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
