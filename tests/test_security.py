"""Who may call what: keys on every route but health, keys hashed and revocable at once, AUTH_DISABLED
only for loopback peers, and owner isolation on every route the app has (a new route without the
owner check fails ``test_another_owner_gets_404_on_every_route``)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.app import create_app
from pruning_core.settings import Settings
from store import cli as store_cli
from store import db, repo
from store.files import attempt_dir, relative_to_root, sha256_file
from store.models import ApiKey, JobStatus, Sweep
from tests.specs import TINY_SPEC as SPEC

PROBLEM = "application/problem+json"
# Routes anyone may call, and why: probes (they reveal no one's data) and the API's description (the
# same for everyone; a browser needs /docs before it can send a key).
PUBLIC = {"/healthz", "/readyz"}
DOCS = ("/openapi.json", "/docs", "/redoc")
# Routes with a path parameter that names no one's data: what the server offers, the same for every key.
CATALOG = {"/v1/models/{model_name}"}


def safetensors_bytes(n: int = 16) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n // 4], "data_offsets": [0, n]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(n)


def problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    return r.json()


@pytest.fixture
def app_env(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[TestClient, Settings, dict, dict]]:
    """An app on SQLite with two owners' keys: (client, settings, alice's headers, bob's headers)."""
    db.migrate(sqlite_url)
    settings = Settings(state_dir=tmp_path / "state", database_url=sqlite_url, redis_url=None)
    with db.session_scope(db.make_engine(sqlite_url)) as s:
        _, ka = repo.create_api_key(s, "alice")
        _, kb = repo.create_api_key(s, "bob")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings, {"Authorization": f"Bearer {ka}"}, {"Authorization": f"Bearer {kb}"}


def _walk(routes: list, prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """APIRoutes with their full path, also inside included routers (FastAPI may wrap those)."""
    for r in routes:
        if isinstance(r, APIRoute):
            yield prefix + r.path, r
        elif hasattr(r, "original_router"):
            yield from _walk(r.original_router.routes, prefix + r.include_context.prefix)
        elif hasattr(r, "routes"):
            yield from _walk(r.routes, prefix + getattr(r, "path", ""))


# The web pages (api/web): signed in by a cookie, not a Bearer key; tests/test_web.py walks them.
PAGES = "/ui"


def api_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every (method, path template) the app serves through FastAPI (docs pages are not APIRoutes),
    and every one its OpenAPI document lists, should the two ever differ; the web pages aside."""
    found = {
        (m, path)
        for path, r in _walk(client.app.routes)
        for m in r.methods
        if m != "HEAD" and not path.startswith(PAGES)
    }
    documented = {
        (m.upper(), path) for path, ops in client.app.openapi()["paths"].items() for m in ops if m != "head"
    }
    return sorted(found | documented)


def fill(path: str, ids: dict[str, str]) -> str:
    params = re.findall(r"{(\w+)(?::\w+)?}", path)
    missing = [p for p in params if p not in ids]
    assert not missing, f"{path}: the isolation test does not know {missing}; add an id for it"
    return re.sub(r"{(\w+)(?::\w+)?}", lambda m: ids[m[1]], path)


def test_every_route_but_health_needs_a_key(app_env) -> None:
    client, _, _, _ = app_env
    ids = {
        "job_id": "0" * 32,
        "upload_id": "0" * 32,
        "sweep_id": "0" * 32,
        "name": "model.safetensors",
        "model_name": "resnet20",
    }
    routes = api_routes(client)
    assert len(routes) >= 12
    for method, path in routes:
        r = client.request(method, fill(path, ids))
        if path in PUBLIC:
            assert r.status_code == 200, (method, path, r.text)
        else:
            body = problem(r, 401)
            assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)
            assert body["type"].endswith("unauthorized")
    for path in DOCS:  # the description of the API stays readable without a key
        assert client.get(path).status_code == 200, path
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/v1/methods"]["get"]["security"], "the catalog is documented as keyed"


def _alice_world(client: TestClient, settings: Settings, alice: dict) -> dict[str, str]:
    """Alice's job (succeeded, with an artifact), her upload, and her sweep (ended, that job its winner)."""
    up = client.post("/v1/uploads?kind=weights", content=safetensors_bytes(), headers=alice).json()
    job = client.post("/v1/jobs", json=SPEC, headers=alice).json()
    sweep = client.post("/v1/sweeps", json={"spec": SPEC, "methods": ["magnitude"]}, headers=alice)
    assert sweep.status_code == 201, sweep.text
    engine = db.make_engine(settings.sqlalchemy_url)
    folder = attempt_dir(settings.artifacts_dir, job["id"], 1)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    with db.session_scope(engine) as s:
        attempt = repo.claim_job(s, job["id"], "w", lease_s=60).attempt
        rel = relative_to_root(settings.artifacts_dir, folder / "model.safetensors")
        digest = sha256_file(folder / "model.safetensors")
        repo.add_artifact(
            s, job["id"], attempt, "model.safetensors", rel, 7, digest, "application/octet-stream"
        )
        repo.finish_job(s, job["id"], attempt, JobStatus.SUCCEEDED)
        row = s.get(Sweep, sweep.json()["id"])
        row.status, row.winner_job_id = JobStatus.SUCCEEDED, job["id"]
    engine.dispose()
    return {
        "job_id": job["id"],
        "upload_id": up["id"],
        "sweep_id": sweep.json()["id"],
        "name": "model.safetensors",
        "model_name": "resnet20",
    }


def unmask(text: str, ids: dict[str, str]) -> str:
    for key in ("job_id", "upload_id", "sweep_id"):
        text = text.replace(ids[key], f"<{key}>")
    return text


def test_another_owner_gets_404_on_every_route(app_env) -> None:
    """Every route with an id answers another owner's id like an unknown one (404, no body of hers);
    every listing leaves her ids out. A route the test cannot classify fails it."""
    client, settings, alice, bob = app_env
    ids = _alice_world(client, settings, alice)
    fake = {
        "job_id": "f" * 32,
        "upload_id": "e" * 32,
        "sweep_id": "d" * 32,
        "name": "model.safetensors",
        "model_name": "resnet20",
    }
    # make the caller's own, nothing else
    creators = {("POST", "/v1/jobs"), ("POST", "/v1/uploads"), ("POST", "/v1/sweeps")}
    checked = 0
    for method, path in api_routes(client):
        if path in PUBLIC or (method, path) in creators:
            continue
        url = fill(path, ids)
        r = client.request(method, url, headers=bob)
        if path in CATALOG:  # the same for every owner
            assert method == "GET" and r.status_code == 200, (path, r.text)
            assert r.text == client.request(method, url, headers=alice).text, path
        elif "{" in path:
            problem(r, 404)
            # exactly what an unknown id gets: nothing tells bob that alice's ids exist
            unknown = client.request(method, fill(path, fake), headers=bob)
            assert unmask(r.text, ids) == unmask(unknown.text, fake), (method, path)
            if method != "DELETE":  # and the id is real: alice herself gets it
                assert client.request(method, url, headers=alice).status_code < 400, (method, path)
        else:
            assert method == "GET", f"{method} {path}: not classified by the isolation test"
            assert r.status_code == 200, (path, r.text)
            assert all(ids[k] not in r.text for k in ("job_id", "upload_id", "sweep_id")), path
        checked += 1
    assert checked >= 10
    # nothing of alice's changed hands: her job is not cancelled, her upload not deleted
    assert client.get(f"/v1/uploads/{ids['upload_id']}", headers=alice).status_code == 200
    assert client.get(f"/v1/jobs/{ids['job_id']}", headers=alice).json()["status"] == "succeeded"


def test_keys_are_hashed_and_a_revoked_key_is_refused_at_once(app_env, capsys) -> None:
    client, settings, _, _ = app_env
    url = settings.sqlalchemy_url
    assert store_cli.main(["--database-url", url, "keys", "create", "--owner", "carol"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    key_id = re.search(r"created key (\w+)", out.err)[1]
    engine = db.make_engine(url)
    with db.session_scope(engine) as s:
        row = s.get(ApiKey, key_id)
        assert row.hash == hashlib.sha256(key.encode()).hexdigest()  # only the digest is stored
        assert key not in (row.hash, row.prefix, row.name) and len(row.prefix) < len(key) // 2
    engine.dispose()
    carol = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=carol).status_code == 200
    assert store_cli.main(["--database-url", url, "keys", "revoke", key_id, "--owner", "carol"]) == 0
    r = client.get("/v1/jobs", headers=carol)  # the very next request: no cache to outlive
    problem(r, 401)
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    # revoking again, or someone else's key, is bad input (exit 2), not a silent success
    assert store_cli.main(["--database-url", url, "keys", "revoke", key_id, "--owner", "carol"]) == 2
    capsys.readouterr()
    assert store_cli.main(["--database-url", url, "keys", "list", "--owner", "carol"]) == 0
    assert "revoked" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("peer", "headers", "status"),
    [
        ("127.0.0.1", {}, 200),
        ("::1", {}, 200),
        ("10.1.2.3", {}, 401),
        ("testclient", {}, 401),  # not an address at all
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, 401),  # a local proxy relaying a stranger
        ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}, 401),
    ],
)
def test_auth_disabled_serves_keyless_requests_from_loopback_only(
    tmp_path: Path, sqlite_url: str, peer: str, headers: dict, status: int
) -> None:
    db.migrate(sqlite_url)
    settings = Settings(
        state_dir=tmp_path / "state", database_url=sqlite_url, redis_url=None, auth_disabled=True
    )
    with db.session_scope(db.make_engine(sqlite_url)) as s:
        _, key = repo.create_api_key(s, "dave")
    with TestClient(create_app(settings), client=(peer, 50000), raise_server_exceptions=False) as c:
        r = c.get("/v1/jobs", headers=headers)
        assert r.status_code == status, r.text
        if status == 401:
            assert "loopback" in problem(r, 401)["detail"]
        # a key works from anywhere, as without AUTH_DISABLED
        assert c.get("/v1/jobs", headers=headers | {"Authorization": f"Bearer {key}"}).status_code == 200
