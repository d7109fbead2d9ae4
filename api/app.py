"""The FastAPI application factory: ``uvicorn --factory api.app:create_app`` (``python -m api`` serves it).

One Settings object, one engine, typed dependencies; routes per resource under ``/v1``. Migrations are
not run here (``python -m api`` runs them before serving). Never imports torch or worker/.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from pruning_core.settings import Settings, get_settings
from store.db import make_engine, read_sessions, sessions

from . import openapi, problems, queue, web
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .quotas import RateLimiter
from .routes import artifacts, catalog, events, health, jobs, sweeps, uploads

DESCRIPTION = """Structured pruning as a service: submit a JobSpec, follow its events, download the
physically smaller model and its report. Errors are RFC 9457 `application/problem+json`; authenticate
with `Authorization: Bearer <api key>`."""

# Sync routes, auth and response validation each run on one of these threads, and a thread holds at
# most one database connection at a time (sessions live inside one call), so a pool of the same size
# never makes a thread wait for a connection. Past the threads, requests queue in the event loop.
API_THREADS = 40
# The longest a request waits for a connection or SQLite's write lock before it answers 503.
DB_WAIT_S = 10.0


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.sqlalchemy_url, pool_size=API_THREADS, max_overflow=0, wait_s=DB_WAIT_S)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
        yield
        queue.close()
        app.state.rate_limiter.close()
        engine.dispose()

    app = FastAPI(title="Pruning service", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions(engine)
    app.state.read_sessions = read_sessions(engine)
    app.state.metrics = Metrics()
    app.state.metrics.watch_store(app.state.read_sessions)
    app.state.rate_limiter = RateLimiter(settings)
    problems.install(app)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    for module in (jobs, events, artifacts, sweeps, uploads, catalog, health):
        app.include_router(module.router)
    web.install(app)  # the pages under /ui (not in the OpenAPI document)
    openapi.install(app, settings)
    return app
