# ruff: noqa: F811 (the fixtures imported from test_api are arguments of the tests by name)
"""A job's life past its end (issue 31): delete, rerun, retention, and the SDK and CLI for them.

In-process API (FastAPI's TestClient) on SQLite, the delete on PostgreSQL too; no worker runs: jobs are
moved through their states with store.repo, as a worker would.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

import pruning_client.cli as cli
from api.routes.jobs import merge_overrides
from pruning_client.sdk import ApiError, Client
from store import db, repo
from store.files import attempt_dir, relative_to_root, sha256_file
from store.models import Artifact, Job, JobEvent, JobStatus, utcnow
from tests.test_api import Api, api, assert_problem, make_api  # noqa: F401 (fixtures)
from worker.retention import purge_expired


def _claim(api: Api, job_id: str) -> int:
    with db.session_scope(api.engine) as s:
        job = repo.claim_job(s, job_id, "test-worker", lease_s=60)
        assert job is not None
        return job.attempt


def _finish_with_file(api: Api, job_id: str, status: JobStatus = JobStatus.SUCCEEDED) -> Path:
    """Run the job to ``status`` with one artifact on disk (and an event); returns the job's directory."""
    attempt = _claim(api, job_id)
    root = api.settings.artifacts_dir
    path = attempt_dir(root, job_id, attempt) / "model.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights" * 100)
    with db.session_scope(api.engine) as s:
        repo.append_event(s, job_id, "message", {"text": "hello"})
        rel = relative_to_root(root, path)
        repo.add_artifact(s, job_id, attempt, "model.safetensors", rel, 700, sha256_file(path), "x/y")
        assert repo.finish_job(s, job_id, attempt, status, result={"achieved_macs_ratio": 0.5})
    return root / job_id


def _rows(api: Api, job_id: str) -> tuple[int, int, int]:
    with db.session_scope(api.engine) as s:
        return tuple(
            s.scalar(select(func.count()).select_from(t).where(col == job_id))
            for t, col in ((Job, Job.id), (JobEvent, JobEvent.job_id), (Artifact, Artifact.job_id))
        )


# --- delete ---


@pytest.mark.parametrize("backend", ["sqlite_url", "pg_url"])
def test_delete_an_ended_job_removes_row_events_artifacts_and_files(make_api, request, backend: str) -> None:
    api = make_api(request.getfixturevalue(backend))
    c = api.client
    job = api.submit()
    # queued: 409, cancel first
    body = assert_problem(c.delete(f"/v1/jobs/{job['id']}", headers=api.a), 409)
    assert "cancel" in body["detail"] and body["job_status"] == "queued"
    job_dir = _finish_with_file(api, job["id"])
    assert job_dir.is_dir() and _rows(api, job["id"]) == (1, 4, 1)
    # another owner: 404, as for a job that does not exist; nothing deleted
    assert_problem(c.delete(f"/v1/jobs/{job['id']}", headers=api.b), 404)
    assert _rows(api, job["id"])[0] == 1

    r = c.delete(f"/v1/jobs/{job['id']}", headers=api.a)
    assert r.status_code == 204 and r.content == b""
    assert _rows(api, job["id"]) == (0, 0, 0)
    assert not job_dir.exists()
    assert_problem(c.get(f"/v1/jobs/{job['id']}", headers=api.a), 404)
    assert_problem(c.delete(f"/v1/jobs/{job['id']}", headers=api.a), 404)


def test_delete_is_refused_while_running(api: Api) -> None:
    c = api.client
    job = api.submit()
    attempt = _claim(api, job["id"])
    body = assert_problem(c.delete(f"/v1/jobs/{job['id']}", headers=api.a), 409)
    assert body["type"].endswith("job-not-ended") and body["job_status"] == "running"
    assert _rows(api, job["id"])[0] == 1
    # cancel first, then the worker stops: now it can go
    assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=api.a).status_code == 202
    assert_problem(c.delete(f"/v1/jobs/{job['id']}", headers=api.a), 409)  # still running
    with db.session_scope(api.engine) as s:
        repo.finish_job(s, job["id"], attempt, JobStatus.CANCELLED)
    assert c.delete(f"/v1/jobs/{job['id']}", headers=api.a).status_code == 204
    assert _rows(api, job["id"]) == (0, 0, 0)


def test_delete_in_openapi(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    assert {"get", "delete"} <= set(paths["/v1/jobs/{job_id}"])
    assert "post" in paths["/v1/jobs/{job_id}/rerun"] and "get" in paths["/v1/jobs/{job_id}/deliveries"]
    assert "409" in paths["/v1/jobs/{job_id}"]["delete"]["responses"]


# --- rerun ---


def test_rerun_is_the_same_spec_plus_overrides(api: Api) -> None:
    c = api.client
    first = api.submit()
    overrides = {"target": {"macs_ratio": 0.3}, "schedule": {"epochs": 2}, "seed": 5}
    r = c.post(f"/v1/jobs/{first['id']}/rerun", json=overrides, headers=api.a)
    assert r.status_code == 201, r.text
    again = r.json()
    assert again["id"] != first["id"] and again["rerun_of"] == first["id"] and again["status"] == "queued"
    expected = json.loads(json.dumps(first["spec"]))
    expected["target"]["macs_ratio"] = 0.3
    expected["schedule"]["epochs"] = 2
    expected["seed"] = 5
    assert again["spec"] == expected
    assert r.headers["location"] == f"/v1/jobs/{again['id']}"
    assert c.get(f"/v1/jobs/{again['id']}", headers=api.a).json()["rerun_of"] == first["id"]

    # no body: the very same spec
    same = c.post(f"/v1/jobs/{first['id']}/rerun", headers=api.a)
    assert same.status_code == 201 and same.json()["spec"] == first["spec"]
    assert c.get(f"/v1/jobs/{first['id']}", headers=api.a).json()["rerun_of"] is None


def test_rerun_is_checked_like_a_submit(make_api, sqlite_url: str) -> None:
    api = make_api(sqlite_url, quota_queued_jobs=2, max_epochs=5)
    c = api.client
    first = api.submit()
    url = f"/v1/jobs/{first['id']}/rerun"
    body = assert_problem(c.post(url, json={"schedule": {"epochs": "many"}}, headers=api.a), 422)
    assert [e["field"] for e in body["errors"]] == ["schedule.epochs"]
    body = assert_problem(c.post(url, json={"nonsense": 1}, headers=api.a), 422)
    assert body["errors"][0]["field"] == "nonsense"
    body = assert_problem(c.post(url, json={"schedule": {"epochs": 50}}, headers=api.a), 422)  # a limit
    assert [e["field"] for e in body["errors"]] == ["schedule.epochs"]
    assert_problem(c.post(url, json=[1, 2], headers=api.a), 422)
    assert_problem(c.post(url, headers=api.b), 404)  # another owner's job
    assert c.post(url, headers=api.a).status_code == 201
    assert_problem(c.post(url, headers=api.a), 429)  # the queued-jobs quota, as for a submit
    # an Idempotency-Key makes a retried rerun return the same job
    api2 = make_api(sqlite_url.replace("jobs.db", "jobs2.db"))
    j = api2.submit()
    k = {"Idempotency-Key": "rerun-1"}
    one = api2.client.post(f"/v1/jobs/{j['id']}/rerun", json={"seed": 3}, headers=api2.a | k)
    two = api2.client.post(f"/v1/jobs/{j['id']}/rerun", json={"seed": 3}, headers=api2.a | k)
    assert (one.status_code, two.status_code) == (201, 200) and one.json()["id"] == two.json()["id"]


def test_merge_overrides() -> None:
    spec = {"method": {"name": "magnitude", "round_to": 8}, "target": {"macs_ratio": 0.5, "round_to": 4}}
    merged = merge_overrides(spec, {"target": {"macs_ratio": 0.3}, "method": {"round_to": 16}})
    assert merged == {
        "method": {"name": "magnitude", "round_to": 16},
        "target": {"macs_ratio": 0.3, "round_to": 4},
    }
    # another method: its options replace the first's whole
    assert merge_overrides(spec, {"method": {"name": "s2h"}})["method"] == {"name": "s2h"}
    assert spec["target"]["macs_ratio"] == 0.5  # the original is untouched


# --- retention ---


def _age(api: Api, job_id: str, days: float) -> None:
    with db.session_scope(api.engine) as s:
        when = utcnow() - timedelta(days=days)
        s.execute(update(Job).where(Job.id == job_id).values(finished_at=when, created_at=when))


def test_retention_removes_old_ended_jobs_only(make_api, sqlite_url: str, caplog) -> None:
    api = make_api(sqlite_url, job_retention_days=7)
    old, young, running, old_failed = (api.submit()["id"] for _ in range(4))
    old_dir = _finish_with_file(api, old)
    young_dir = _finish_with_file(api, young)
    failed_dir = _finish_with_file(api, old_failed, JobStatus.FAILED)
    _claim(api, running)
    _age(api, old, 10)
    _age(api, old_failed, 8)
    _age(api, young, 1)
    with db.session_scope(api.engine) as s:  # running for 30 days: no end, no expiry
        s.execute(update(Job).where(Job.id == running).values(created_at=utcnow() - timedelta(days=30)))

    with caplog.at_level(logging.INFO, logger="worker.retention"):
        assert purge_expired(api.engine, api.settings) == 2
    assert _rows(api, old) == (0, 0, 0) and _rows(api, old_failed) == (0, 0, 0)
    assert not old_dir.exists() and not failed_dir.exists()
    assert _rows(api, young)[0] == 1 and young_dir.is_dir() and _rows(api, running)[0] == 1
    assert old in caplog.text and "retention" in caplog.text
    metrics = api.client.get("/metrics", headers=api.a).text
    assert "jobs_retention_deleted_total 2.0" in metrics
    assert purge_expired(api.engine, api.settings) == 0  # nothing more past its age

    # unset: everything stays, however old
    keep = api.settings.model_copy(update={"job_retention_days": None})
    _age(api, young, 1000)
    assert purge_expired(api.engine, keep) == 0 and _rows(api, young)[0] == 1


def test_retention_counter_starts_at_zero(api: Api) -> None:
    text = api.client.get("/metrics", headers=api.a).text
    assert (
        "# TYPE jobs_retention_deleted_total counter" in text and "jobs_retention_deleted_total 0.0" in text
    )


# --- the SDK and the CLI, against the real API ---


@pytest.fixture
def sdk_client(api: Api) -> Client:
    return Client("http://testserver", api.key_a, transport=api.client._transport, retries=0)


def test_sdk_rerun_and_delete(api: Api, sdk_client: Client) -> None:
    first = api.submit()
    again = sdk_client.rerun(first["id"], {"target": {"macs_ratio": 0.25}})
    assert again.rerun_of == first["id"] and again.spec["target"]["macs_ratio"] == 0.25
    with pytest.raises(ApiError) as err:
        sdk_client.delete(first["id"])
    assert err.value.status == 409
    _finish_with_file(api, first["id"])
    sdk_client.delete(first["id"])
    assert _rows(api, first["id"])[0] == 0
    assert sdk_client.deliveries(again.id) == []


def test_cli_rerun_and_delete(api: Api, monkeypatch, capsys) -> None:
    transport = api.client._transport
    monkeypatch.setattr(cli, "Client", functools.partial(Client, transport=transport, retries=0))
    monkeypatch.setenv("PRUNE_API_KEY", api.key_a)
    monkeypatch.setenv("PRUNE_URL", "http://testserver")
    first = api.submit()
    assert cli.main(["rerun", first["id"], "--target", "0.4", "--set", "schedule.epochs=2"]) == 0
    new_id = capsys.readouterr().out.strip()
    with db.session_scope(api.engine) as s:
        job = s.get(Job, new_id)
        assert job.rerun_of == first["id"]
        assert job.spec["target"]["macs_ratio"] == 0.4 and job.spec["schedule"]["epochs"] == 2
        assert job.spec["model"] == first["spec"]["model"]
    assert cli.main(["delete", first["id"]]) == 2  # queued: the service's 409, one line
    assert "cancel" in capsys.readouterr().err
    _finish_with_file(api, first["id"])
    assert cli.main(["delete", first["id"]]) == 0
    assert _rows(api, first["id"])[0] == 0
    assert cli.main(["deliveries", new_id]) == 0


def test_the_reaper_runs_retention(make_api, sqlite_url: str) -> None:
    """``python -m worker.reaper``'s loop deletes expired jobs on its first pass."""
    import threading

    from worker import reaper

    api = make_api(sqlite_url, job_retention_days=1)
    old = api.submit()["id"]
    _finish_with_file(api, old)
    _age(api, old, 2)
    stop = threading.Event()
    thread = threading.Thread(
        target=reaper.run_forever, args=(api.engine, lambda _id: None, api.settings, stop)
    )
    thread.start()
    try:
        deadline = utcnow() + timedelta(seconds=20)
        while _rows(api, old)[0] and utcnow() < deadline:
            stop.wait(0.1)
    finally:
        stop.set()
        thread.join(30)
    assert _rows(api, old) == (0, 0, 0)


# --- the migration ---


@pytest.mark.parametrize("backend", ["sqlite_url", "pg_url"])
def test_migration_0006_keeps_earlier_jobs(request, backend: str) -> None:
    """Jobs stored before 0006 read back with no rerun_of and no secret, can end and be deleted; the
    downgrade keeps them."""
    url = request.getfixturevalue(backend)
    db.migrate(url, "0005")
    engine = db.make_engine(url)
    job_id = "e" * 32
    try:
        with db.session_scope(engine) as s:  # a Core insert: only the columns schema 0005 has
            s.execute(
                Job.__table__.insert().values(
                    id=job_id, owner="alice", spec={"seed": 1}, method="magnitude", status="queued",
                    attempt=0, max_attempts=3, cancel_requested=False, progress=0.0, created_at=utcnow(),
                )
            )  # fmt: skip
        db.migrate(url)
        with db.session_scope(engine) as s:
            job = s.get(Job, job_id)
            assert job.rerun_of is None and job.notify_secret is None
            repo.request_cancel(s, job_id)  # ends it: no notify, so no delivery
        with db.session_scope(engine) as s:
            assert s.get(Job, job_id).status == JobStatus.CANCELLED
        db.downgrade(url, "0005")
        assert db.current_revision(url) == "0005"
        db.migrate(url)
        with db.session_scope(engine) as s:
            assert repo.delete_job(s, job_id)
        with db.session_scope(engine) as s:
            assert s.get(Job, job_id) is None
    finally:
        engine.dispose()
