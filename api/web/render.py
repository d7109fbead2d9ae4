"""Templates, the page route class and security headers.

``PageRoute`` turns what a JSON route would answer as a problem into a page: a 401 becomes a redirect
to sign-in, anything else an error page with the same status (another owner's job is the same 404
page as an unknown one). Every page under ``/ui`` gets a CSP that allows no inline script, and headers
against framing, sniffing and caching."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..problems import Problem
from .session import PAGES, csrf_token, keep_csrf, page_key, pages_path

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescaped (.html)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# report.html in its iframe: no script, no same-origin rights, only its inline style and data: images.
REPORT_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def render(request: Request, name: str, code: int = 200, **ctx: Any) -> HTMLResponse:
    """Template ``name`` with the page basics (root path, CSRF token, whether signed in)."""
    base = {
        "root": pages_path(request),
        "csrf": csrf_token(request),
        "signed_in": page_key(request) is not None,
    }
    resp = templates.TemplateResponse(request, name, base | ctx, status_code=code)
    keep_csrf(request, resp)
    return resp


def to_signin(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{pages_path(request)}/signin", status_code=303)


def error_page(request: Request, status: int, detail: str) -> Response:
    if status == 401:
        return to_signin(request)
    return render(request, "error.html", status, status_code=status, detail=detail)


class PageRoute(APIRoute):
    """A page: problems (and bad query parameters) answered as HTML, a 401 as a redirect to sign-in."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                return await handler(request)
            except Problem as p:
                resp = error_page(request, p.status, p.detail)
                resp.headers.update({k: v for k, v in p.headers.items() if k.lower() == "retry-after"})
                return resp
            except RequestValidationError:
                return error_page(request, 400, "A parameter of this page's address is malformed.")

        return page


class SecurityHeaders:
    """The headers above on every response under ``/ui`` that does not set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.removeprefix(scope.get("root_path", "")).startswith(PAGES):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
