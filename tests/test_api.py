"""The HTTP API in-process (FastAPI's TestClient) on SQLite, the core job flow also on PostgreSQL.

No worker runs here: jobs are moved through their states with store.repo, as a worker would.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from pruning_core.settings import Settings
from store import db, repo
from store.files import attempt_dir, relative_to_root, sha256_file
from store.models import Job, JobStatus, Upload

BOOT = "boot-key-for-tests"
PROBLEM = "application/problem+json"
DIGITS = {
    "model": {"name": "resnet20"},
    "data": {"name": "digits"},
    "target": {"macs_ratio": 0.5},
    "schedule": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 5},
    "export": {"formats": ["safetensors"]},
}


class Api:
    """A TestClient plus what the tests need beside it: settings, the engine, two owners' keys."""

    def __init__(self, settings: Settings, client: TestClient):
        self.settings = settings
        self.client = client
        self.engine = db.make_engine(settings.sqlalchemy_url)
        with db.session_scope(self.engine) as s:
            _, self.key_a = repo.create_api_key(s, "alice")
            _, self.key_b = repo.create_api_key(s, "bob")
        self.a = {"Authorization": f"Bearer {self.key_a}"}
        self.b = {"Authorization": f"Bearer {self.key_b}"}

    def submit(self, spec: dict | None = None, **headers: str) -> dict:
        r = self.client.post("/v1/jobs", json=spec or DIGITS, headers=self.a | headers)
        assert r.status_code == 201, r.text
        return r.json()

    def run_job(
        self, job_id: str, *events: tuple[str, dict], status: JobStatus = JobStatus.SUCCEEDED
    ) -> None:
        """Claim, write events and finish a job as a worker would."""
        with db.session_scope(self.engine) as s:
            job = repo.claim_job(s, job_id, "test-worker", lease_s=60)
            assert job is not None
            for kind, data in events:
                repo.append_event(s, job_id, kind, data)
            repo.finish_job(s, job_id, job.attempt, status, result={"achieved_macs_ratio": 0.5})


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    clients: list[TestClient] = []

    def make(url: str, **overrides) -> Api:
        db.migrate(url)
        fields = {
            "state_dir": tmp_path / "state",
            "database_url": url,
            "redis_url": None,
            "bootstrap_api_key": BOOT,
            "auth_disabled": False,
            "max_upload_bytes": 4096,
        }
        settings = Settings(**(fields | overrides))
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return Api(settings, client)

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def api(make_api, sqlite_url: str) -> Api:
    return make_api(sqlite_url)


def assert_problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and "detail" in body and body["type"]
    assert "Traceback" not in r.text
    return body


# --- the core job flow, on SQLite and PostgreSQL ---


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
def test_job_flow(make_api, request, backend: str) -> None:
    api = make_api(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    c = api.client
    job = api.submit()
    assert job["status"] == "queued" and job["method"] == "magnitude" and job["attempt"] == 0
    assert job["spec"]["schedule"]["epochs"] == 1 and job["spec"]["method"]["name"] == "magnitude"
    assert job["urls"]["self"] == f"/v1/jobs/{job['id']}" and job["error"] is None
    assert set(job["urls"]) == {"self", "events", "artifacts", "cancel"}

    r = c.get(job["urls"]["self"], headers=api.a)
    assert r.status_code == 200 and r.json()["id"] == job["id"]

    # idempotency: same key + same spec -> the same job (200); a different spec -> 409
    first = c.post("/v1/jobs", json=DIGITS, headers=api.a | {"Idempotency-Key": "k1"})
    assert first.status_code == 201
    again = c.post("/v1/jobs", json=DIGITS, headers=api.a | {"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    other = DIGITS | {"seed": 7}
    assert_problem(c.post("/v1/jobs", json=other, headers=api.a | {"Idempotency-Key": "k1"}), 409)
    # the same key is another owner's own key space
    assert c.post("/v1/jobs", json=other, headers=api.b | {"Idempotency-Key": "k1"}).status_code == 201

    # pagination: 4 of alice's jobs, pages of 3
    api.submit()
    api.submit()
    ids = []
    page = c.get("/v1/jobs?limit=3", headers=api.a).json()
    ids += [j["id"] for j in page["items"]]
    assert len(page["items"]) == 3 and page["next_cursor"]
    page = c.get(f"/v1/jobs?limit=3&cursor={page['next_cursor']}", headers=api.a).json()
    ids += [j["id"] for j in page["items"]]
    assert len(page["items"]) == 1 and page["next_cursor"] is None
    assert len(set(ids)) == 3 + 1 and job["id"] in ids

    # cancel a queued job: cancelled at once
    r = c.post(f"/v1/jobs/{job['id']}/cancel", headers=api.a)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    cancelled = c.get("/v1/jobs?status=cancelled", headers=api.a).json()["items"]
    assert [j["id"] for j in cancelled] == [job["id"]]
    assert len(c.get("/v1/jobs?status=queued", headers=api.a).json()["items"]) == 3

    # another owner's job is a 404, like an unknown one
    assert_problem(c.get(f"/v1/jobs/{job['id']}", headers=api.b), 404)
    assert_problem(c.post(f"/v1/jobs/{job['id']}/cancel", headers=api.b), 404)
    assert_problem(c.get("/v1/jobs/nope", headers=api.a), 404)
    assert all(j["id"] not in ids for j in c.get("/v1/jobs", headers=api.b).json()["items"])


def test_bootstrap_key_and_auth(api: Api, make_api, sqlite_url: str) -> None:
    c = api.client
    r = c.get("/v1/jobs")
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})
    assert_problem(r, 401)
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    job = api.submit(Authorization=f"Bearer {BOOT}")
    with db.session_scope(api.engine) as s:
        assert s.get(Job, job["id"]).owner == "admin"
    # a revoked key stops working
    with db.session_scope(api.engine) as s:
        key = next(k for k in repo.list_api_keys(s, "bob"))
        repo.revoke_api_key(s, key.id, "bob")
    assert_problem(c.get("/v1/jobs", headers=api.b), 401)


def test_auth_disabled_is_owner_local(make_api, tmp_path: Path) -> None:
    api = make_api(f"sqlite:///{tmp_path / 'local.db'}", auth_disabled=True)
    local = TestClient(api.client.app, client=("127.0.0.1", 50000))  # keyless only from loopback
    r = local.post("/v1/jobs", json=DIGITS)
    assert r.status_code == 201
    with db.session_scope(api.engine) as s:
        assert s.get(Job, r.json()["id"]).owner == "local"


# --- bad input: problem+json, one error per field, and the server keeps serving ---


def test_bad_job_input(api: Api) -> None:
    c = api.client
    r = c.post("/v1/jobs", content=b'{"model": {', headers=api.a | {"Content-Type": "application/json"})
    body = assert_problem(r, 400)
    assert body["errors"][0]["field"] == "(body)"

    bad = DIGITS | {"colour": "red", "schedule": {"epochs": 1, "batch_sise": 3}}
    body = assert_problem(c.post("/v1/jobs", json=bad, headers=api.a), 422)
    assert {e["field"] for e in body["errors"]} == {"colour", "schedule.batch_sise"}

    bad = DIGITS | {"target": {"macs_ratio": 2}, "schedule": {"epochs": -1}, "model": {"name": "nope"}}
    body = assert_problem(c.post("/v1/jobs", json=bad, headers=api.a), 422)
    fields = [e["field"] for e in body["errors"]]
    assert sorted(fields) == ["model.name", "schedule.epochs", "target.macs_ratio"]
    assert all(e["message"] for e in body["errors"])

    body = assert_problem(c.post("/v1/jobs", json=[1, 2], headers=api.a), 422)
    assert len(body["errors"]) == 1
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = assert_problem(c.post("/v1/jobs", content=json.dumps(DIGITS), headers=api.a | form), 415)
    assert "application/json" in body["detail"]

    huge = {"seed": 1, "pad": "x" * (2 * 1024**2)}
    assert_problem(c.post("/v1/jobs", json=huge, headers=api.a), 413)

    def chunked() -> Iterator[bytes]:
        yield b'{"seed": 1, "pad": "'
        for _ in range(3):
            yield b"x" * 1024**2
        yield b'"}'

    json_ct = {"Content-Type": "application/json"}
    assert_problem(c.post("/v1/jobs", content=chunked(), headers=api.a | json_ct), 413)
    assert_problem(c.get("/v1/jobs?limit=0", headers=api.a), 422)
    assert_problem(c.get("/v1/jobs?status=exploded", headers=api.a), 422)
    assert_problem(c.get("/v1/jobs?cursor=%%%garbage", headers=api.a), 400)
    assert_problem(c.get("/v1/jobs?cursor=WzEsMl0", headers=api.a), 400)  # base64 of [1,2]
    assert_problem(c.get("/v1/nothing-here", headers=api.a), 404)
    # a 405's Allow names every method served at the path, not only the first route's
    for method, path, allow in [
        ("DELETE", "/v1/jobs", "GET, POST"),
        ("PUT", "/v1/jobs/x", "DELETE, GET"),
        ("GET", "/v1/jobs/x/cancel", "POST"),
        ("POST", "/healthz", "GET"),
    ]:
        r = c.request(method, path, headers=api.a)
        assert_problem(r, 405)
        assert r.headers.get("allow") == allow, (method, path, r.headers.get("allow"))
    # nothing was written, and the server still serves
    assert c.get("/v1/jobs", headers=api.a).json()["items"] == []
    assert c.get("/healthz").status_code == 200


def test_server_paths_refused(api: Api) -> None:
    c = api.client
    cases = {
        "model.weights": DIGITS | {"model": {"name": "resnet20", "weights": "/etc/passwd"}},
        "kd.teacher": DIGITS | {"kd": {"enabled": True, "teacher": "../../secret.safetensors"}},
        "data.root": {**DIGITS, "data": {"name": "imagefolder", "root": "/srv/data"}},
    }
    for field, spec in cases.items():
        body = assert_problem(c.post("/v1/jobs", json=spec, headers=api.a), 422)
        assert [e["field"] for e in body["errors"]] == [field], body
    # cifar with a root: never (its loader unpickles files under the root)
    spec = {**DIGITS, "data": {"name": "cifar10", "root": "upload:abc"}}
    assert [
        e["field"] for e in assert_problem(c.post("/v1/jobs", json=spec, headers=api.a), 422)["errors"]
    ] == ["data.root"]
    # an unknown upload, and another owner's upload
    spec = DIGITS | {"model": {"name": "resnet20", "weights": "upload:doesnotexist"}}
    assert_problem(c.post("/v1/jobs", json=spec, headers=api.a), 422)
    up = c.post("/v1/uploads?kind=weights&filename=w.safetensors", content=safetensors_bytes(), headers=api.b)
    assert up.status_code == 201
    spec = DIGITS | {"model": {"name": "resnet20", "weights": up.json()["ref"]}}
    (err,) = assert_problem(c.post("/v1/jobs", json=spec, headers=api.a), 422)["errors"]
    assert "does not exist" in err["message"], err  # another owner's upload, like an unknown one
    # its owner may name it: what is refused then is its content (one tensor "w", not resnet20's)
    (err,) = assert_problem(c.post("/v1/jobs", json=spec, headers=api.b), 422)["errors"]
    assert err["field"] == "model.weights" and "does not match resnet20" in err["message"], err
    # a dataset upload where weights are expected
    ds = c.post("/v1/uploads?kind=dataset&filename=d.zip", content=zip_bytes(), headers=api.b).json()
    spec = DIGITS | {"model": {"name": "resnet20", "weights": ds["ref"]}}
    assert_problem(c.post("/v1/jobs", json=spec, headers=api.b), 422)
    spec = {**DIGITS, "data": {"name": "imagefolder", "root": ds["ref"]}}
    assert c.post("/v1/jobs", json=spec, headers=api.b).status_code == 201


# --- uploads ---


def safetensors_bytes(extra: int = 16) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [extra // 4], "data_offsets": [0, extra]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(extra)


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train/a/1.png", b"x")
    return buf.getvalue()


def tar_bytes(gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        data = b"x" * 10
        info = tarfile.TarInfo("train/a/1.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def leftover_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_uploads(make_api, sqlite_url: str) -> None:
    api = make_api(sqlite_url, max_upload_bytes=16_384)
    c, root = api.client, api.settings.uploads_dir
    data = safetensors_bytes()
    r = c.post("/v1/uploads?kind=weights&filename=../../model.safetensors", content=data, headers=api.a)
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["sha256"] == hashlib.sha256(data).hexdigest() and up["size"] == len(data)
    assert up["ref"] == f"upload:{up['id']}" and up["filename"] == "model.safetensors"
    assert c.get(f"/v1/uploads/{up['id']}", headers=api.a).json()["sha256"] == up["sha256"]
    assert_problem(c.get(f"/v1/uploads/{up['id']}", headers=api.b), 404)
    with db.session_scope(api.engine) as s:
        row = repo.get_upload(s, up["id"])
        stored = root / row.path
    assert stored.is_file() and stored.read_bytes() == data and stored.is_relative_to(root)

    for name, blob, suffix in [
        ("d.tgz", tar_bytes(True), ".tar.gz"),
        ("d.tar", tar_bytes(False), ".tar"),
        ("d", zip_bytes(), ".zip"),
    ]:
        r = c.post(f"/v1/uploads?kind=dataset&filename={name}", content=blob, headers=api.a)
        assert r.status_code == 201, r.text
        assert r.json()["filename"].endswith(suffix)
    before = sorted(leftover_files(root))

    # oversize: 413, by Content-Length and by streaming past the cap; nothing left behind
    assert_problem(c.post("/v1/uploads?kind=weights", content=b"x" * 20_000, headers=api.a), 413)

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 1000

    assert_problem(c.post("/v1/uploads?kind=weights", content=chunks(), headers=api.a), 413)
    # wrong type: 415; a pickle goes to the converter (tests/test_weights.py), which refuses this one
    assert_problem(c.post("/v1/uploads?kind=weights", content=b"GGUF" + bytes(60), headers=api.a), 415)
    body = assert_problem(
        c.post("/v1/uploads?kind=weights", content=b"\x80\x02pickle" * 10, headers=api.a), 422
    )
    assert "refused" in body["detail"] and "\n" not in body["detail"]
    bad_header = struct.pack("<Q", 9999) + b"{}"
    assert_problem(c.post("/v1/uploads?kind=weights", content=bad_header, headers=api.a), 415)
    assert_problem(c.post("/v1/uploads?kind=dataset", content=b"PK\x05\x06" + bytes(18), headers=api.a), 415)
    assert_problem(c.post("/v1/uploads?kind=dataset", content=data, headers=api.a), 415)
    assert_problem(c.post("/v1/uploads?kind=dataset", content=b"", headers=api.a), 422)
    assert_problem(c.post("/v1/uploads?kind=model", content=data, headers=api.a), 422)
    assert_problem(c.post("/v1/uploads?kind=weights", content=data), 401)
    # the database refuses the row: the placed file goes too
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(repo, "add_upload", lambda *a, **k: 1 / 0)
        other = safetensors_bytes(32)  # not `data`, which would be answered with the earlier upload
        assert_problem(c.post("/v1/uploads?kind=weights", content=other, headers=api.a), 500)
    assert sorted(leftover_files(root)) == before
    assert sorted(p for p in root.iterdir() if p.name != ".tmp") == sorted({p.parent for p in before})
    with db.session_scope(api.engine) as s:
        assert s.query(Upload).count() == 4


# --- events ---


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":")
        if "event" in fields:
            events.append(fields)
    return events


def test_events(api: Api) -> None:
    c = api.client
    job = api.submit()
    page = c.get(job["urls"]["events"], headers=api.a).json()
    assert [e["kind"] for e in page["items"]] == ["status"] and page["next_after"] == 1
    api.run_job(
        job["id"],
        ("phase", {"name": "finetune", "epochs": 1, "steps_per_epoch": 5}),
        ("progress", {"progress": 0.5, "phase": "finetune", "epoch": 0, "step": 2}),
        ("epoch", {"epoch": 0, "top1": 50.0}),
    )
    page = c.get(f"{job['urls']['events']}?after=1&limit=2", headers=api.a).json()
    assert [e["id"] for e in page["items"]] == [2, 3] and page["next_after"] == 3
    assert page["items"][1]["kind"] == "phase" and page["items"][1]["data"]["epochs"] == 1
    page = c.get(f"{job['urls']['events']}?after=3", headers=api.a).json()
    assert [e["kind"] for e in page["items"]] == ["progress", "epoch", "status"]
    assert page["items"][-1]["data"]["status"] == "succeeded"

    sse = {"Accept": "text/event-stream"}
    with c.stream("GET", job["urls"]["events"], headers=api.a | sse) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.read().decode())
    assert [int(e["id"]) for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e["event"] for e in events] == ["status", "status", "phase", "progress", "epoch", "status"]
    assert json.loads(events[-1]["data"])["status"] == "succeeded"
    # resume after event 4
    with c.stream("GET", job["urls"]["events"], headers=api.a | sse | {"Last-Event-ID": "4"}) as r:
        events = parse_sse(r.read().decode())
    assert [int(e["id"]) for e in events] == [5, 6]
    with c.stream("GET", f"{job['urls']['events']}?after=5", headers=api.a | sse) as r:
        assert [int(e["id"]) for e in parse_sse(r.read().decode())] == [6]
    assert_problem(c.get(job["urls"]["events"], headers=api.b | sse), 404)
    assert_problem(c.get(job["urls"]["events"], headers=api.b), 404)


def test_event_stream_follows_a_running_job(api: Api) -> None:
    """The stream waits on a running job, passes on what the worker writes, and ends when it finishes."""
    job = api.submit()
    with db.session_scope(api.engine) as s:
        attempt = repo.claim_job(s, job["id"], "w", lease_s=60).attempt

    def worker() -> None:
        time.sleep(0.7)
        with db.session_scope(api.engine) as s:
            repo.append_event(s, job["id"], "message", {"text": "hello"})
        time.sleep(0.7)
        with db.session_scope(api.engine) as s:
            repo.finish_job(s, job["id"], attempt, JobStatus.FAILED, error_code="boom", retryable=False)

    t = threading.Thread(target=worker)
    t.start()
    start = time.monotonic()
    headers = api.a | {"Accept": "text/event-stream", "Last-Event-ID": "1"}
    with api.client.stream("GET", job["urls"]["events"], headers=headers) as r:
        events = parse_sse(r.read().decode())
    t.join()
    assert time.monotonic() - start >= 1.2
    assert [(e["id"], e["event"]) for e in events] == [("2", "status"), ("3", "message"), ("4", "status")]
    assert json.loads(events[-1]["data"]) == {
        "status": "failed",
        "error_code": "boom",
        "message": None,
        "retryable": False,
    }
    body = api.client.get(job["urls"]["self"], headers=api.a).json()
    assert body["status"] == "failed" and body["error"] == {
        "code": "boom",
        "message": None,
        "retryable": False,
    }


# --- artifacts ---


def test_artifacts(api: Api) -> None:
    c = api.client
    job = api.submit()
    api.run_job(job["id"])
    folder = attempt_dir(api.settings.artifacts_dir, job["id"], 1)
    folder.mkdir(parents=True)
    blob = os.urandom(10_000)
    path = folder / "model.safetensors"
    path.write_bytes(blob)
    sha = sha256_file(path)
    with db.session_scope(api.engine) as s:
        rel = relative_to_root(api.settings.artifacts_dir, path)
        repo.add_artifact(
            s, job["id"], 1, "model.safetensors", rel, len(blob), sha, "application/octet-stream"
        )
        repo.add_artifact(
            s, job["id"], 1, "escape.bin", "../../etc/passwd", 10, sha, "application/octet-stream"
        )

    items = c.get(job["urls"]["artifacts"], headers=api.a).json()["items"]
    art = next(a for a in items if a["name"] == "model.safetensors")
    assert art["sha256"] == sha and art["size"] == len(blob)
    assert art["url"] == f"/v1/jobs/{job['id']}/artifacts/model.safetensors"

    r = c.get(art["url"], headers=api.a)
    assert r.status_code == 200 and r.content == blob
    assert hashlib.sha256(r.content).hexdigest() == sha == r.headers["etag"].strip('"')
    digest = base64.b64encode(bytes.fromhex(sha)).decode()
    assert r.headers["repr-digest"] == f"sha-256=:{digest}:" and r.headers["digest"] == f"sha-256={digest}"
    assert r.headers["accept-ranges"] == "bytes"
    assert "model.safetensors" in r.headers["content-disposition"]

    r = c.get(art["url"], headers=api.a | {"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == blob[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(blob)}"
    r = c.get(art["url"], headers=api.a | {"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == blob[-10:]
    r = c.get(art["url"], headers=api.a | {"Range": "bytes=20000-"})
    assert_problem(r, 416)
    assert r.headers["content-range"] == f"bytes */{len(blob)}"
    r = c.get(art["url"], headers=api.a | {"Range": "pages=1-2"})
    assert r.status_code == 200 and r.content == blob  # a malformed range is ignored

    r = c.get(art["url"], headers=api.a | {"If-None-Match": f'"{sha}"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == f'"{sha}"'
    r = c.get(art["url"], headers=api.a | {"If-None-Match": '"other"'})
    assert r.status_code == 200
    r = c.head(art["url"], headers=api.a)
    assert r.status_code == 200 and r.headers["content-length"] == str(len(blob))

    assert_problem(c.get(f"/v1/jobs/{job['id']}/artifacts/escape.bin", headers=api.a), 404)
    assert_problem(c.get(f"/v1/jobs/{job['id']}/artifacts/missing", headers=api.a), 404)
    assert_problem(c.get(art["url"], headers=api.b), 404)
    assert_problem(c.get(job["urls"]["artifacts"], headers=api.b), 404)


# --- catalog, health, metrics, queue ---


def test_catalog(api: Api) -> None:
    c = api.client
    assert_problem(c.get("/v1/methods"), 401)  # behind a key like all of /v1
    c.headers.update(api.a)
    methods = c.get("/v1/methods").json()["items"]
    mag = next(m for m in methods if m["name"] == "magnitude")
    assert "p" in mag["options_schema"]["properties"] and mag["description"]
    s2h = next(m for m in methods if m["name"] == "s2h")
    props = s2h["options_schema"]["properties"]
    assert {
        "temperature",
        "gap_weight",
        "resource_weight",
        "flops_relax",
        "mask_lr_scale",
        "width_divisor",
    } <= set(props)
    assert props["flops_relax"]["default"] == 0.02 and "S2HPruner" in s2h["description"]
    models = c.get("/v1/models").json()
    assert "resnet20" in [m["name"] for m in models["items"]] and models["torchvision"]["prefix"] == "tv:"
    datasets = c.get("/v1/datasets").json()
    assert {"digits", "imagefolder"} <= {d["name"] for d in datasets["items"]}
    assert "root" in datasets["schema"]["properties"]
    assert c.get("/openapi.json").status_code == 200


def test_health_and_metrics(api: Api) -> None:
    c = api.client
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["database"] == "ok"
    api.submit()
    c.get("/v1/jobs/unknown", headers=api.a)
    assert_problem(c.get("/metrics"), 401)
    text = c.get("/metrics", headers=api.a).text
    assert "jobs_created_total 1.0" in text
    assert 'route="/v1/jobs",status="201"' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text


def test_readyz_and_enqueue_with_broker_down(make_api, sqlite_url: str) -> None:
    api = make_api(sqlite_url, redis_url="redis://127.0.0.1:1/0")
    assert_problem(api.client.get("/readyz"), 503)
    job = api.submit()  # the row is committed; the reaper enqueues it later
    assert job["status"] == "queued"
    with db.session_scope(api.engine) as s:
        assert s.get(Job, job["id"]).enqueued_at is None


def test_enqueue_sends_by_name(make_api, sqlite_url: str, redis_url: str) -> None:
    import redis

    api = make_api(sqlite_url, redis_url=redis_url)
    assert api.client.get("/readyz").json()["checks"]["broker"] == "ok"
    job = api.submit()
    with db.session_scope(api.engine) as s:
        assert s.get(Job, job["id"]).enqueued_at is not None
    messages = redis.Redis.from_url(redis_url).lrange("pruning", 0, -1)
    assert len(messages) == 1
    headers = json.loads(messages[0])["headers"]
    assert headers["task"] == "pruning.run_job" and headers["id"] == job["id"]
    assert json.loads(base64.b64decode(json.loads(messages[0])["body"]))[0] == [job["id"]]


def test_unhandled_error_is_a_problem(api: Api, monkeypatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(repo, "list_jobs", boom)
    r = api.client.get("/v1/jobs", headers=api.a)
    body = assert_problem(r, 500)
    assert "secret" not in r.text and "RuntimeError" not in body["detail"]
    monkeypatch.undo()
    assert api.client.get("/v1/jobs", headers=api.a).status_code == 200


def test_api_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pruning_core.settings import Settings\n"
        "import api.app, api.__main__\n"
        f"api.app.create_app(Settings(state_dir={str(tmp_path)!r}))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'torch_pruning', 'worker'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_main_refuses_auth_disabled_off_loopback(tmp_path: Path) -> None:
    env = os.environ | {"AUTH_DISABLED": "1", "HOST": "0.0.0.0", "STATE_DIR": str(tmp_path)}
    env.pop("REDIS_URL", None)
    r = subprocess.run(
        [sys.executable, "-m", "api"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "loopback" in r.stderr
    assert not (tmp_path / "pruning.db").exists()  # refused before touching anything
