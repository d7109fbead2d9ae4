"""No one starved: per-owner quotas (429 with Retry-After), a fair claim order across owners (the local
runner's and the broker's), uploads an owner can list and delete, and a job time limit in embedded mode.
"""

from __future__ import annotations

import json
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.app import create_app
from api.queue import fair_priority
from pruning_core.settings import Settings
from store import db, repo
from store.models import Job, JobStatus
from tests.specs import TINY_SPEC as SPEC
from tests.specs import tiny_spec_weights
from worker.execute import TIME_LIMIT_MESSAGE
from worker.local import EXIT_DONE, LocalRunner, next_queued

PROBLEM = "application/problem+json"


def safetensors_bytes(n: int = 16, key: str = "w") -> bytes:
    """A valid safetensors file of one tensor ``key``; another key is other bytes of the same size
    (the same bytes again would be answered with the earlier upload)."""
    header = json.dumps({key: {"dtype": "F32", "shape": [n // 4], "data_offsets": [0, n]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(n)


def too_many(r, slug: str) -> dict:
    """A 429 problem of type ``slug`` with a Retry-After of whole seconds."""
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["status"] == 429 and body["type"].endswith(slug), body
    return body


class Env:
    """An app on SQLite plus keys: alice (two keys) and bob."""

    def __init__(self, tmp_path: Path, url: str, **overrides: object) -> None:
        db.migrate(url)
        fields: dict[str, object] = {"state_dir": tmp_path / "state", "database_url": url, "redis_url": None}
        self.settings = Settings(**(fields | overrides))
        self.engine = db.make_engine(url)
        with db.session_scope(self.engine) as s:
            keys = [repo.create_api_key(s, o)[1] for o in ("alice", "alice", "bob")]
        self.a, self.a2, self.b = ({"Authorization": f"Bearer {k}"} for k in keys)
        self.client = TestClient(create_app(self.settings), raise_server_exceptions=False)

    def __enter__(self) -> Env:
        self.client.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.__exit__(*exc)
        self.engine.dispose()


@pytest.fixture
def env_factory(tmp_path: Path) -> Iterator:
    made: list[Env] = []

    def make(url: str | None = None, **overrides: object) -> Env:
        e = Env(tmp_path, url or f"sqlite:///{tmp_path / f'db{len(made)}.db'}", **overrides).__enter__()
        made.append(e)
        return e

    yield make
    for e in made:
        e.__exit__(None, None, None)


# --- quotas ---


def test_request_rate_is_a_token_bucket_per_owner(env_factory) -> None:
    env = env_factory(rate_per_s=0.5, rate_burst=3)
    c = env.client
    assert [c.get("/v1/jobs", headers=env.a).status_code for _ in range(3)] == [200] * 3
    body = too_many(c.get("/v1/jobs", headers=env.a), "rate-limited")
    assert "per owner" in body["detail"]
    assert c.get("/v1/jobs", headers=env.a).headers["retry-after"] == "2"  # one token per 2 s
    too_many(c.get("/v1/jobs", headers=env.a2), "rate-limited")  # another key buys no more rate
    assert c.get("/v1/jobs", headers=env.b).status_code == 200  # bob has his own bucket
    assert c.get("/healthz").status_code == 200  # probes take no token


def test_request_rate_is_shared_through_redis(env_factory, redis_url: str, sqlite_url: str) -> None:
    """Two API processes (two apps) on one Redis draw from one bucket per owner."""
    one = env_factory(sqlite_url, redis_url=redis_url, rate_per_s=0.2, rate_burst=4)
    two = env_factory(sqlite_url, redis_url=redis_url, rate_per_s=0.2, rate_burst=4)
    codes = [(one if i % 2 else two).client.get("/v1/jobs", headers=one.a).status_code for i in range(6)]
    assert codes == [200] * 4 + [429] * 2
    # Redis gone: each process falls back on its own bucket, and still answers
    down = env_factory(redis_url="redis://127.0.0.1:1/0", rate_per_s=0.2, rate_burst=2)
    codes = [down.client.get("/v1/jobs", headers=down.a).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_queued_jobs_quota(env_factory) -> None:
    env = env_factory(quota_queued_jobs=2)
    c = env.client
    first = c.post("/v1/jobs", json=SPEC, headers=env.a | {"Idempotency-Key": "k1"})
    assert first.status_code == 201
    assert c.post("/v1/jobs", json=SPEC, headers=env.a).status_code == 201
    body = too_many(c.post("/v1/jobs", json=SPEC, headers=env.a), "queued-jobs-quota")
    assert body["limit"] == 2
    # a replay is not a new job: it still answers; bob is not held to alice's queue
    replay = c.post("/v1/jobs", json=SPEC, headers=env.a | {"Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    assert c.post("/v1/jobs", json=SPEC, headers=env.b).status_code == 201
    with db.session_scope(env.engine) as s:  # one of alice's starts: room for one more
        assert repo.claim_job(s, first.json()["id"], "w", lease_s=60) is not None
    assert c.post("/v1/jobs", json=SPEC, headers=env.a).status_code == 201
    assert c.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=env.a).status_code == 202
    with db.session_scope(env.engine) as s:
        assert repo.count_jobs(s, "alice", JobStatus.QUEUED) == 2


def test_upload_bytes_quota(env_factory) -> None:
    data, data2, data3 = (safetensors_bytes(64, key) for key in "abc")
    env = env_factory(quota_upload_bytes=2 * len(data) + 10)
    c = env.client
    up = c.post("/v1/uploads?kind=weights", content=data, headers=env.a)
    assert up.status_code == 201
    assert c.post("/v1/uploads?kind=weights", content=data2, headers=env.a).status_code == 201
    body = too_many(c.post("/v1/uploads?kind=weights", content=data3, headers=env.a), "upload-quota")
    assert body["used"] == 2 * len(data)

    def chunks(blob: bytes = data3) -> Iterator[bytes]:  # no Content-Length: caught after the body was read
        yield blob

    # the same bytes again cost nothing once read (the earlier upload is the answer); a Content-Length
    # past the quota is refused before the body, whose hash is not known yet
    assert c.post("/v1/uploads?kind=weights", content=chunks(data), headers=env.a).status_code == 200

    too_many(c.post("/v1/uploads?kind=weights", content=chunks(), headers=env.a), "upload-quota")
    leftovers = [p for p in env.settings.uploads_dir.rglob("*") if p.is_file()]
    assert len(leftovers) == 2, leftovers  # the refused bodies left nothing behind
    assert c.post("/v1/uploads?kind=weights", content=data, headers=env.b).status_code == 201
    assert c.delete(f"/v1/uploads/{up.json()['id']}", headers=env.a).status_code == 204
    assert c.post("/v1/uploads?kind=weights", content=data, headers=env.a).status_code == 201


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
def test_running_quota_is_held_at_the_claim(request, tmp_path: Path, backend: str) -> None:
    url = request.getfixturevalue("pg_url") if backend == "pg" else f"sqlite:///{tmp_path / 'q.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    with db.session_scope(engine) as s:
        a1, a2 = (repo.create_job(s, "alice", SPEC, "magnitude")[0].id for _ in range(2))
        b1 = repo.create_job(s, "bob", SPEC, "magnitude")[0].id
        repo.mark_enqueued(s, a2)
    with db.session_scope(engine) as s:
        assert repo.claim_job(s, a1, "w1", 60, max_running=1) is not None
    with db.session_scope(engine) as s:
        assert repo.claim_job(s, a2, "w2", 60, max_running=1) is None  # alice is at her quota
    with db.session_scope(engine) as s:
        job = s.get(Job, a2)
        assert job.status == JobStatus.QUEUED and job.enqueued_at is None  # the reaper wakes it again
        assert repo.fair_queued_job_ids(s, max_running=1) == [b1]
        assert repo.claim_job(s, b1, "w2", 60, max_running=1) is not None
    with db.session_scope(engine) as s:
        repo.finish_job(s, a1, 1, JobStatus.SUCCEEDED)
    with db.session_scope(engine) as s:
        assert repo.claim_job(s, a2, "w1", 60, max_running=1) is not None
    engine.dispose()


# --- fair order ---


def _run_in_runner_order(engine: Engine, max_running: int = 0) -> list[str]:
    """Claim and finish jobs one at a time in the order the local runner picks them."""
    order = []
    while (job_id := next_queued(engine, max_running=max_running)) is not None:
        with db.session_scope(engine) as s:
            job = repo.claim_job(s, job_id, "local", 60, max_running=max_running)
            assert job is not None
            repo.finish_job(s, job_id, job.attempt, JobStatus.SUCCEEDED)
        order.append(job_id)
    return order


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
def test_one_owners_long_queue_does_not_hold_anothers_first_job(
    request, tmp_path: Path, backend: str
) -> None:
    url = request.getfixturevalue("pg_url") if backend == "pg" else f"sqlite:///{tmp_path / 'f.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    with db.session_scope(engine) as s:
        a_jobs = [repo.create_job(s, "alice", SPEC, "magnitude")[0].id for _ in range(10)]
    with db.session_scope(engine) as s:
        b_first, b_second = (repo.create_job(s, "bob", SPEC, "magnitude")[0].id for _ in range(2))
        c_first = repo.create_job(s, "carol", SPEC, "magnitude")[0].id
    order = _run_in_runner_order(engine, max_running=2)
    assert sorted(order) == sorted([*a_jobs, b_first, b_second, c_first])  # every job ran, once
    # round-robin: alice's 1st, bob's 1st, carol's 1st, alice's 2nd, bob's 2nd, then alice's rest
    assert order[:5] == [a_jobs[0], b_first, c_first, a_jobs[1], b_second]
    assert order[5:] == a_jobs[2:]  # each owner's own jobs stay in submission order
    engine.dispose()


def test_a_running_job_sends_its_owner_behind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    db.migrate(url)
    engine = db.make_engine(url)
    with db.session_scope(engine) as s:
        a1, a2 = (repo.create_job(s, "alice", SPEC, "magnitude")[0].id for _ in range(2))
        b1 = repo.create_job(s, "bob", SPEC, "magnitude")[0].id
        repo.claim_job(s, a1, "gpu0", 60)  # alice already has a GPU
    assert next_queued(engine) == b1
    assert next_queued(engine, {b1}) == a2
    engine.dispose()


def test_broker_priority_puts_each_owners_first_job_ahead(env_factory, redis_url: str) -> None:
    """The Celery path: alice submits 8 jobs, then bob one; a worker's consumer (kombu, with Celery's
    default Redis priority steps) receives bob's second, right after alice's first."""
    from kombu import Connection

    env = env_factory(redis_url=redis_url, rate_burst=1000)
    a_jobs = [env.client.post("/v1/jobs", json=SPEC, headers=env.a).json()["id"] for _ in range(8)]
    b_job = env.client.post("/v1/jobs", json=SPEC, headers=env.b).json()["id"]
    received = []
    with Connection(redis_url) as conn:
        queue = conn.SimpleQueue("pruning")
        for _ in range(9):
            msg = queue.get(timeout=2)
            received.append(msg.headers["id"])
            msg.ack()
        queue.close()
    assert sorted(received) == sorted([*a_jobs, b_job])
    assert received.index(b_job) == 1, received
    assert received[0] == a_jobs[0] and received[-1] == a_jobs[-1]
    assert [fair_priority(n) for n in range(6)] == [0, 3, 6, 6, 9, 9]


# --- uploads: list and delete ---


def test_uploads_list_and_delete(env_factory) -> None:
    env = env_factory()
    c = env.client
    ids = [
        c.post("/v1/uploads?kind=weights", content=body, headers=env.a).json()["id"]
        # the first is used by a job: weights that match its model (checked at submit)
        for body in (tiny_spec_weights(), safetensors_bytes(key="b"), safetensors_bytes(key="c"))
    ]
    page = c.get("/v1/uploads?limit=2", headers=env.a).json()
    rest = c.get(f"/v1/uploads?limit=2&cursor={page['next_cursor']}", headers=env.a).json()
    assert [u["id"] for u in page["items"] + rest["items"]] == ids[::-1]  # newest first, every one once
    assert rest["next_cursor"] is None and c.get("/v1/uploads", headers=env.b).json()["items"] == []
    assert c.get("/v1/uploads?cursor=garbage", headers=env.a).status_code == 400

    # in use by a queued job: 409 naming it, file kept; once the job is cancelled, deleted
    job = c.post(
        "/v1/jobs", json=SPEC | {"model": {"name": "resnet20", "weights": f"upload:{ids[0]}"}}, headers=env.a
    )
    assert job.status_code == 201, job.text
    r = c.delete(f"/v1/uploads/{ids[0]}", headers=env.a)
    assert r.status_code == 409 and r.json()["jobs"] == [job.json()["id"]]
    assert r.headers["content-type"].startswith(PROBLEM)
    with db.session_scope(env.engine) as s:
        path = env.settings.uploads_dir / repo.get_upload(s, ids[0]).path
    assert path.is_file()
    c.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=env.a)
    r = c.delete(f"/v1/uploads/{ids[0]}", headers=env.a)
    assert r.status_code == 204 and r.content == b""
    assert not path.exists() and not path.parent.exists()
    assert c.get(f"/v1/uploads/{ids[0]}", headers=env.a).status_code == 404
    assert c.delete(f"/v1/uploads/{ids[0]}", headers=env.a).status_code == 404
    assert [u["id"] for u in c.get("/v1/uploads", headers=env.a).json()["items"]] == ids[:0:-1]


# --- a time limit in embedded mode ---


def test_local_runner_time_limit_fails_the_job(tmp_path: Path) -> None:
    """A job past ``job_time_limit_s`` ends failed ``time_limit`` (not retryable) in the local runner:
    the child stops itself at the soft limit (10 s before the hard one) at its next training step, not
    killed. Which mechanism ended it is asserted, never how long it took (a loaded machine is slower):
    the child exited by itself (``EXIT_DONE``; a kill at the hard limit leaves -9) and the row holds the
    soft limit's message, not the hard limit's ("... (20 s)") that the parent writes after a kill."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    db.migrate(url)
    settings = Settings(
        state_dir=tmp_path / "state", database_url=url, redis_url=None, job_time_limit_s=20, heartbeat_s=0.5
    )
    engine = db.make_engine(url)
    long = SPEC | {"schedule": {"epochs": 500, "batch_size": 16}}
    with db.session_scope(engine) as s:
        job_id = repo.create_job(s, "alice", long, "magnitude")[0].id
    runner = LocalRunner(settings)
    code = runner.run_child(job_id, threading.Event())
    with db.session_scope(engine) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.error_code, job.retryable) == ("failed", "time_limit", False)
        assert job.error_message == TIME_LIMIT_MESSAGE, job.error_message  # the soft limit's record
    assert code == EXIT_DONE, code  # the child stopped itself: the soft limit did it, not the kill
    runner.engine.dispose()
    engine.dispose()


@pytest.mark.parametrize(("hard", "soft"), [(20, 10), (600, 570), (3600, 3420), (24 * 3600, 24 * 3600 - 300)])
def test_the_soft_limit_leaves_the_job_time_to_record_its_failure(hard: int, soft: int) -> None:
    """One soft limit for Celery and the local runner: 5 % below the hard limit, at least 10 s (a step and
    the failure's record took longer than 5 s on a loaded machine), at most 5 min."""
    assert Settings(job_time_limit_s=hard).job_soft_time_limit_s == soft


def test_the_soft_limit_only_raises_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soft limit's signal handler sets ``TIME_UP`` and raises nothing: an exception from a signal
    handler that lands in Python code called from C++ (torch's import, autograd hooks) makes pybind11
    abort the child, and the row stays ``running`` (seen: "terminate called after throwing an instance
    of 'pybind11::error_already_set'" while the child imported torch)."""
    from worker import reporter

    event = threading.Event()
    monkeypatch.setattr(reporter, "TIME_UP", event)
    reporter.on_soft_time_limit(signal.SIGALRM, None)
    assert event.is_set()


def test_local_runner_hard_limit_records_the_failure(tmp_path: Path) -> None:
    """What the parent writes after killing a child at the hard limit."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    db.migrate(url)
    settings = Settings(state_dir=tmp_path / "state", database_url=url, redis_url=None, job_time_limit_s=1)
    runner = LocalRunner(settings)
    with db.session_scope(runner.engine) as s:
        mine, other = (repo.create_job(s, "alice", SPEC, "magnitude")[0].id for _ in range(2))
        repo.claim_job(s, mine, runner.worker_name, 60)
        repo.claim_job(s, other, "someone-else", 60)
    runner._fail_time_limit(mine)
    runner._fail_time_limit(other)  # not this runner's attempt: left alone
    with db.session_scope(runner.engine) as s:
        assert (s.get(Job, mine).status, s.get(Job, mine).error_code) == ("failed", "time_limit")
        assert s.get(Job, other).status == "running"
    runner.engine.dispose()


def test_sdk_and_cli_list_and_delete_uploads(env_factory, monkeypatch, capsys) -> None:
    """The SDK and `prune uploads` against the real app (the TestClient's transport)."""
    import functools

    from pruning_client import cli
    from pruning_client.sdk import ApiError, Client

    env = env_factory()
    key = env.a["Authorization"].removeprefix("Bearer ")
    client = functools.partial(Client, transport=env.client._transport)
    with client("http://testserver", api_key=key) as sdk:
        ids = [
            env.client.post(
                "/v1/uploads?kind=weights", content=safetensors_bytes(key=k), headers=env.a
            ).json()["id"]
            for k in "abc"
        ]
        assert [u.id for u in sdk.uploads(limit=2)] == ids[::-1]  # follows the cursor
        sdk.delete_upload(f"upload:{ids[0]}")
        with pytest.raises(ApiError) as err:
            sdk.delete_upload(ids[0])
        assert err.value.status == 404
    monkeypatch.setattr(cli, "Client", client)
    base = ["--url", "http://testserver", "--api-key", key]
    assert cli.main([*base, "uploads"]) == 0
    out = capsys.readouterr().out
    assert f"upload:{ids[2]}" in out and f"upload:{ids[0]}" not in out
    assert cli.main([*base, "uploads", "delete", ids[1]]) == 0
    assert capsys.readouterr().out == f"deleted {ids[1]}\n"
    assert cli.main([*base, "uploads", "--json"]) == 0
    assert [u["id"] for u in json.loads(capsys.readouterr().out)] == [ids[2]]


@pytest.mark.slow
def test_celery_worker_runs_another_owners_first_job_second(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """End to end on the Celery path: alice submits 4 jobs through the API, then bob 1; one real
    worker, started afterwards, runs bob's right after alice's first."""
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env_ = Env(tmp_path, pg_url, redis_url=redis_url, rate_burst=1000, heartbeat_s=0.5).__enter__()
    tiny = SPEC | {"export": {"formats": ["safetensors"]}}
    a_jobs = [env_.client.post("/v1/jobs", json=tiny, headers=env_.a).json()["id"] for _ in range(4)]
    b_job = env_.client.post("/v1/jobs", json=tiny, headers=env_.b).json()["id"]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "STATE_DIR")}
    env |= {
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "STATE_DIR": str(tmp_path / "state"),
        "HEARTBEAT_S": "0.5",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(root),
    }
    celery = Path(sys.executable).with_name("celery")
    log = tmp_path / "worker.log"
    args = [str(celery), "-A", "worker.celery_app", "worker", "-n", "fair@%h", "--without-gossip"]
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [*args, "--without-mingle", "--without-heartbeat"],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with db.session_scope(env_.engine) as s:
                jobs = [s.get(Job, j, populate_existing=True) for j in [*a_jobs, b_job]]
                if all(j.status in ("succeeded", "failed", "cancelled") for j in jobs):
                    break
            time.sleep(1)
        else:
            raise AssertionError(f"jobs not done in 300 s:\n{log.read_text()[-3000:]}")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        env_.__exit__(None, None, None)
    assert [j.status for j in jobs] == ["succeeded"] * 5, [(j.status, j.error_message) for j in jobs]
    started = [j.id for j in sorted(jobs, key=lambda j: j.started_at)]
    assert started == [a_jobs[0], b_job, *a_jobs[1:]], started
