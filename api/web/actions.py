"""The pages' forms: sign in and out, submit, cancel / rerun / delete a job, upload and delete files.

Each checks the CSRF token, then (sign-in aside) asks the JSON API itself (apicall.py), so a form can do
exactly what the signed-in key could do with curl, with the same checks; the API's errors come back as
messages on the page (a spec's at their fields)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated
from urllib.parse import urlencode

from anyio.to_thread import run_sync
from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse
from starlette.datastructures import FormData, UploadFile

from ..problems import Problem
from ..schemas import echo, is_id
from . import forms
from .apicall import call_api, problem_errors
from .pages import ACTIONS, job_view, require_owner, submit_form, uploads_list
from .render import PageRoute, error_page, render, to_signin
from .session import CSRF_FIELD, MAX_KEY_CHARS, check_csrf, owner_from_key, page_key, pages_path
from .session import sign_in as keep_key
from .session import sign_out as forget_key

router = APIRouter(prefix="/ui", include_in_schema=False, route_class=PageRoute)

CsrfField = Annotated[str, Form(alias=CSRF_FIELD, max_length=128)]  # missing: "" (a 403, not a 400)
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields beside an uploaded file
CHUNK = 1024 * 1024


def see(request: Request, path: str, **query: str) -> RedirectResponse:
    """303 to another page (after a POST)."""
    return RedirectResponse(pages_path(request) + path + (f"?{urlencode(query)}" if query else ""), 303)


@router.post("/signin")
def signin(
    request: Request, csrf: CsrfField = "", key: Annotated[str, Form(max_length=MAX_KEY_CHARS)] = ""
) -> Response:
    """Check the key as the API would; keep it in the HttpOnly cookie."""
    check_csrf(request, csrf)
    try:
        owner_from_key(request, key.strip())
    except Problem as p:
        if p.status != 401:
            raise
        return render(request, "signin.html", 401, error="That API key is unknown or revoked.")
    resp = see(request, "/jobs")
    keep_key(request, resp, key.strip())
    return resp


@router.post("/signout")
def signout(request: Request, csrf: CsrfField = "") -> Response:
    check_csrf(request, csrf)
    resp = see(request, "/signin")
    forget_key(request, resp)
    return resp


@router.post("/jobs/{job_id}/{action}")
async def job_action(request: Request, job_id: str, action: str, csrf: CsrfField = "") -> Response:
    """Cancel, rerun or delete a job through its API route (404 for any other action)."""
    check_csrf(request, csrf)
    if not is_id(job_id):
        raise Problem(404, "Job not found.")
    if action not in ACTIONS:
        raise Problem(404, f"This server has no '{echo(action)}' for jobs.")
    method, path = ACTIONS[action]
    r = await call_api(
        request, page_key(request), method, path.format(job_id), json={} if method == "POST" else None
    )
    if r.status_code == 401:
        return to_signin(request)
    if r.status_code == 404:
        return error_page(request, 404, "Job not found.")
    if r.is_error:  # e.g. 409: delete while running
        return await run_sync(partial(job_view, request, job_id, r.status_code, problem_errors(r)[0]))
    if action == "delete":
        return see(request, "/jobs", notice="deleted")
    return see(request, f"/jobs/{r.json().get('id', job_id)}")


@router.post("/submit")
async def submit(request: Request) -> Response:
    """The form as a JobSpec, POSTed to ``/v1/jobs``; its errors shown at their fields."""
    owner = await run_sync(require_owner, request)
    form = await request.form(max_files=0, max_fields=1000)
    check_csrf(request, form.get(CSRF_FIELD))
    settings = request.app.state.settings
    sections, methods = forms.spec_sections(settings), forms.method_sections(settings)
    spec = forms.spec_from_form(form, sections, methods)
    r = await call_api(request, page_key(request), "POST", "/v1/jobs", json=spec)
    if r.status_code == 401:
        return to_signin(request)
    if r.is_success:
        return see(request, f"/jobs/{r.json()['id']}")
    detail, errors = problem_errors(r)
    known = {f.name for s in (*sections, *methods) for f in s.fields} | {"method.name"}
    by_field = forms.errors_by_field(errors, spec["method"]["name"], known)
    values = {k: form.getlist(k) for k in form}
    return await run_sync(submit_form, request, owner, _flat(values), by_field, r.status_code, detail)


def _flat(values: dict[str, list]) -> dict[str, object]:
    """Form values for re-rendering: checkbox groups (marked ``<name>._present``) as lists, any other
    field its last value (a checkbox's after its hidden "false")."""
    groups = {k.removesuffix("._present") for k in values if k.endswith("._present")}
    return {k: (v if k in groups else v[-1]) for k, v in values.items() if v or k in groups}


async def _capped_form(request: Request, cap: int) -> FormData:
    """The multipart form, refused (413) past ``cap`` bytes, declared or sent."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise Problem(413, f"The upload is larger than this server's limit of {cap - FORM_OVERHEAD} bytes.")
    seen = 0

    async def receive():  # noqa: ANN202 (an ASGI message)
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > cap:
            raise Problem(
                413, f"The upload is larger than this server's limit of {cap - FORM_OVERHEAD} bytes."
            )
        return message

    return await Request(request.scope, receive).form(max_files=1, max_fields=10)


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


@router.post("/upload-file")
async def upload(request: Request) -> Response:
    """A file from the form, sent to ``POST /v1/uploads`` as its body. ``next=submit`` goes back to the
    submit form with the new upload filled in where it belongs."""
    owner = await run_sync(require_owner, request)  # before reading the body: only a signed-in user sends one
    form = await _capped_form(request, request.app.state.settings.max_upload_bytes + FORM_OVERHEAD)
    check_csrf(request, form.get(CSRF_FIELD))
    file, kind = form.get("file"), str(form.get("kind") or "")
    if not isinstance(file, UploadFile) or not file.filename:
        return await run_sync(partial(uploads_list, request, owner, 422, error="Choose a file to upload."))
    params = {"kind": kind, "filename": file.filename[-255:]}
    r = await call_api(
        request, page_key(request), "POST", "/v1/uploads", params=params, content=_chunks(file)
    )
    await file.close()
    if r.status_code == 401:
        return to_signin(request)
    if r.is_error:
        return await run_sync(
            partial(uploads_list, request, owner, r.status_code, error=problem_errors(r)[0])
        )
    ref = r.json()["ref"]
    if form.get("next") == "submit":
        fill = {"model.weights": ref} if kind == "weights" else {"data.name": "imagefolder", "data.root": ref}
        return see(request, "/submit", **fill)
    return see(request, "/uploads", notice="uploaded")


@router.post("/uploads/{upload_id}/delete")
async def delete_upload(request: Request, upload_id: str, csrf: CsrfField = "") -> Response:
    check_csrf(request, csrf)
    if not is_id(upload_id):
        raise Problem(404, "Upload not found.")
    r = await call_api(request, page_key(request), "DELETE", f"/v1/uploads/{upload_id}")
    if r.status_code == 401:
        return to_signin(request)
    if r.is_error:
        owner = await run_sync(require_owner, request)
        return await run_sync(
            partial(uploads_list, request, owner, r.status_code, error=problem_errors(r)[0])
        )
    return see(request, "/uploads", notice="deleted")
