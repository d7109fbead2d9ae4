"""Faults with real processes, real Redis and PostgreSQL: a job's process killed, its worker killed, a
duplicate delivery, Redis restarted empty, PostgreSQL restarted mid-job, the API killed between commit
and enqueue, a job that always kills its worker. Every test asserts the invariant (``check_job``): one
terminal state, at most ``max_attempts`` attempts, one set of artifacts, events numbered without gaps.

The default suite runs each fault once against the embedded local runner or ``execute`` itself (fast);
the ``slow`` ones run them against real Celery workers on a private Redis and PostgreSQL."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine

from pruning_core.settings import Settings
from store import repo
from store.db import make_engine, migrate, session_scope
from tests.faultkit import (
    PostgresServer,
    Procs,
    RedisServer,
    check_job,
    done,
    events,
    get,
    kill_children,
    service_env,
    submit,
    wait_for,
)
from tests.faultkit import celery_stack as start_celery_stack
from worker.celery_app import QUEUE, enqueuer, make_app
from worker.execute import execute
from worker.reaper import BrokerMarker, reap_once, run_forever


def spec(epochs: int = 1, steps: int = 5) -> dict[str, Any]:
    return {
        "model": {"name": "resnet20"},
        "data": {"name": "digits"},
        "target": {"macs_ratio": 0.5},
        "schedule": {"epochs": epochs, "batch_size": 64, "max_steps_per_epoch": steps},
        "export": {"formats": ["safetensors"]},
    }


def epochs_seen(engine: Engine, job_id: str) -> list[int]:
    return [d["epoch"] for _, k, d in events(engine, job_id) if k == "epoch"]


def texts(engine: Engine, job_id: str) -> list[str]:
    return [d["text"] for _, k, d in events(engine, job_id) if k == "message"]


def running_attempt(engine: Engine, job_id: str, attempt: int) -> bool:
    job = get(engine, job_id)
    return job.status == "running" and job.attempt == attempt


def queued_task_ids(url: str) -> list[str]:
    """The task ids of the messages waiting in the broker's queue (kombu's Redis list, JSON)."""
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(m)["headers"]["id"] for m in client.lrange(QUEUE, 0, -1)]
    finally:
        client.close()


def _fail_with_logs(procs: Procs):
    class Ctx:
        def __enter__(self) -> None:
            return None

        def __exit__(self, typ, err, _tb) -> bool:  # noqa: ANN001
            if typ is not None and issubclass(typ, AssertionError):
                raise AssertionError(f"{err}\n{procs.logs()}") from None
            return False

    return Ctx()


# --- the embedded local runner (SQLite): a job's process killed, a job that always kills it ---


@pytest.fixture
def sqlite_db(sqlite_url: str) -> str:
    migrate(sqlite_url)
    return sqlite_url


def _kill_mid_job_and_see_it_resume(
    procs: Procs, engine: Engine, job_id: str, parent_pid: int, epochs: int, settings: Settings, what: str
) -> None:
    """After two epochs, SIGKILL the children of ``parent_pid`` (the process running the job); the
    job must be handed on well within the 60 s lease, resume from its checkpoint and succeed on attempt
    2, with at most the epoch in flight run twice."""
    with _fail_with_logs(procs):
        wait_for(lambda: len(epochs_seen(engine, job_id)) >= 2, 90, "two epochs", every=0.05)
        assert kill_children(parent_pid), what
        t0 = time.monotonic()
        wait_for(lambda: running_attempt(engine, job_id, 2), 30, "the second attempt", every=0.05)
        handed_on_s = time.monotonic() - t0
        job = wait_for(lambda: done(engine, job_id), 120, "the resumed job")
    print(f"handed on after {handed_on_s:.1f} s")
    assert handed_on_s < 20, f"handed on after {handed_on_s:.1f} s; the lease is 60 s"
    assert (job.status, job.attempt) == ("succeeded", 2)
    check_job(engine, job_id, settings.artifacts_dir)
    assert "resuming from the checkpoints of attempt 1" in texts(engine, job_id)
    seen = epochs_seen(engine, job_id)
    assert seen[-1] == epochs and len(seen) <= epochs + 1, seen


def test_killed_job_process_resumes_from_its_checkpoint(sqlite_db: str, tmp_path: Path, procs: Procs) -> None:
    """SIGKILL the process running a job: its runner hands the job on at once (not after the lease), the
    next attempt resumes from the last checkpoint, and only that attempt's artifacts remain."""
    procs.env = service_env(tmp_path, DATABASE_URL=sqlite_db, LEASE_S="60")
    settings = Settings(database_url=sqlite_db, state_dir=tmp_path / "state")
    engine = make_engine(sqlite_db)
    job_id = submit(engine, spec(epochs=8))
    runner = procs.start("local", sys.executable, "-m", "worker.local")
    _kill_mid_job_and_see_it_resume(procs, engine, job_id, runner.pid, 8, settings, "the job's process")
    engine.dispose()


def test_job_that_always_kills_its_process_fails_worker_lost(
    sqlite_db: str, tmp_path: Path, procs: Procs
) -> None:
    procs.env = service_env(tmp_path, DATABASE_URL=sqlite_db, LEASE_S="60")
    settings = Settings(database_url=sqlite_db, state_dir=tmp_path / "state")
    engine = make_engine(sqlite_db)
    job_id = submit(engine, spec(epochs=50), max_attempts=3)
    runner = procs.start("local", sys.executable, "-m", "worker.local")
    with _fail_with_logs(procs):
        for attempt in (1, 2, 3):  # the job "crashes" its process as soon as it runs
            wait_for(lambda a=attempt: running_attempt(engine, job_id, a), 60, f"attempt {attempt}", 0.05)
            assert kill_children(runner.pid)
        job = wait_for(lambda: done(engine, job_id), 30, "the job to fail")
    assert (job.status, job.error_code, job.attempt, job.retryable) == ("failed", "worker_lost", 3, True)
    check_job(engine, job_id, settings.artifacts_dir)
    time.sleep(1.5)  # the runner polls again: nothing more is claimed
    assert get(engine, job_id).attempt == 3
    engine.dispose()


# --- execute() itself: a duplicate delivery ---


def test_duplicate_delivery_is_a_noop(sqlite_db: str, tmp_path: Path) -> None:
    """Three deliveries of one job, two of them while it runs: one attempt, one set of artifacts."""
    settings = Settings(database_url=sqlite_db, state_dir=tmp_path / "state", lease_s=60, heartbeat_s=0.2)
    engine = make_engine(sqlite_db)
    job_id = submit(engine, spec(epochs=2))
    results: list[str | None] = []
    first = threading.Thread(
        target=lambda: results.append(execute(job_id, worker_name="a", settings=settings))
    )
    first.start()
    wait_for(lambda: running_attempt(engine, job_id, 1), 30, "the claim", every=0.02)
    n = len(events(engine, job_id))
    assert execute(job_id, worker_name="b", settings=settings) is None
    assert execute(job_id, worker_name="a", settings=settings) is None  # even on the same worker
    assert len(events(engine, job_id)) >= n and get(engine, job_id).worker == "a"
    first.join(120)
    assert results == ["succeeded"]
    assert execute(job_id, worker_name="c", settings=settings) is None  # after it finished
    job = check_job(engine, job_id, settings.artifacts_dir)
    assert (job.attempt, job.worker) == (1, "a")
    engine.dispose()


# --- PostgreSQL restarted mid-job ---


def test_postgres_outage_at_the_finish_is_waited_out(
    private_pg: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL stops the moment training ends and comes back 3 s later: the final write (artifacts
    and ``succeeded``, one transaction) is retried, and the same attempt succeeds."""
    from pruning_core.jobs import runner

    url = private_pg.url
    migrate(url)
    settings = Settings(database_url=url, state_dir=tmp_path / "state", lease_s=60, heartbeat_s=0.2)
    engine = make_engine(url)
    job_id = submit(engine, spec())
    real_run = runner.run
    stopped_at: list[float] = []

    def run_then_lose_the_database(*args: Any, **kwargs: Any) -> Any:
        result = real_run(*args, **kwargs)
        private_pg.stop()
        stopped_at.append(time.monotonic())
        threading.Timer(3.0, private_pg.start).start()
        return result

    monkeypatch.setattr(runner, "run", run_then_lose_the_database)
    assert execute(job_id, worker_name="w", settings=settings) == "succeeded"
    assert time.monotonic() - stopped_at[0] >= 3.0, "the finish waited for the database"
    job = check_job(engine, job_id, settings.artifacts_dir)
    assert job.attempt == 1
    engine.dispose()


@pytest.mark.slow
def test_postgres_restart_mid_job_the_worker_retries_its_writes(
    private_pg: PostgresServer, tmp_path: Path, procs: Procs
) -> None:
    """PostgreSQL goes away for a few seconds while a job trains (heartbeats, progress and events fail),
    comes back, and the same attempt finishes: nothing requeued, no event lost to a gap."""
    url = private_pg.url
    migrate(url)
    procs.env = service_env(tmp_path, DATABASE_URL=url, LEASE_S="60", DB_RETRY_S="60")
    settings = Settings(database_url=url, state_dir=tmp_path / "state")
    engine = make_engine(url)
    job_id = submit(engine, spec(epochs=10))
    runner = procs.start("local", sys.executable, "-m", "worker.local")
    with _fail_with_logs(procs):
        wait_for(lambda: len(epochs_seen(engine, job_id)) >= 1, 90, "the first epoch", every=0.05)
        engine.dispose()
        private_pg.stop()
        time.sleep(3)  # several heartbeats and epochs fall in the outage
        private_pg.start()
        job = wait_for(lambda: done(engine, job_id), 120, "the job")
        assert (job.status, job.attempt) == ("succeeded", 1), job.error_message
    check_job(engine, job_id, settings.artifacts_dir)
    assert epochs_seen(engine, job_id) == list(range(1, 11)), "every epoch event written, once"
    log = runner.log_path.read_text()  # type: ignore[attr-defined]
    assert "database unavailable" in log, "the outage was seen (and waited out) by the job"
    engine.dispose()


# --- Redis restarted empty; the API killed between commit and enqueue ---


def test_redis_restart_reenqueues_queued_jobs_from_the_database(
    private_redis: RedisServer, sqlite_db: str, tmp_path: Path
) -> None:
    """Queued jobs' messages vanish with a Redis restarted with nothing on disk: the reaper notices
    (its marker key is gone) and enqueues every queued job again, once; the jobs then run."""
    settings = Settings(
        database_url=sqlite_db, redis_url=private_redis.url, state_dir=tmp_path / "state", lease_s=4
    )
    engine = make_engine(sqlite_db)
    app = make_app(settings)
    enqueue = enqueuer(app)
    jobs = [submit(engine, spec()) for _ in range(2)]
    for j in jobs:
        enqueue(j)
        with session_scope(engine) as s:
            repo.mark_enqueued(s, j)
    stop = threading.Event()
    marker = BrokerMarker(private_redis.url)
    reaper = threading.Thread(target=run_forever, args=(engine, enqueue, settings, stop, marker), daemon=True)
    try:
        assert sorted(queued_task_ids(private_redis.url)) == sorted(jobs)
        reaper.start()  # its first pass sets the marker (and re-sends both: harmless duplicates)
        wait_for(lambda: len(queued_task_ids(private_redis.url)) == 4, 10, "the first pass", every=0.1)
        private_redis.restart()
        assert queued_task_ids(private_redis.url) == []
        wait_for(lambda: queued_task_ids(private_redis.url), 15, "the re-enqueue", every=0.1)
        time.sleep(2.5)  # two more passes: nothing sent twice
        assert sorted(queued_task_ids(private_redis.url)) == sorted(jobs)
    finally:
        stop.set()
        reaper.join(10)
        marker.close()
        app.close()
    for j in jobs:  # what a worker does with the messages
        assert execute(j, worker_name="w", settings=settings) == "succeeded"
        check_job(engine, j, settings.artifacts_dir)
    engine.dispose()


API_KILLED_AT_ENQUEUE = (
    "import os, signal, api.queue as q\n"
    "q.enqueue = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
    "from api.__main__ import main\n"
    "raise SystemExit(main())\n"
)


def test_api_killed_between_commit_and_enqueue_the_job_still_runs(
    private_redis: RedisServer, sqlite_db: str, tmp_path: Path, procs: Procs
) -> None:
    """The API dies after committing a job and before the broker heard of it: the reaper (a real
    process) sends it; the job runs."""
    import httpx

    from tests.faultkit import free_port

    key, port = "pk_faults_bootstrap_key", free_port()
    procs.env = service_env(
        tmp_path,
        DATABASE_URL=sqlite_db,
        REDIS_URL=private_redis.url,
        BOOTSTRAP_API_KEY=key,
        PORT=str(port),
        LEASE_S="4",
        UNQUEUED_AFTER_S="1",
    )
    settings = Settings(database_url=sqlite_db, redis_url=private_redis.url, state_dir=tmp_path / "state")
    engine = make_engine(sqlite_db)
    api = procs.start("api", sys.executable, "-c", API_KILLED_AT_ENQUEUE)
    base = f"http://127.0.0.1:{port}"
    with _fail_with_logs(procs):
        wait_for(lambda: _ready(base), 60, "the API")
        with pytest.raises(httpx.HTTPError):  # the connection dies with the process
            httpx.post(f"{base}/v1/jobs", json=spec(), headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert api.wait(timeout=10) == -9
        with session_scope(engine) as s:
            (job,) = repo.list_jobs(s, "admin")[0]
        assert (job.status, job.enqueued_at) == ("queued", None)
        assert queued_task_ids(private_redis.url) == []
        procs.start("reaper", sys.executable, "-m", "worker.reaper")
        wait_for(lambda: queued_task_ids(private_redis.url) == [job.id], 20, "the reaper's enqueue")
        # The reaper sends first and marks the row after (a failed send leaves it stale for the next
        # pass), so the mark may trail the message by a moment: wait for it rather than race it.
        wait_for(lambda: get(engine, job.id).enqueued_at is not None, 20, "the reaper's mark")
    assert execute(job.id, worker_name="w", settings=settings) == "succeeded"
    check_job(engine, job.id, settings.artifacts_dir)
    engine.dispose()


def _ready(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_reaper_cleans_up_the_files_of_a_job_it_fails(sqlite_db: str, tmp_path: Path) -> None:
    """A job that ran out of attempts: its checkpoints and attempt directories go with it."""
    from datetime import timedelta

    from sqlalchemy import update

    from store.models import Job, utcnow

    settings = Settings(database_url=sqlite_db, state_dir=tmp_path / "state", lease_s=30)
    engine = make_engine(sqlite_db)
    job_id = submit(engine, spec(), max_attempts=1)
    with session_scope(engine) as s:
        repo.claim_job(s, job_id, "gone", lease_s=30)
        s.execute(update(Job).values(lease_until=utcnow() - timedelta(seconds=1)))
    ckpt = settings.artifacts_dir / job_id / "attempt-1" / "checkpoints" / "finetune.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x" * 1000)
    assert reap_once(engine, lambda _j: None, settings)["failed"] == 1
    check_job(engine, job_id, settings.artifacts_dir)  # no directory left
    engine.dispose()


# --- real Celery workers on a private Redis and PostgreSQL (slow) ---


@pytest.fixture
def celery_stack(pg_url: str, private_redis: RedisServer, tmp_path: Path, procs: Procs):
    """On a private Redis (a test may kill it); workers with a 60 s lease (``faultkit.celery_stack``)."""
    env = {"LEASE_S": "60", "UNQUEUED_AFTER_S": "1"}
    with start_celery_stack(pg_url, private_redis.url, tmp_path, procs, env) as stack:
        yield stack


@pytest.mark.slow
def test_celery_child_killed_resumes_at_once(celery_stack, procs: Procs) -> None:
    """SIGKILL the pool child running a job: the worker's parent gives the attempt back before Celery
    redelivers the message, so the job resumes from its checkpoint at once (the lease is 60 s)."""
    settings, engine, send, _ = celery_stack
    worker = procs.celery_worker("w1")
    job_id = send(spec(epochs=12))
    _kill_mid_job_and_see_it_resume(procs, engine, job_id, worker.pid, 12, settings, "the pool child")


@pytest.mark.slow
def test_celery_job_that_always_crashes_fails_worker_lost(celery_stack, procs: Procs) -> None:
    settings, engine, send, _ = celery_stack
    procs.celery_worker("crashy", app="tests.crashing_app")
    job_id = send(spec(epochs=3), max_attempts=3)
    with _fail_with_logs(procs):
        job = wait_for(lambda: done(engine, job_id), 120, "the job to fail")
    assert (job.status, job.error_code, job.attempt) == ("failed", "worker_lost", 3)
    check_job(engine, job_id, settings.artifacts_dir)


@pytest.mark.slow
def test_celery_worker_killed_the_reaper_hands_the_job_on_within_the_lease(
    celery_stack, procs: Procs, tmp_path: Path
) -> None:
    """The whole worker dies (parent and child): nobody saw it, so the reaper (a real process) hands the
    job on once the lease lapses; a second worker resumes it; a duplicate message changes nothing."""
    settings, engine, send, enqueue = celery_stack
    procs.env |= {"LEASE_S": "6"}
    w1 = procs.celery_worker("w1")
    job_id = send(spec(epochs=12))
    with _fail_with_logs(procs):
        wait_for(lambda: len(epochs_seen(engine, job_id)) >= 2, 90, "two epochs", every=0.05)
        procs.kill(w1)
        t0 = time.monotonic()
        procs.start("reaper", sys.executable, "-m", "worker.reaper")
        procs.celery_worker("w2")
        wait_for(lambda: running_attempt(engine, job_id, 2), 60, "the second attempt", every=0.1)
        handed_on_s = time.monotonic() - t0
        for _ in range(2):
            enqueue(job_id)  # forced duplicate deliveries while attempt 2 runs
        job = wait_for(lambda: done(engine, job_id), 120, "the resumed job")
    print(f"handed on after {handed_on_s:.1f} s")
    # lease 6 s + a reaper pass (every 1.5 s) + the second worker's start and claim
    assert handed_on_s < 6 + 1.5 + 15, handed_on_s
    assert (job.status, job.attempt) == ("succeeded", 2)
    check_job(engine, job_id, settings.artifacts_dir)
    assert "resuming from the checkpoints of attempt 1" in texts(engine, job_id)


@pytest.mark.slow
def test_celery_redis_restart_and_api_crash_every_job_runs(
    celery_stack, private_redis: RedisServer, procs: Procs
) -> None:
    """Redis restarts empty while one job runs and two wait, and a fourth job was committed but never
    enqueued (the API died): the reaper enqueues what the database says is queued; all four succeed."""
    settings, engine, send, _ = celery_stack
    procs.celery_worker("w1")
    procs.start("reaper", sys.executable, "-m", "worker.reaper")
    running = send(spec(epochs=8))
    waiting = [send(spec()) for _ in range(2)]
    with _fail_with_logs(procs):
        wait_for(lambda: len(epochs_seen(engine, running)) >= 1, 90, "the first job to train", every=0.05)
        private_redis.restart()
        never_sent = submit(engine, spec())  # committed; the API died before the enqueue
        jobs = [running, *waiting, never_sent]
        wait_for(lambda: all(done(engine, j) for j in jobs), 240, "all four jobs", every=0.5)
    for j in jobs:
        job = check_job(engine, j, settings.artifacts_dir)
        assert (job.status, job.attempt) == ("succeeded", 1), (j, job.status, job.error_message)


# --- a file changed on disk behind its record ---


def test_artifact_whose_size_changed_on_disk_is_a_clear_problem(sqlite_db: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.files import attempt_dir, sha256_file

    settings = Settings(database_url=sqlite_db, state_dir=tmp_path / "state", bootstrap_api_key="k" * 20)
    engine = make_engine(sqlite_db)
    job_id = submit(engine, spec())
    path = attempt_dir(settings.artifacts_dir, job_id, 1) / "model.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 100)
    with session_scope(engine) as s:
        _, key = repo.create_api_key(s, "alice")
        repo.claim_job(s, job_id, "w", lease_s=60)
        repo.finish_job(s, job_id, 1, "succeeded")
        rel = f"{job_id}/attempt-1/model.safetensors"
        repo.add_artifact(s, job_id, 1, "model.safetensors", rel, 100, sha256_file(path), "x")
    path.write_bytes(b"x" * 99)  # truncated behind the record's back
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.get(
            f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers={"Authorization": f"Bearer {key}"}
        )
    assert r.status_code == 410 and r.headers["content-type"].startswith("application/problem+json"), r.text
    assert "no longer matches its record" in r.json()["detail"]
    engine.dispose()


def test_sweep_cleans_ended_jobs_and_leaves_running_ones(sqlite_db: str, tmp_path: Path) -> None:
    """The reaper's sweep: ended jobs keep only their artifacts; a running job's checkpoints stay."""
    from store.files import sha256_file
    from worker.cleanup import sweep

    settings = Settings(database_url=sqlite_db, state_dir=tmp_path / "state")
    root = settings.artifacts_dir
    engine = make_engine(sqlite_db)
    ok, cancelled, running = (submit(engine, spec()) for _ in range(3))
    for job_id in (ok, cancelled, running):
        for attempt in (1, 2):
            ckpt = root / job_id / f"attempt-{attempt}" / "checkpoints" / "finetune.pt"
            ckpt.parent.mkdir(parents=True)
            ckpt.write_bytes(b"c")
    model = root / ok / "attempt-1" / "model.safetensors"
    model.write_bytes(b"m")
    with session_scope(engine) as s:
        for job_id in (ok, running):
            repo.claim_job(s, job_id, "w", lease_s=60)
        repo.finish_job(s, ok, 1, "succeeded")
        repo.add_artifact(
            s, ok, 1, "model.safetensors", f"{ok}/attempt-1/model.safetensors", 1, sha256_file(model), "x"
        )
        repo.request_cancel(s, cancelled)
    assert sweep(engine, root) == 4  # four checkpoints, and nothing of the running job
    check_job(engine, ok, root)
    check_job(engine, cancelled, root)
    assert len(list((root / running).rglob("*.pt"))) == 2
    assert sweep(engine, root) == 0
    engine.dispose()


def test_polls_and_reaper_scans_do_not_wait_for_sqlites_write_lock(sqlite_db: str, tmp_path: Path) -> None:
    """While another process holds SQLite's write lock (a long write), the local runner's poll, the
    reaper's scan and the sweep still answer at once: they only read."""
    import sqlite3

    from worker.cleanup import sweep
    from worker.local import next_queued

    settings = Settings(database_url=sqlite_db, state_dir=tmp_path / "state")
    engine = make_engine(sqlite_db, wait_s=2)
    job_id = submit(engine, spec())
    (settings.artifacts_dir / job_id).mkdir(parents=True)
    holder = sqlite3.connect(sqlite_db.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:  # the lock is held throughout: a read that waited for it would raise "database is locked"
        assert next_queued(engine) == job_id
        assert not any(reap_once(engine, lambda _j: None, settings).values())
        assert sweep(engine, settings.artifacts_dir) == 0
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()
