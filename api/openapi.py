"""The OpenAPI document, made to say what the API checks and answers.

On top of what FastAPI derives from the routes: this server's job limits (Settings) as the JobSpec
fields' ``maximum`` and its allowed models as ``model.name``'s enum (the same table the submit check
reads: pruning_core.spec.LIMITS); every error as problem+json (never FastAPI's own 422 shape); 503 where
a busy database answers it; and links from a created job (or upload) to the operations on it, so
clients and stateful testing can follow them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from pruning_core.settings import Settings
from pruning_core.spec import schema_limits

from .problems import PROBLEM_SCHEMA

HTTP_VERBS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
BUSY = {**PROBLEM_SCHEMA, "description": "The database is busy or unreachable: retry after Retry-After"}


def _job_links(*operations: str) -> dict[str, Any]:
    return {op: {"operationId": op, "parameters": {"job_id": "$response.body#/id"}} for op in operations}


_ON_JOB = (
    "get_job",
    "job_events",
    "list_artifacts",
    "cancel_job",
    "rerun_job",
    "list_deliveries",
    "delete_job",
)
# operationId -> status -> the links of that response
LINKS: dict[str, dict[str, dict[str, Any]]] = {
    "create_job": {"201": _job_links(*_ON_JOB), "200": _job_links(*_ON_JOB)},
    "get_job": {"200": _job_links("job_events", "list_artifacts", "cancel_job")},
    "cancel_job": {"202": _job_links("get_job", "job_events", "delete_job")},
    "rerun_job": {"201": _job_links(*_ON_JOB), "200": _job_links(*_ON_JOB)},
    "create_upload": {
        "201": {
            op: {"operationId": op, "parameters": {"upload_id": "$response.body#/id"}}
            for op in ("get_upload", "delete_upload")
        }
    },
}


def install(app: FastAPI, settings: Settings) -> None:
    """Replace ``app.openapi`` with FastAPI's document amended as above (built once, then cached)."""
    derive = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            amend(derive(), settings)  # derive() caches the document in app.openapi_schema
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def amend(doc: dict[str, Any], settings: Settings) -> None:
    schema_limits(doc.get("components", {}).get("schemas", {}), settings)
    for path, item in doc.get("paths", {}).items():
        for verb in HTTP_VERBS:
            if (op := item.get(verb)) is None:
                continue
            responses = op.setdefault("responses", {})
            if "422" in responses or "4XX" in responses or op.get("parameters") or "requestBody" in op:
                responses.pop("422", None)  # FastAPI's HTTPValidationError: ours is a problem
                responses.setdefault("4XX", PROBLEM_SCHEMA)
            if path.startswith("/v1/jobs") or path.startswith("/v1/uploads"):
                responses.setdefault("503", BUSY)
            for status, links in LINKS.get(op.get("operationId", ""), {}).items():
                if status in responses:
                    responses[status]["links"] = links
    schemas = doc.get("components", {}).get("schemas", {})
    if "HTTPValidationError" in schemas and "HTTPValidationError" not in str(doc.get("paths")):
        schemas.pop("HTTPValidationError")
        schemas.pop("ValidationError", None)
