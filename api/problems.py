"""RFC 9457 problem details: every error the API returns is ``application/problem+json``.

Routes raise ``Problem``; the handlers installed by ``install`` also turn FastAPI's validation errors,
Starlette's HTTP errors (unknown routes, 405) and unexpected exceptions into problems, so a client
never has to parse a second error shape and never sees a traceback. Input is checked before it reaches
the database; a value the database still refuses (out of its range, a NUL) is a 400, not a 500.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from store.objects import StoreUnavailable

log = logging.getLogger("api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:pruning:problem:"
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
RETRY_AFTER_S = 2  # what an overloaded or unreachable database asks clients to wait


class Problem(Exception):
    """An error answered as problem+json. ``slug`` names the problem type (``urn:pruning:problem:<slug>``);
    ``errors`` lists one ``{"field", "message"}`` per bad field."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON


def problem_response(request: Request, p: Problem) -> ProblemResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + p.slug if p.slug else "about:blank",
        "title": p.title,
        "status": p.status,
        "detail": p.detail,
        "instance": request.url.path,
    }
    if p.errors is not None:
        body["errors"] = p.errors
    body |= p.extra
    return ProblemResponse(body, status_code=p.status, headers=p.headers)


def _field(loc: tuple[Any, ...]) -> str:
    """``("body", "schedule", "epochs")`` -> ``schedule.epochs``; query/path/header keep their prefix."""
    parts = [str(p) for p in loc if not str(p).startswith(("function-after", "function-before"))]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "(body)"


def validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One ``{"field", "message"}`` per pydantic error."""
    out = []
    for e in errors:
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        out.append({"field": _field(tuple(e.get("loc", ()))), "message": msg})
    return out


def invalid(errors: list[dict[str, str]]) -> Problem:
    """The 422 problem for ``validation_errors``' list, as the request validation's own."""
    return Problem(
        422,
        f"{len(errors)} invalid field(s): {', '.join(dict.fromkeys(e['field'] for e in errors))}.",
        slug="validation-error",
        title="Invalid request",
        errors=errors,
    )


async def _on_problem(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, Problem)
    return problem_response(request, exc)


async def _on_validation(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        ctx = bad_json[0].get("ctx") or {}
        reason = ctx.get("error", "not valid JSON")
        where = bad_json[0].get("loc", ())
        pos = f" at character {where[1]}" if len(where) > 1 else ""
        return problem_response(
            request,
            Problem(
                400,
                f"The request body is not valid JSON: {reason}{pos}.",
                slug="malformed-json",
                title="Malformed JSON",
                errors=[{"field": "(body)", "message": f"{reason}{pos}"}],
            ),
        )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    whole_body = any(tuple(e.get("loc", ())) == ("body",) for e in errors)
    if whole_body and request.method in ("POST", "PUT", "PATCH") and not ctype.endswith(("/json", "+json")):
        return problem_response(
            request,
            Problem(
                415,
                f"Send the body as JSON with `Content-Type: application/json` (got {ctype or 'none'!r}).",
                slug="unsupported-media-type",
            ),
        )
    return problem_response(request, invalid(validation_errors(errors)))


# FastAPI's answer to a body its JSON parser gave up on (nested too deep, not UTF-8)
UNPARSED_BODY = "There was an error parsing the body"


async def _on_http(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 400 and detail == UNPARSED_BODY:
        return problem_response(
            request,
            Problem(
                400,
                "The request body could not be parsed as JSON (nested too deeply, or not UTF-8).",
                slug="malformed-json",
                title="Malformed JSON",
                errors=[{"field": "(body)", "message": "could not be parsed"}],
            ),
        )
    if exc.status_code == 404 and detail == HTTPStatus.NOT_FOUND.phrase:
        detail = f"No route for {request.method} {request.url.path}."
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}."
        headers["Allow"] = allowed_methods(request, headers.get("Allow", ""))
    return problem_response(request, Problem(exc.status_code, detail, headers=headers))


def allowed_methods(request: Request, fallback: str = "") -> str:
    """Every method the API serves at this path, from the OpenAPI document (RFC 9110 wants all of them
    in a 405's Allow; Starlette names only the first matching route's, e.g. POST alone for
    ``DELETE /v1/jobs``). Routes outside the schema (/docs) keep Starlette's ``fallback``."""
    path = request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].fullmatch(path):
            methods |= {m.upper() for m in operations if m.upper() in HTTP_METHODS}
    return ", ".join(sorted(methods)) or fallback


async def _on_database_busy(request: Request, exc: Exception) -> ProblemResponse:
    """No connection free in time, SQLite's write lock held past the wait, or the database unreachable:
    the request may well succeed later, so 503 with Retry-After rather than a 500."""
    log.warning("database busy on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request,
        Problem(
            503,
            "The database is busy or unreachable; retry shortly.",
            slug="database-busy",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ),
    )


async def _on_store_unavailable(request: Request, exc: Exception) -> ProblemResponse:
    """The bucket (OBJECT_STORE_URL) is down, slow or refuses the service's keys: 503 with Retry-After,
    never a 500, and nothing the request wrote is half there (objects are written whole)."""
    log.warning("object store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request,
        Problem(
            503,
            "The object store is unreachable; retry shortly.",
            slug="storage-unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ),
    )


async def _on_data_error(request: Request, exc: Exception) -> ProblemResponse:
    """A value the database refused (out of a column's range, a character it cannot store): the input's
    fault. Validation should have caught it first, so it is logged to be checked there too."""
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request,
        Problem(400, "A value in the request is outside what the server can store.", slug="invalid-value"),
    )


async def _on_crash(request: Request, exc: Exception) -> ProblemResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request,
        Problem(500, "The server hit an unexpected error; it has been logged.", slug="internal-error"),
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(PoolTimeoutError, _on_database_busy)
    app.add_exception_handler(OperationalError, _on_database_busy)
    app.add_exception_handler(DataError, _on_data_error)
    app.add_exception_handler(StoreUnavailable, _on_store_unavailable)
    app.add_exception_handler(Exception, _on_crash)


# For OpenAPI: the shape of every error response.
PROBLEM_SCHEMA = {
    "description": "An RFC 9457 problem",
    "content": {
        PROBLEM_JSON: {
            "schema": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "instance": {"type": "string"},
                    "errors": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                        },
                    },
                },
            }
        }
    },
}
