"""The web pages served by the API process under ``/ui``: server-rendered (Jinja2, autoescaped), a
little plain JavaScript for live updates and the submit form's method options, no assets from
elsewhere. Signed in with an API key (session.py); outside the OpenAPI document."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from . import actions, pages
from .render import HERE, SecurityHeaders


def install(app: FastAPI) -> None:
    """Add the pages, their static files and their security headers to ``app``."""
    app.include_router(pages.router)
    app.include_router(actions.router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_middleware(SecurityHeaders)
