# ruff: noqa: F811 (the fixtures imported from test_api are arguments of the tests by name)
"""The pages under /ui in-process (TestClient, no worker: jobs are moved with store.repo): sign-in
cookie flags, CSRF, owner isolation, the submit form's field errors, uploads, security headers. The
real-browser run is tests/test_web_browser.py."""

from __future__ import annotations

import hashlib
import re
from http.cookies import SimpleCookie

import pytest
from fastapi.testclient import TestClient

from store import db, repo
from store.files import attempt_dir, relative_to_root, sha256_file
from store.models import Job, JobStatus
from tests.test_api import BOOT, DIGITS, Api, make_api, safetensors_bytes  # noqa: F401 (fixtures)

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Browser:
    """A TestClient of its own (its own cookies) signed in with ``key``; ``csrf`` from its last page."""

    def __init__(self, api: Api, key: str | None, **kw) -> None:
        self.c = TestClient(api.client.app, follow_redirects=False, **kw)
        self.csrf = self.token("/ui/signin")
        if key is not None:
            r = self.c.post("/ui/signin", data={"csrf": self.csrf, "key": key})
            assert r.status_code == 303, r.text

    def token(self, path: str) -> str:
        r = self.c.get(path)
        assert r.status_code == 200, r.text
        return CSRF.search(r.text).group(1)

    def post(self, path: str, **data: str):
        return self.c.post(path, data={"csrf": self.csrf} | data)


def set_cookies(r) -> dict[str, str]:
    """Each Set-Cookie of the response, by cookie name: its whole header line (lowercased)."""
    out = {}
    for line in r.headers.get_list("set-cookie"):
        name = next(iter(SimpleCookie(line)))
        out[name] = line.lower()
    return out


def field_errors(html: str) -> dict[str, list[str]]:
    """The submit page's errors by the form field they are shown at."""
    out = {}
    for m in re.finditer(r'<div class="field invalid" data-field="([^"]*)">(.*?)</div>', html, re.S):
        out[m.group(1)] = re.findall(r'field-error">([^<]*)<', m.group(2))
    return out


def add_artifact(api: Api, job_id: str, name: str, blob: bytes) -> str:
    """An artifact file and its row, as the worker records them; its sha256."""
    folder = attempt_dir(api.settings.artifacts_dir, job_id, 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(blob)
    sha = sha256_file(path)
    with db.session_scope(api.engine) as s:
        rel = relative_to_root(api.settings.artifacts_dir, path)
        repo.add_artifact(
            s,
            job_id,
            1,
            name,
            rel,
            len(blob),
            sha,
            "text/html" if name.endswith("html") else "application/octet-stream",
        )
    return sha


@pytest.fixture
def api(make_api, sqlite_url: str) -> Api:
    return make_api(sqlite_url)


def test_signin_cookie_flags(api: Api) -> None:
    """The key and CSRF cookies are HttpOnly, SameSite=Strict and scoped to /ui; Secure over https.
    A wrong key sets no cookie; without one the pages send you to sign in."""
    c = TestClient(api.client.app, follow_redirects=False)
    assert c.get("/ui/jobs").headers["location"] == "/ui/signin"
    r = c.get("/ui/signin")
    csrf = set_cookies(r)["prune_csrf"]
    assert "httponly" in csrf and "samesite=strict" in csrf and "path=/ui" in csrf and "secure" not in csrf
    token = CSRF.search(r.text).group(1)
    r = c.post("/ui/signin", data={"csrf": token, "key": "not-a-key"})
    assert r.status_code == 401 and "prune_key" not in set_cookies(r)
    r = c.post("/ui/signin", data={"csrf": token, "key": api.key_a})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    key = set_cookies(r)["prune_key"]
    assert "httponly" in key and "samesite=strict" in key and "path=/ui" in key and "secure" not in key
    assert c.get("/ui/jobs").status_code == 200

    tls = Browser(api, None, base_url="https://testserver")
    r = tls.post("/ui/signin", key=api.key_a)
    assert r.status_code == 303 and "secure" in set_cookies(r)["prune_key"]

    r = c.post("/ui/signout", data={"csrf": token})
    assert r.status_code == 303 and 'prune_key=""' in r.headers["set-cookie"]


def test_revoked_key_signs_out(api: Api) -> None:
    """The cookie's key is checked on every page, like a Bearer key: once revoked, sign-in again."""
    with db.session_scope(api.engine) as s:
        key, plain = repo.create_api_key(s, "carol")
    carol = Browser(api, plain)
    assert carol.c.get("/ui/jobs").status_code == 200
    with db.session_scope(api.engine) as s:
        assert repo.revoke_api_key(s, key.id, "carol")
    assert carol.c.get("/ui/jobs").headers["location"] == "/ui/signin"


def test_forms_without_the_csrf_token_are_refused(api: Api) -> None:
    """A POST without the token, with a wrong one, or from another site's page is a 403 (and does
    nothing); with the token it goes through."""
    job = api.submit()
    alice = Browser(api, api.key_a)
    cancel = f"/ui/jobs/{job['id']}/cancel"
    assert alice.c.post(cancel).status_code == 403
    assert alice.c.post(cancel, data={"csrf": "x" * 43}).status_code == 403
    other_site = alice.c.post(cancel, data={"csrf": alice.csrf}, headers={"Origin": "https://evil.example"})
    assert other_site.status_code == 403
    assert alice.c.post("/ui/submit", data={"csrf": "wrong"} | {"data.name": "digits"}).status_code == 403
    assert alice.c.post("/ui/signin", data={"key": api.key_a}).status_code == 403
    fresh = TestClient(api.client.app, follow_redirects=False)  # no CSRF cookie at all
    assert fresh.post("/ui/signin", data={"csrf": alice.csrf, "key": api.key_a}).status_code == 403
    with db.session_scope(api.engine) as s:
        assert s.get(Job, job["id"]).status == JobStatus.QUEUED
    r = alice.post(cancel)
    assert r.status_code == 303 and r.headers["location"] == f"/ui/jobs/{job['id']}"
    with db.session_scope(api.engine) as s:
        assert s.get(Job, job["id"]).status == JobStatus.CANCELLED


def test_another_owners_job_is_a_404_page(api: Api) -> None:
    """Bob sees none of Alice's job through any page or link: the job page, its events, report and
    artifacts are 404 pages, exactly like an unknown job's; his cancel is a 404 and changes nothing."""
    job = api.submit()
    api.run_job(job["id"], ("epoch", {"epoch": 1, "top1": 50.0, "train_loss": 1.0, "text": "e1"}))
    blob = b"weights" * 100
    sha = add_artifact(api, job["id"], "model.safetensors", blob)
    add_artifact(api, job["id"], "report.html", b"<html><body>report</body></html>")
    alice, bob = Browser(api, api.key_a), Browser(api, api.key_b)

    page = alice.c.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200 and sha in page.text
    link = f"/ui/jobs/{job['id']}/artifacts/model.safetensors"
    assert link in page.text
    r = alice.c.get(link)
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == sha
    assert job["id"] in alice.c.get("/ui/jobs").text

    unknown = bob.c.get("/ui/jobs/" + "0" * 32)
    assert unknown.status_code == 404
    for path in ("", "/events", "/report", "/artifacts/model.safetensors"):
        r = bob.c.get(f"/ui/jobs/{job['id']}{path}")
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), path
        main = r.text.split("<main>")[1].replace(job["id"], "ID")  # the id asked for is echoed back
        assert main == unknown.text.split("<main>")[1].replace("0" * 32, "ID"), path
    assert job["id"] not in bob.c.get("/ui/jobs").text
    assert bob.post(f"/ui/jobs/{job['id']}/cancel").status_code == 404


def test_report_inline_and_sandboxed(api: Api) -> None:
    job = api.submit()
    api.run_job(job["id"])
    add_artifact(api, job["id"], "report.html", b"<html><body><h1>the report</h1></body></html>")
    alice = Browser(api, api.key_a)
    page = alice.c.get(f"/ui/jobs/{job['id']}").text
    assert re.search(r'<iframe src="/ui/jobs/[0-9a-f]{32}/report" sandbox ', page)
    r = alice.c.get(f"/ui/jobs/{job['id']}/report")
    assert r.status_code == 200 and b"the report" in r.content
    assert r.headers["content-disposition"] == "inline"
    assert r.headers["content-security-policy"].startswith("sandbox;")
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none'


def test_submit_form_errors_at_their_fields(api: Api) -> None:
    """The spec the form makes is checked by POST /v1/jobs; each error shows at its field (a method's
    option at that method's input, a whole-spec rule at the field it names), the values kept."""
    alice = Browser(api, api.key_a)
    r = alice.post(
        "/ui/submit",
        **{
            "data.name": "digits",
            "method.name": "magnitude",
            "schedule.epochs": "abc",
            "method.magnitude.p": "7",
        },
    )
    assert r.status_code == 422
    errors = field_errors(r.text)
    assert set(errors) == {"schedule.epochs", "method.magnitude.p"}, errors
    assert "integer" in errors["schedule.epochs"][0] and "2" in errors["method.magnitude.p"][0]
    assert 'value="abc"' in r.text and 'id="error-summary"' in r.text  # kept for correcting

    r = alice.post("/ui/submit", **{"method.name": "psap", "schedule.epochs": "1"})
    assert r.status_code == 422 and "psap" in " ".join(field_errors(r.text)["schedule.epochs"])

    r = alice.post("/ui/submit", **{"schedule.epochs": "100000"})  # past this server's limit
    assert r.status_code == 422 and field_errors(r.text).get("schedule.epochs")

    r = alice.post(
        "/ui/submit",
        **{
            "data.name": "digits",
            "method.name": "magnitude",
            "schedule.epochs": "1",
            "target.macs_ratio": "0.4",
        },
    )
    assert r.status_code == 303
    job_id = r.headers["location"].rsplit("/", 1)[1]
    with db.session_scope(api.engine) as s:
        job = s.get(Job, job_id)
        assert job.owner == "alice" and job.spec["schedule"]["epochs"] == 1
        assert job.spec["target"]["macs_ratio"] == 0.4 and job.spec["method"]["name"] == "magnitude"


def test_submit_form_is_built_from_the_schemas(api: Api) -> None:
    """Every JobSpec section and every method's options have their inputs; caps and enums shown."""
    page = Browser(api, api.key_a).c.get("/ui/submit").text
    for name in ("model.name", "data.name", "schedule.epochs", "target.macs_ratio", "kd.enabled", "seed"):
        assert f'name="{name}"' in page, name
    for name in ("method.s2h.temperature", "method.tas.search_epochs", "method.epi.criterion"):
        assert f'name="{name}"' in page, name
    assert re.search(r'name="schedule.epochs"[^>]*max="1000"', page)
    assert '<option value="onnx">' not in page and 'value="onnx" checked' in page  # export formats


def test_jobs_list_filters_and_pages(api: Api) -> None:
    ids = [api.submit()["id"] for _ in range(3)]
    api.submit(DIGITS | {"method": {"name": "epi"}, "schedule": {"epochs": 2}})
    api.run_job(ids[0])
    alice = Browser(api, api.key_a)
    page = alice.c.get("/ui/jobs?method=epi").text
    assert page.count('<a href="/ui/jobs/') == 1
    page = alice.c.get("/ui/jobs?status=succeeded").text
    assert ids[0] in page and ids[1] not in page
    page = alice.c.get("/ui/jobs?limit=2&method=magnitude").text
    assert page.count('<a href="/ui/jobs/') == 2
    nxt = re.search(r'href="(/ui/jobs\?[^"]*cursor=[^"]+)" rel="next"', page).group(1).replace("&amp;", "&")
    page2 = alice.c.get(nxt).text
    assert page2.count('<a href="/ui/jobs/') == 1 and "First page" in page2
    assert alice.c.get("/ui/jobs?cursor=garbage").status_code == 400


def test_uploads_from_the_form(api: Api) -> None:
    """Upload a weights file from the form (the API's checks apply), see it listed, delete it."""
    alice = Browser(api, api.key_a)
    blob = safetensors_bytes()
    r = alice.c.post(
        "/ui/upload-file",
        data={"csrf": alice.csrf, "kind": "weights", "next": "submit"},
        files={"file": ("net.safetensors", blob)},
    )
    assert r.status_code == 303 and "model.weights=upload%3A" in r.headers["location"]
    ref = r.headers["location"].split("model.weights=")[1].replace("%3A", ":")
    assert f'value="{ref}"' in alice.c.get(r.headers["location"]).text  # the submit form, filled in
    page = alice.c.get("/ui/uploads").text
    assert ref in page and hashlib.sha256(blob).hexdigest() in page
    assert ref not in Browser(api, api.key_b).c.get("/ui/uploads").text

    bad = alice.c.post(
        "/ui/upload-file", data={"csrf": alice.csrf, "kind": "weights"}, files={"file": ("x.bin", b"junk")}
    )
    assert bad.status_code == 415 and 'id="upload-error"' in bad.text  # the API's answer, on the page
    big = alice.c.post(
        "/ui/upload-file", data={"csrf": alice.csrf, "kind": "weights"}, files={"file": ("x", bytes(200_000))}
    )
    assert big.status_code == 413
    r = alice.post(f"/ui/uploads/{ref.split(':')[1]}/delete")
    assert r.status_code == 303 and ref not in alice.c.get("/ui/uploads").text


def test_embedded_mode_needs_no_signin(make_api, sqlite_url: str) -> None:
    """AUTH_DISABLED: the pages serve this machine's loopback clients as owner ``local``, as the API
    does; anyone else is sent to sign in."""
    api = make_api(sqlite_url, auth_disabled=True)
    local = TestClient(api.client.app, client=("127.0.0.1", 50000), follow_redirects=False)
    assert local.get("/ui/jobs").status_code == 200
    csrf = CSRF.search(local.get("/ui/submit").text).group(1)
    r = local.post("/ui/submit", data={"csrf": csrf, "data.name": "digits", "schedule.epochs": "1"})
    assert r.status_code == 303
    with db.session_scope(api.engine) as s:
        assert s.get(Job, r.headers["location"].rsplit("/", 1)[1]).owner == "local"
    forwarded = local.get("/ui/jobs", headers={"X-Forwarded-For": "203.0.113.9"})
    assert forwarded.headers["location"] == "/ui/signin"


def test_security_headers_and_no_inline_script(api: Api) -> None:
    """Every page: a CSP without inline script, no framing, no sniffing; pages stay out of the OpenAPI
    document; a hostile name in a spec is escaped."""
    job = api.submit(DIGITS | {"model": {"name": "resnet20"}, "data": {"name": "digits"}})
    with db.session_scope(api.engine) as s:
        repo.append_event(s, job["id"], "message", {"text": "<script>alert(1)</script>"})
    alice = Browser(api, api.key_a)
    for path in ("/ui/signin", "/ui/jobs", f"/ui/jobs/{job['id']}", "/ui/submit", "/ui/uploads"):
        r = alice.c.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), path  # only <script src=...>
        assert "<script>alert" not in r.text
    assert not [p for p in api.client.get("/openapi.json").json()["paths"] if p.startswith("/ui")]
    assert alice.c.get("/ui/static/app.js").status_code == 200


def test_rerun_and_delete_go_through_their_api_routes(api: Api) -> None:
    """An ended job's page offers rerun and delete, each going through its API route: rerun to the new
    job's page (linked to the first), delete back to the list with the job gone, and the API's refusal
    (409: a queued job) shown on the job's page."""
    job = api.submit()
    api.run_job(job["id"])
    alice = Browser(api, api.key_a)
    page = alice.c.get(f"/ui/jobs/{job['id']}").text
    assert 'id="rerun"' in page and 'id="delete"' in page

    r = alice.post(f"/ui/jobs/{job['id']}/rerun")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/jobs/")
    again = r.headers["location"].rsplit("/", 1)[-1]
    assert again != job["id"]
    rerun_page = alice.c.get(f"/ui/jobs/{again}").text
    assert f'id="rerun-of" class="mono">{job["id"]}<' in rerun_page
    assert 'id="delete"' not in rerun_page  # queued: not ended, no delete button

    refused = alice.post(f"/ui/jobs/{again}/delete")  # queued: the API refuses (cancel first)
    assert refused.status_code == 409 and 'id="action-error"' in refused.text

    r = alice.post(f"/ui/jobs/{job['id']}/delete")
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs?notice=deleted"
    assert alice.c.get(f"/ui/jobs/{job['id']}").status_code == 404


def page_routes(api: Api) -> list[tuple[str, str]]:
    """Every (method, path template) under /ui, as tests/test_security.py walks the API's."""
    from tests.test_security import PAGES, _walk

    return sorted(
        (m, path)
        for path, r in _walk(api.client.app.routes)
        for m in r.methods
        if m != "HEAD" and path.startswith(PAGES)
    )


def test_every_page_needs_a_signin_and_hides_other_owners(api: Api) -> None:
    """Walks every page route: signed out, each sends you to sign in (or refuses the form, 403);
    signed in as Bob, each naming Alice's job or upload is a 404 like an unknown id, and each list
    leaves her ids out. A new page route the walk cannot classify fails it."""
    job = api.submit()
    api.run_job(job["id"])
    add_artifact(api, job["id"], "report.html", b"<html>r</html>")
    up = api.client.post("/v1/uploads?kind=weights", content=safetensors_bytes(), headers=api.a).json()
    theirs = {"job_id": job["id"], "upload_id": up["id"], "name": "report.html", "action": "cancel"}
    unknown = theirs | {"job_id": "f" * 32, "upload_id": "e" * 32}
    fill = lambda path, ids: re.sub(r"{(\w+)(?::\w+)?}", lambda m: ids[m[1]], path)  # noqa: E731
    open_pages = {("GET", "/ui/signin"), ("POST", "/ui/signin"), ("GET", "/ui")}
    creators = {("POST", "/ui/submit"), ("POST", "/ui/upload-file"), ("POST", "/ui/signout")}
    routes = page_routes(api)
    assert len(routes) >= 14, routes

    out = Browser(api, None)
    for method, path in routes:
        if (method, path) in open_pages:
            continue
        r = out.post(fill(path, theirs)) if method == "POST" else out.c.get(fill(path, theirs))
        assert (r.status_code, r.headers.get("location")) in ((303, "/ui/signin"), (403, None)), (
            method,
            path,
        )

    bob = Browser(api, api.key_b)
    checked = 0
    for method, path in routes:
        if (method, path) in open_pages | creators:
            continue
        send = bob.post if method == "POST" else bob.c.get
        r = send(fill(path, theirs))
        if "{" in path:
            other = send(fill(path, unknown))
            assert r.status_code == other.status_code == 404, (method, path, r.status_code)
            mask = r.text.replace(job["id"], "ID").replace(up["id"], "ID")
            assert mask == other.text.replace("f" * 32, "ID").replace("e" * 32, "ID"), (method, path)
        else:
            assert method == "GET" and r.status_code == 200, f"{method} {path}: not classified"
            assert job["id"] not in r.text and up["id"] not in r.text, path
        checked += 1
    assert checked >= 8
    with db.session_scope(api.engine) as s:  # nothing of Alice's changed
        assert s.get(Job, job["id"]).status == JobStatus.SUCCEEDED
        assert repo.get_upload(s, up["id"], owner="alice") is not None
