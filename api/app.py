"""The FastAPI application factory: ``uvicorn --factory api.app:create_app`` (``python -m api`` serves it).

One Settings object, one engine, typed dependencies; routes per resource under ``/v1``. Migrations are
not run here (``python -m api`` runs them before serving). Never imports torch or worker/.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pruning_core.settings import Settings, get_settings
from store.db import make_engine, sessions

from . import problems, queue
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .routes import artifacts, catalog, events, health, jobs, uploads

DESCRIPTION = """Structured pruning as a service: submit a JobSpec, follow its events, download the
physically smaller model and its report. Errors are RFC 9457 `application/problem+json`; authenticate
with `Authorization: Bearer <api key>`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.sqlalchemy_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        queue.close()
        engine.dispose()

    app = FastAPI(title="Pruning service", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions(engine)
    app.state.metrics = Metrics()
    problems.install(app)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    for module in (jobs, events, artifacts, uploads, catalog, health):
        app.include_router(module.router)
    return app
