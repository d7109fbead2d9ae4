"""store/: migrations (round trip, no drift), repository semantics under concurrency on the real
PostgreSQL, the SQLite embedded mode, API keys, artifact paths and the ``python -m store`` CLI."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from store import repo
from store.cli import main as store_cli
from store.db import current_revision, downgrade, head_revision, make_engine, migrate, session_scope
from store.files import attempt_dir, relative_to_root, resolve_under
from store.models import Base, Job, JobEvent, JobStatus

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"jobs", "job_events", "artifacts", "uploads", "api_keys"}
SPEC: dict[str, Any] = {
    "model": {"name": "resnet20"},
    "data": {"name": "digits"},
    "target": {"macs_ratio": 0.5},
}


def _engine(url: str) -> Iterator[Engine]:
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg(pg_url: str) -> Iterator[Engine]:
    yield from _engine(pg_url)


@pytest.fixture
def lite(sqlite_url: str) -> Iterator[Engine]:
    yield from _engine(sqlite_url)


def _new_job(engine: Engine, owner: str = "alice", **kw: Any) -> str:
    with session_scope(engine) as s:
        job, created = repo.create_job(s, owner, SPEC, "magnitude", **kw)
        assert created
        return job.id


def _threads(*fns: Callable[[], Any]) -> list[Any]:
    """Run the callables in threads started together; their results (or raised exceptions) in order."""
    results: list[Any] = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as err:  # reported to the test
            results[i] = err

    ts = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return results


# --- migrations ---


@pytest.mark.parametrize("db", ["pg_url", "sqlite_url"])
def test_migration_round_trip(db: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(db)

    def tables() -> set[str]:
        engine = make_engine(url)
        try:
            return set(inspect(engine).get_table_names())
        finally:
            engine.dispose()

    migrate(url)
    assert tables() >= TABLES and current_revision(url) == head_revision()
    downgrade(url, "base")
    assert tables() & TABLES == set() and current_revision(url) is None
    migrate(url)
    assert tables() >= TABLES and current_revision(url) == head_revision()
    migrate(url)  # idempotent


@pytest.mark.parametrize("db", ["pg_url", "sqlite_url"])
def test_migration_0004_merges_duplicate_uploads(db: str, request: pytest.FixtureRequest) -> None:
    """Uploads of the same bytes by one owner made before the unique index: the oldest is kept, a job
    naming a duplicate is pointed at it, the duplicates go; another owner's or kind's copy stays."""
    url = request.getfixturevalue(db)
    migrate(url, "0003")
    engine = make_engine(url)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [("alice", "weights", t0), ("alice", "weights", t0 + timedelta(1)), ("bob", "weights", t0)]
    rows += [("alice", "dataset", t0)]
    try:
        with session_scope(engine) as s:
            ids = []
            for owner, kind, at in rows:
                up = repo.add_upload(s, owner, kind, "f", f"{owner}/{at:%s}", 1, "a" * 64, "x/y")
                up.created_at = at
                s.flush()
                ids.append(up.id)
            # a Core insert names only the columns given or defaulted, all of which schema 0003 has
            # (the ORM would name every column of today's Job, e.g. sweep_id)
            job_id = "f" * 32
            spec = {"model": {"name": "resnet20", "weights": f"upload:{ids[1]}"}}
            s.execute(Job.__table__.insert().values(id=job_id, owner="alice", spec=spec, method="m"))
        migrate(url)
        with session_scope(engine) as s:
            assert repo.get_upload(s, ids[1]) is None
            assert all(repo.get_upload(s, i) is not None for i in (ids[0], ids[2], ids[3]))
            assert s.get(Job, job_id).spec["model"] == {"name": "resnet20", "weights": f"upload:{ids[0]}"}
        with pytest.raises(IntegrityError), session_scope(engine) as s:
            repo.add_upload(s, "alice", "weights", "f", "again", 1, "a" * 64, "x/y")
    finally:
        engine.dispose()


@pytest.mark.parametrize("db", ["pg", "lite"])
def test_migrations_match_the_models(db: str, request: pytest.FixtureRequest) -> None:
    engine: Engine = request.getfixturevalue(db)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_concurrent_migrations_on_postgres(pg_url: str) -> None:
    """An API and a worker starting together both migrate: the advisory lock serialises them.
    (Processes, not threads: Alembic's ``context`` proxy is process-global.)"""
    code = f"from store.db import migrate; migrate({pg_url!r})"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(60) == 0, proc.stderr.read()
    assert current_revision(pg_url) == head_revision()


# --- jobs: idempotency, ownership ---


def test_idempotency(pg: Engine) -> None:
    with session_scope(pg) as s:
        a, created_a = repo.create_job(s, "alice", SPEC, "magnitude", idempotency_key="k1")
        b, created_b = repo.create_job(s, "alice", dict(SPEC), "magnitude", idempotency_key="k1")
        assert created_a and not created_b and a.id == b.id
        with pytest.raises(ValueError, match="different"):
            repo.create_job(
                s, "alice", {**SPEC, "target": {"macs_ratio": 0.3}}, "magnitude", idempotency_key="k1"
            )
        other, created = repo.create_job(s, "bob", SPEC, "magnitude", idempotency_key="k1")  # per owner
        assert created and other.id != a.id
        no_key = [repo.create_job(s, "alice", SPEC, "magnitude")[0].id for _ in range(2)]
        assert len(set(no_key)) == 2
        assert repo.get_job(s, a.id, owner="alice") is not None
        assert repo.get_job(s, a.id, owner="bob") is None
        assert repo.get_job(s, "0" * 32) is None
        assert [e.kind for e in repo.events_after(s, a.id)] == ["status"]
    with session_scope(pg) as s:
        assert s.scalar(select(text("count(*)")).select_from(Job)) == 4


def test_idempotency_race_yields_one_row(pg: Engine) -> None:
    """Session A inserts and holds its transaction open; B, racing with the same key, blocks on the
    unique index, gets the IntegrityError inside its SAVEPOINT, and returns A's job."""
    a_inserted, results = threading.Event(), {}

    def a() -> None:
        with session_scope(pg) as s:
            job, created = repo.create_job(s, "alice", SPEC, "magnitude", idempotency_key="race")
            results["a"] = (job.id, created)
            a_inserted.set()
            time.sleep(0.3)

    def b() -> None:
        a_inserted.wait(10)
        with session_scope(pg) as s:
            job, created = repo.create_job(s, "alice", SPEC, "magnitude", idempotency_key="race")
            results["b"] = (job.id, created)

    assert _threads(a, b) == [None, None]
    assert results["a"][1] is True and results["b"] == (results["a"][0], False)
    # and a free-for-all of four sessions
    out = _threads(*[lambda: _create_id(pg, "ffa") for _ in range(4)])
    assert len(set(out)) == 1 and all(isinstance(x, str) for x in out)
    with session_scope(pg) as s:
        keys = s.scalars(select(Job.idempotency_key).where(Job.idempotency_key.is_not(None))).all()
        assert sorted(keys) == ["ffa", "race"]


def _create_id(engine: Engine, key: str) -> str:
    with session_scope(engine) as s:
        return repo.create_job(s, "alice", SPEC, "magnitude", idempotency_key=key)[0].id


# --- jobs: claim, heartbeat, finish, cancel ---


def _claim(engine: Engine, job_id: str, worker: str, lease_s: float = 60) -> int | None:
    with session_scope(engine) as s:
        job = repo.claim_job(s, job_id, worker, lease_s)
        return job.attempt if job else None


def test_claim_is_compare_and_set(pg: Engine) -> None:
    for _ in range(3):
        job_id = _new_job(pg)
        results = _threads(*[lambda w=w, j=job_id: _claim(pg, j, w) for w in ("w1", "w2")])
        assert sorted(results, key=str) == [1, None]
    # deterministic: A's claim is uncommitted when B tries; B waits on the row lock and then finds it taken
    job_id, held, results = _new_job(pg), threading.Event(), {}

    def a() -> None:
        with session_scope(pg) as s:
            results["a"] = repo.claim_job(s, job_id, "w1", 60) is not None
            held.set()
            time.sleep(0.3)

    def b() -> None:
        held.wait(10)
        results["b"] = _claim(pg, job_id, "w2")

    _threads(a, b)
    assert results == {"a": True, "b": None}


def test_lease_heartbeat_finish(pg: Engine) -> None:
    job_id = _new_job(pg)
    assert _claim(pg, job_id, "w1", lease_s=-1) == 1  # the lease is already over
    assert _claim(pg, job_id, "w2") == 2  # reclaimed: attempt + 1
    assert _claim(pg, job_id, "w3") is None  # w2 holds a live lease
    with session_scope(pg) as s:
        job = repo.get_job(s, job_id)
        assert (job.status, job.worker, job.attempt) == ("running", "w2", 2)
        assert repo.heartbeat(s, job_id, 1, 60) == (False, False)  # the stale attempt learns it lost
        assert repo.heartbeat(s, job_id, 2, 60, progress=0.4, phase="prune") == (True, False)
        assert repo.request_cancel(s, job_id).status == "running"
        assert repo.heartbeat(s, job_id, 2, 60) == (True, True)  # the cancel flag travels back
        assert repo.heartbeat(s, job_id, 1, 60) == (False, False)
        assert not repo.finish_job(s, job_id, 1, JobStatus.SUCCEEDED)  # not our attempt
        job = repo.get_job(s, job_id)
        assert (job.progress, job.phase, job.status) == (0.4, "prune", "running")
        assert job.lease_until > datetime.now(UTC) + timedelta(seconds=50)
        assert repo.finish_job(s, job_id, 2, JobStatus.CANCELLED)
        assert not repo.finish_job(s, job_id, 2, JobStatus.SUCCEEDED)  # only once
        assert repo.heartbeat(s, job_id, 2, 60) == (False, False)  # finished: no longer anyone's
        statuses = [e.data["status"] for e in repo.events_after(s, job_id) if e.kind == "status"]
        assert statuses == ["queued", "running", "running", "cancelled"]

    ok = _new_job(pg)
    assert _claim(pg, ok, "w1") == 1
    with session_scope(pg) as s:
        result = {"achieved_macs_ratio": 0.49}
        assert repo.finish_job(s, ok, 1, JobStatus.SUCCEEDED, result=result)
        job = repo.get_job(s, ok)
        assert (job.status, job.progress, job.result, job.lease_until) == ("succeeded", 1.0, result, None)
        assert job.finished_at is not None and job.finished_at.tzinfo is not None
    bad = _new_job(pg)
    assert _claim(pg, bad, "w1") == 1
    with session_scope(pg) as s:
        assert repo.finish_job(
            s, bad, 1, JobStatus.FAILED, error_code="oom", error_message="x", retryable=False
        )
        job = repo.get_job(s, bad)
        assert (job.status, job.error_code, job.error_message, job.retryable) == ("failed", "oom", "x", False)
        assert repo.events_after(s, bad)[-1].data == {
            "status": "failed",
            "error_code": "oom",
            "message": "x",
            "retryable": False,
        }


def test_request_cancel(pg: Engine) -> None:
    queued, running, done = _new_job(pg), _new_job(pg), _new_job(pg)
    _claim(pg, running, "w")
    _claim(pg, done, "w")
    with session_scope(pg) as s:
        repo.finish_job(s, done, 1, JobStatus.SUCCEEDED)
    with session_scope(pg) as s:
        q = repo.request_cancel(s, queued)
        assert (q.status, q.cancel_requested) == ("cancelled", True) and q.finished_at is not None
        r = repo.request_cancel(s, running)
        assert (r.status, r.cancel_requested) == ("running", True)
        d = repo.request_cancel(s, done)
        assert (d.status, d.cancel_requested) == ("succeeded", False)
        assert repo.request_cancel(s, "f" * 32) is None
        assert repo.events_after(s, queued)[-1].data == {"status": "cancelled"}
    assert _claim(pg, queued, "w2") is None  # a late delivery does nothing


def test_queued_job_ids(pg: Engine) -> None:
    a, b, c = _new_job(pg), _new_job(pg), _new_job(pg)
    with session_scope(pg) as s:
        repo.request_cancel(s, b)
        assert repo.queued_job_ids(s) == [a, c]
    _claim(pg, a, "w")
    with session_scope(pg) as s:
        assert repo.queued_job_ids(s, limit=5) == [c]


# --- listing ---


def test_list_jobs_keyset_pagination(pg: Engine) -> None:
    ids = [_new_job(pg) for _ in range(25)]
    _new_job(pg, owner="bob")
    with session_scope(pg) as s:
        for job_id in ids[:7]:
            repo.request_cancel(s, job_id)
    pages, cursor = [], None
    with session_scope(pg) as s:
        while True:
            page, cursor = repo.list_jobs(s, "alice", limit=10, cursor=cursor)
            pages.append(page)
            if cursor is None:
                break
        assert [len(p) for p in pages] == [10, 10, 5]
        got = [j for p in pages for j in p]
        assert len({j.id for j in got}) == 25 and {j.id for j in got} == set(ids)
        keys = [(j.created_at, j.id) for j in got]
        assert keys == sorted(keys, reverse=True)  # newest first
        assert got[0].id == ids[-1] and got[-1].id == ids[0]

        cancelled, cursor = repo.list_jobs(s, "alice", status="cancelled", limit=5)
        rest, end = repo.list_jobs(s, "alice", status="cancelled", limit=5, cursor=cursor)
        assert len(cancelled) == 5 and len(rest) == 2 and end is None
        assert {j.id for j in cancelled + rest} == set(ids[:7])
        assert repo.list_jobs(s, "alice", status="running") == ([], None)
        assert repo.list_jobs(s, "carol") == ([], None)
        assert len(repo.list_jobs(s, "alice", limit=0)[0]) == 1

        bad = [
            "!!!",
            "not-a-cursor",
            base64.urlsafe_b64encode(b"{}").decode(),
            base64.urlsafe_b64encode(b"[1, 2]").decode(),
            base64.urlsafe_b64encode(b'["yesterday", "x"]').decode(),
            base64.urlsafe_b64encode(b"\xff\xfe").decode(),
            base64.urlsafe_b64encode(b"42").decode(),
        ]
        for cursor in bad:
            with pytest.raises(ValueError):
                repo.list_jobs(s, "alice", cursor=cursor)


def test_sqlite_times_are_aware_and_pagination_works(lite: Engine) -> None:
    ids = [_new_job(lite) for _ in range(5)]
    with session_scope(lite) as s:
        job = repo.get_job(s, ids[0])
        assert job.created_at.tzinfo is not None and job.created_at <= repo.utcnow()
        first, cursor = repo.list_jobs(s, "alice", limit=3)
        second, end = repo.list_jobs(s, "alice", limit=3, cursor=cursor)
        assert [j.id for j in first + second] == ids[::-1] and end is None


# --- events ---


def test_events_seq_and_after(pg: Engine) -> None:
    a, b = _new_job(pg), _new_job(pg)
    with session_scope(pg) as s:
        for i in range(5):
            repo.append_event(s, a, "progress", {"progress": i / 5})
        repo.append_event(s, b, "message", {"text": "hi"})
    with session_scope(pg) as s:
        assert [e.seq for e in repo.events_after(s, a)] == [1, 2, 3, 4, 5, 6]  # 1 = queued
        assert [e.seq for e in repo.events_after(s, a, 4)] == [5, 6]
        assert [e.seq for e in repo.events_after(s, a, 2, limit=2)] == [3, 4]
        assert repo.events_after(s, a, 6) == []
        assert [(e.seq, e.kind) for e in repo.events_after(s, b)] == [(1, "status"), (2, "message")]
        assert repo.events_after(s, a)[1].data == {"progress": 0.0}


@pytest.mark.parametrize("db", ["pg", "lite"])
def test_concurrent_append_event_is_gapless(db: str, request: pytest.FixtureRequest) -> None:
    engine: Engine = request.getfixturevalue(db)
    job_id = _new_job(engine)

    def writer(name: str) -> None:
        for i in range(20):
            with session_scope(engine) as s:
                repo.append_event(s, job_id, "message", {"text": f"{name}{i}"})

    assert _threads(lambda: writer("a"), lambda: writer("b")) == [None, None]
    with session_scope(engine) as s:
        events = repo.events_after(s, job_id)
    assert [e.seq for e in events] == list(range(1, 42))
    texts = [e.data["text"] for e in events[1:]]
    for name in "ab":  # each writer's events in its own order
        assert [t for t in texts if t[0] == name] == [f"{name}{i}" for i in range(20)]


def test_append_event_retries_a_seq_conflict(pg: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale max(seq) read hits the unique constraint; the SAVEPOINT retry recovers in-transaction."""
    job_id = _new_job(pg)
    with session_scope(pg) as s:
        real, calls = s.scalar, []

        def stale_first(stmt: Any, *a: Any, **kw: Any) -> Any:
            calls.append(stmt)
            return 0 if len(calls) == 1 else real(stmt, *a, **kw)

        monkeypatch.setattr(s, "scalar", stale_first)
        ev = repo.append_event(s, job_id, "message", {"text": "x"})
        assert ev.seq == 2 and len(calls) == 2
        monkeypatch.undo()
        assert [e.seq for e in repo.events_after(s, job_id)] == [1, 2]


# --- reaper support ---


def _stale(engine: Engine, **kw: Any) -> list[str]:
    with session_scope(engine) as s:
        return [j.id for j in repo.stale_jobs(s, **kw)]


def test_stale_requeue_fail_exhausted(pg: Engine) -> None:
    job_id = _new_job(pg, max_attempts=2)
    assert _stale(pg) == []  # fresh and queued: the broker has it
    assert _claim(pg, job_id, "w1", lease_s=-1) == 1
    assert _stale(pg) == [job_id]
    with session_scope(pg) as s:
        (job,) = repo.stale_jobs(s)
        assert repo.requeue(s, job)
        job = repo.get_job(s, job_id)
        assert (job.status, job.attempt, job.worker, job.lease_until) == ("queued", 1, None, None)
        assert job.enqueued_at is not None
        assert repo.events_after(s, job_id)[-1].data["status"] == "queued"
    assert _stale(pg) == []  # just re-enqueued
    with session_scope(pg) as s:
        (snapshot,) = repo.stale_jobs(s, unqueued_after_s=-60)
        assert _claim(pg, job_id, "w2", lease_s=-1) == 2  # (another session) resumes as attempt 2 ...
        assert not repo.requeue(s, snapshot)  # the row moved on since the snapshot

    with session_scope(pg) as s:
        (job,) = repo.stale_jobs(s)
        assert job.attempt == 2
        assert not repo.requeue(s, job)  # ... which was the last: requeue fails it
        job = repo.get_job(s, job_id)
        assert (job.status, job.error_code, job.retryable) == ("failed", "worker_lost", True)
    assert _claim(pg, job_id, "w3") is None
    assert _stale(pg) == []

    # fail_exhausted directly, and not on a row whose worker heartbeated meanwhile
    other = _new_job(pg, max_attempts=1)
    _claim(pg, other, "w1", lease_s=-1)
    (job,) = _stale_rows(pg)
    with session_scope(pg) as s:  # the worker, elsewhere: alive after all
        assert repo.heartbeat(s, other, 1, -1) == (True, False)
    with session_scope(pg) as s:
        assert not repo.fail_exhausted(s, job) and not repo.requeue(s, job)
        assert repo.get_job(s, other).status == "running"
    (job,) = _stale_rows(pg)  # no heartbeat since this read
    with session_scope(pg) as s:
        assert repo.fail_exhausted(s, job)
        assert repo.get_job(s, other).status == "failed"


@pytest.mark.parametrize("db", ["pg", "lite"])
def test_worker_gives_its_attempt_back(db: str, request: pytest.FixtureRequest) -> None:
    """An interrupted worker requeues its own live attempt at once (no waiting for the lease); the
    compare-and-set on the lease it read holds on SQLite's text timestamps too."""
    pg: Engine = request.getfixturevalue(db)
    job_id = _new_job(pg)
    _claim(pg, job_id, "w1")
    with session_scope(pg) as s:
        row = s.get(Job, job_id)
        assert repo.requeue(s, row)
    with session_scope(pg) as s:
        job = repo.get_job(s, job_id)
        assert (job.status, job.attempt, job.lease_until) == ("queued", 1, None)
    assert _claim(pg, job_id, "w2") == 2


@pytest.mark.parametrize("db", ["pg", "lite"])
def test_interrupted_attempt_is_not_counted(db: str, request: pytest.FixtureRequest) -> None:
    """A worker that stops on purpose on the job's last attempt hands it back without exhausting it."""
    engine: Engine = request.getfixturevalue(db)
    job_id = _new_job(engine)
    with session_scope(engine) as s:
        s.get(Job, job_id).max_attempts = 1
    assert _claim(engine, job_id, "w1") == 1
    with session_scope(engine) as s:
        assert repo.requeue(s, s.get(Job, job_id), interrupted=True)
    with session_scope(engine) as s:
        job = repo.get_job(s, job_id)
        assert (job.status, job.attempt) == ("queued", 0)
        assert repo.events_after(s, job_id)[-1].data["reason"].startswith("interrupted")
    assert _claim(engine, job_id, "w2") == 1, "the same attempt number resumes its own checkpoints"


def _stale_rows(engine: Engine) -> list[Job]:
    """What the reaper reads, in its own (committed, closed) session."""
    with session_scope(engine) as s:
        return repo.stale_jobs(s)


def test_stale_queued_and_cancel_requested(pg: Engine) -> None:
    never = _new_job(pg)
    assert _stale(pg, unqueued_after_s=0) == [never]  # never reached the broker
    with session_scope(pg) as s:
        (job,) = repo.stale_jobs(s, unqueued_after_s=0)
        assert repo.requeue(s, job)  # "enqueue it now"
        assert repo.get_job(s, never).enqueued_at is not None
    assert _stale(pg, unqueued_after_s=30) == []
    with session_scope(pg) as s:
        repo.mark_enqueued(s, never)

    # a running job the user asked to cancel, whose worker died: cancelled, not retried
    doomed = _new_job(pg)
    _claim(pg, never, "w")  # out of the way
    _claim(pg, doomed, "w1", lease_s=-1)
    with session_scope(pg) as s:
        repo.request_cancel(s, doomed)
        (job,) = repo.stale_jobs(s)
        assert not repo.requeue(s, job)
        assert repo.get_job(s, doomed).status == "cancelled"
        assert repo.events_after(s, doomed)[-1].data["status"] == "cancelled"
    assert _stale(pg, unqueued_after_s=0) == []


# --- artifacts, uploads, keys, files ---


def test_artifacts_and_uploads(pg: Engine) -> None:
    job_id = _new_job(pg)
    with session_scope(pg) as s:
        repo.add_artifact(s, job_id, 1, "model.safetensors", f"{job_id}/attempt-1/m", 10, "a" * 64, "x/y")
        repo.add_artifact(
            s, job_id, 1, "report.json", f"{job_id}/attempt-1/r", 3, "b" * 64, "application/json"
        )
    with session_scope(pg) as s:
        repo.add_artifact(s, job_id, 2, "model.safetensors", f"{job_id}/attempt-2/m", 12, "c" * 64, "x/y")
    with session_scope(pg) as s:
        arts = repo.list_artifacts(s, job_id)
        assert [(a.name, a.attempt, a.size) for a in arts] == [
            ("model.safetensors", 2, 12),
            ("report.json", 1, 3),
        ]
        art = repo.get_artifact(s, job_id, "model.safetensors")
        assert (art.path, art.sha256) == (f"{job_id}/attempt-2/m", "c" * 64)
        assert repo.get_artifact(s, job_id, "nope") is None
        assert [a.name for a in repo.get_job(s, job_id).artifacts] == ["model.safetensors", "report.json"]

        up = repo.add_upload(
            s, "alice", "weights", "w.safetensors", "u/1", 5, "d" * 64, "application/octet-stream"
        )
        assert repo.get_upload(s, up.id, owner="alice").filename == "w.safetensors"
        assert repo.get_upload(s, up.id, owner="bob") is None
        assert repo.get_upload(s, up.id) is not None and repo.get_upload(s, "0" * 32) is None


def test_api_keys(pg: Engine) -> None:
    with session_scope(pg) as s:
        key, plaintext = repo.create_api_key(s, "alice", "laptop")
        other, other_plain = repo.create_api_key(s, "alice")
        assert plaintext.startswith(repo.KEY_PREFIX) and len(plaintext) > 40 and plaintext != other_plain
    with session_scope(pg) as s:
        rows = s.execute(text("SELECT * FROM api_keys")).mappings().all()
        assert len(rows) == 2
        for row in rows:
            for value in row.values():
                assert plaintext not in str(value) and other_plain not in str(value)
        assert repo.owner_of_key(s, plaintext) == "alice"
        assert repo.owner_of_key(s, plaintext + "x") is None
        assert repo.owner_of_key(s, "") is None
        assert not repo.revoke_api_key(s, key.id, "bob")  # not bob's
        assert repo.revoke_api_key(s, key.id, "alice")
        assert not repo.revoke_api_key(s, key.id, "alice")  # already
        assert repo.owner_of_key(s, plaintext) is None
        assert repo.owner_of_key(s, other_plain) == "alice"
        listed = repo.list_api_keys(s, "alice")
        assert [k.id for k in listed] == [key.id, other.id] and listed[0].revoked_at is not None
        assert repo.list_api_keys(s, "bob") == []


def test_resolve_under(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    (root / "j" / "attempt-1").mkdir(parents=True)
    (root / "j" / "attempt-1" / "m.safetensors").write_bytes(b"x")
    assert resolve_under(root, "j/attempt-1/m.safetensors") == (root / "j/attempt-1/m.safetensors").resolve()
    assert resolve_under(root, "j/../j/attempt-1") == (root / "j/attempt-1").resolve()
    (tmp_path / "secret").write_text("s")
    (root / "link").symlink_to(tmp_path / "secret")
    for rel in [
        "../x",
        "../../etc/passwd",
        "/etc/passwd",
        str(root / "j"),
        "j/../../secret",
        "link",
        "",
        ".",
        "a\x00b",
    ]:
        with pytest.raises(ValueError):
            resolve_under(root, rel)
    d = attempt_dir(root, "j", 1)
    assert (
        d == root / "j" / "attempt-1"
        and relative_to_root(root, d / "m.safetensors") == "j/attempt-1/m.safetensors"
    )
    with pytest.raises(ValueError):
        relative_to_root(root, tmp_path / "secret")


# --- the CLI ---


def test_cli_keys_against_sqlite(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    env = {**os.environ, "DATABASE_URL": sqlite_url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "store", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert run("migrate").returncode == 0
    created = run("keys", "create", "--owner", "alice", "--name", "ci")
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.strip()
    assert plaintext.startswith(repo.KEY_PREFIX) and "\n" not in plaintext
    engine = make_engine(sqlite_url)
    try:
        with session_scope(engine) as s:
            assert repo.owner_of_key(s, plaintext) == "alice"
            (key,) = repo.list_api_keys(s, "alice")
    finally:
        engine.dispose()

    # the rest in-process (same code path, no interpreter start-up)
    db = ["--database-url", sqlite_url]
    assert store_cli([*db, "keys", "list", "--owner", "alice"]) == 0
    out = capsys.readouterr().out
    assert key.id in out and "active" in out and plaintext not in out
    assert store_cli([*db, "keys", "revoke", key.id, "--owner", "bob"]) == 2
    assert store_cli([*db, "keys", "revoke", key.id, "--owner", "alice"]) == 0
    assert store_cli([*db, "keys", "revoke", key.id, "--owner", "alice"]) == 2
    assert store_cli([*db, "keys", "create", "--owner", "  "]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and all(len(line) < 200 for line in err.splitlines())
    with pytest.raises(SystemExit) as exc:
        store_cli([*db, "keys", "create"])  # --owner missing
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        store_cli([*db, "frobnicate"])
    assert exc.value.code == 2
    assert store_cli([*db, "downgrade", "nosuchrev"]) == 2
    assert store_cli([*db, "downgrade", "base"]) == 0
    assert store_cli([*db, "keys", "list", "--owner", "alice"]) == 2  # not migrated
    assert "migrate" in capsys.readouterr().err
    assert store_cli([*db, "migrate"]) == 0
    assert store_cli([*db, "current"]) == 0
    assert capsys.readouterr().out.strip() == head_revision()


def test_sqlite_concurrent_writers_do_not_lock(lite: Engine, sqlite_url: str) -> None:
    """API and local runner share the file: a claim race and a read-then-write cancel under contention
    neither fail with "database is locked" nor double-claim (BEGIN IMMEDIATE, see store.db)."""
    other = make_engine(sqlite_url)  # a second process's engine
    try:
        for _ in range(3):
            job_id = _new_job(lite)
            claims = [lambda e=e, w=w, j=job_id: _claim(e, j, w) for e, w in ((lite, "a"), (other, "b"))]
            assert sorted(_threads(*claims), key=str) == [1, None]

        def cancel() -> str:
            with session_scope(other) as s:
                job = repo.get_job(s, job_id, owner="alice")  # read ...
                time.sleep(0.05)
                return repo.request_cancel(s, job.id).status  # ... then write

        def heartbeats() -> None:
            for _ in range(10):
                with session_scope(lite) as s:
                    repo.heartbeat(s, job_id, 1, 60)
                    repo.append_event(s, job_id, "progress", {"progress": 0.5})

        assert _threads(cancel, heartbeats) == ["running", None]
        with session_scope(lite) as s:
            assert repo.heartbeat(s, job_id, 1, 60) == (True, True)
            seqs = [e.seq for e in repo.events_after(s, job_id)]
            assert seqs == list(range(1, len(seqs) + 1))
    finally:
        other.dispose()


def test_job_event_ids_are_bigint_on_postgres(pg: Engine) -> None:
    with pg.connect() as conn:
        cols = {c["name"]: c for c in inspect(conn).get_columns("job_events")}
    assert str(cols["id"]["type"]) == "BIGINT"
    with session_scope(pg) as s:
        job_id = repo.create_job(s, "a", SPEC, "m")[0].id
        s.add(JobEvent(job_id=job_id, seq=1, kind="dup", data={}))
        with pytest.raises(IntegrityError):
            s.flush()


@pytest.mark.parametrize("db", ["pg", "lite"])
def test_create_job_is_atomic_with_its_transaction(db: str, request: pytest.FixtureRequest) -> None:
    """The idempotency SAVEPOINT must not commit on its own (it did on SQLite under the sqlite3 driver's
    legacy transaction control): a failure later in the request leaves no job behind."""
    engine: Engine = request.getfixturevalue(db)
    with pytest.raises(RuntimeError), session_scope(engine) as s:
        repo.create_job(s, "alice", SPEC, "magnitude", idempotency_key="k")
        raise RuntimeError("enqueue failed")
    with session_scope(engine) as s:
        assert s.scalars(select(Job)).all() == [] and s.scalars(select(JobEvent)).all() == []
        assert repo.create_job(s, "alice", SPEC, "magnitude", idempotency_key="k")[1]
