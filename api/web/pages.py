"""The reading pages: jobs, a job (with its live events, report and artifacts), submit, uploads.

They read the store through the JSON routes' own functions and repository calls, scoped to the owner
the API would see for the same key (api.auth), so no page shows what a JSON route would not."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import RedirectResponse

from pruning_core import spec
from store import repo
from store.models import JobStatus

from ..routes import artifacts, events
from ..routes.jobs import check_cursor, owned_job
from . import forms, queries, view
from .render import REPORT_CSP, PageRoute, render
from .session import owner_from_key, page_key, pages_path

router = APIRouter(prefix="/ui", include_in_schema=False, route_class=PageRoute)

PAGE_SIZES = (20, 50, 100)
RECENT_EVENTS = 200
REPORT = "report.html"
# The job actions the pages offer, each through its API route: name -> (method, path).
ACTIONS = {
    "cancel": ("POST", "/v1/jobs/{}/cancel"),
    "rerun": ("POST", "/v1/jobs/{}/rerun"),
    "delete": ("DELETE", "/v1/jobs/{}"),
}


def require_owner(request: Request) -> str:
    """The signed-in owner; a 401 problem (a redirect to sign-in, via PageRoute) otherwise."""
    return owner_from_key(request, page_key(request))


@router.get("")
def home(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{pages_path(request)}/jobs", status_code=303)


@router.get("/signin")
def signin_page(request: Request) -> Response:
    return render(request, "signin.html")


@router.get("/jobs")
def jobs_page(
    request: Request,
    status: Annotated[str, Query(max_length=16)] = "",
    method: Annotated[str, Query(max_length=32)] = "",
    cursor: Annotated[str, Query(max_length=512)] = "",
    limit: Annotated[int, Query(ge=1, le=max(PAGE_SIZES))] = PAGE_SIZES[0],
    notice: Annotated[str, Query(max_length=32)] = "",
) -> Response:
    """The owner's jobs, newest first, filtered by status and method, a page at a time."""
    owner = require_owner(request)
    statuses, methods = [str(s) for s in JobStatus], list(spec.METHODS)
    status, method = (status if status in statuses else ""), (method if method in methods else "")
    if cursor:
        check_cursor(cursor)
    with request.app.state.read_sessions() as s:
        jobs, next_cursor = queries.list_jobs(
            s, owner, status=status or None, method=method or None, limit=limit, cursor=cursor or None
        )
    return render(
        request,
        "jobs.html",
        owner=owner,
        rows=[view.job_row(j) for j in jobs],
        statuses=statuses,
        methods=methods,
        status=status,
        method=method,
        limit=limit,
        next_cursor=next_cursor,
        first_page=not cursor,
        notice=notice,
    )


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    """One job: status, live progress (phase, epoch line, chart), events, actions, report, artifacts."""
    return job_view(request, job_id)


def job_view(request: Request, job_id: str, code: int = 200, error: str = "") -> Response:
    """The job page, with ``error`` (an action the API refused) above it."""
    owner = require_owner(request)
    with request.app.state.read_sessions() as s:
        job = owned_job(s, owner, job_id)
        epochs = [e.data for e in queries.epoch_events(s, job_id)]
        recent = queries.recent_events(s, job_id, RECENT_EVENTS)
        arts = repo.list_artifacts(s, job_id)
    last_epoch = next((e.data.get("text", "") for e in recent if e.kind == "epoch"), "")
    return render(
        request,
        "job.html",
        code,
        owner=owner,
        job=job,
        row=view.job_row(job),
        ended=job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED),
        events=recent,
        last_seq=recent[0].seq if recent else 0,
        epoch_line=last_epoch,
        chart=view.chart(epochs),
        chart_data=[[e.get("top1"), e.get("train_loss")] for e in epochs],
        artifacts=[(a, view.size(a.size)) for a in arts],
        has_report=any(a.name == REPORT for a in arts),
        actions=ACTIONS,
        error=error,
    )


@router.get("/jobs/{job_id}/events")
def job_events_stream(
    request: Request,
    job_id: str,
    after: Annotated[int, Query(ge=0, le=events.MAX_SEQ)] = 0,
    last_event_id: Annotated[int | None, Header(ge=0, le=events.MAX_SEQ)] = None,
) -> Response:
    """The job's live event stream (the API's own, for the page's EventSource, which sends the cookie)."""
    owner = require_owner(request)
    sessions = request.app.state.read_sessions
    return events.job_events(
        job_id=job_id,
        request=request,
        sessions=sessions,
        owner=owner,
        after=after,
        limit=100,
        accept="text/event-stream",
        last_event_id=last_event_id,
    )


def _artifact(request: Request, job_id: str, name: str, range_: str | None, etag: str | None) -> Response:
    owner = require_owner(request)
    settings = request.app.state.settings
    sessions = request.app.state.read_sessions
    return artifacts.download_artifact(job_id, name, sessions, owner, settings, range_, etag)


@router.get("/jobs/{job_id}/artifacts/{name:path}")
def artifact_download(
    request: Request,
    job_id: str,
    name: str,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """An artifact as the API serves it (sha256 ETag, ranges), behind the page's sign-in."""
    return _artifact(request, job_id, name, range_, if_none_match)


@router.get("/jobs/{job_id}/report")
def report(request: Request, job_id: str) -> Response:
    """``report.html`` inline, for the job page's sandboxed iframe (and as a page of its own)."""
    resp = _artifact(request, job_id, REPORT, None, None)
    resp.headers["content-disposition"] = "inline"
    resp.headers["content-security-policy"] = REPORT_CSP
    resp.headers["x-frame-options"] = "SAMEORIGIN"
    return resp


def _uploads(request: Request, owner: str) -> list[Any]:
    with request.app.state.read_sessions() as s:
        ups, _ = repo.list_uploads(s, owner, limit=200)
    return ups


@router.get("/submit")
def submit_page(request: Request) -> Response:
    """The submit form; query parameters named like its fields prefill them (``model.weights=upload:...``)."""
    owner = require_owner(request)
    values = {k: v for k, v in request.query_params.items() if len(v) <= 4096}
    return submit_form(request, owner, values, {}, 200)


def submit_form(
    request: Request,
    owner: str,
    values: dict[str, Any],
    errors: dict[str, list[str]],
    status: int,
    detail: str = "",
) -> Response:
    settings = request.app.state.settings
    return render(
        request,
        "submit.html",
        status,
        owner=owner,
        sections=forms.spec_sections(settings),
        methods=forms.method_sections(settings),
        method=values.get("method.name") or "magnitude",
        values=values,
        errors=errors,
        detail=detail,
        uploads=_uploads(request, owner),
        models=spec.allowed_models(settings),
    )


@router.get("/uploads")
def uploads_page(request: Request, notice: Annotated[str, Query(max_length=32)] = "") -> Response:
    owner = require_owner(request)
    return uploads_list(request, owner, notice=notice)


def uploads_list(request: Request, owner: str, status: int = 200, **ctx: Any) -> Response:
    ups = _uploads(request, owner)
    rows = [(u, view.size(u.size), view.age(u.created_at)) for u in ups]
    return render(request, "uploads.html", status, owner=owner, rows=rows, **ctx)
