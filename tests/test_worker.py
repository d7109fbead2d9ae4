"""The worker with real parts: execute() against SQLite and PostgreSQL, the reaper, the local runner as a
process, and real Celery worker processes on Redis + PostgreSQL (killed mid-job, two of them racing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from pruning_core.errors import DataError, WeightsError
from pruning_core.settings import Settings
from store import repo
from store.db import make_engine, migrate, session_scope
from store.files import resolve_under, sha256_file
from store.models import Job, utcnow
from store.objects import LocalStore
from tests.faultkit import Procs, done, get, service_env, submit, wait_for
from tests.faultkit import celery_stack as start_celery_stack
from worker.celery_app import QUEUE, TASK_NAME, make_app
from worker.execute import copy_checkpoints, execute, resolve_uploads
from worker.reaper import reap_once
from worker.reporter import StoreReporter

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACT_NAMES = {
    "model.safetensors",
    "architecture.json",
    "report.json",
    "report.html",
    "training.png",
    "widths.png",
    "MODEL_CARD.md",
    "tensorboard.tar.gz",
}


# A job long enough to be stopped after its second epoch and resumed (each epoch: 5 steps and an eval).
LONG_EPOCHS = 20


def digits_spec(epochs: int = 1, **target: Any) -> dict[str, Any]:
    return {
        "model": {"name": "resnet20"},
        "data": {"name": "digits"},
        "target": {"macs_ratio": 0.5, **target},
        "schedule": {"epochs": epochs, "batch_size": 64, "max_steps_per_epoch": 5},
        "export": {"formats": ["safetensors"]},
    }


# --- fixtures and helpers ---


@pytest.fixture(params=["sqlite", "pg"])
def db_url(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    migrate(url)
    return url


@pytest.fixture
def sqlite_db(sqlite_url: str) -> str:
    migrate(sqlite_url)
    return sqlite_url


def make_settings(url: str, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        database_url=url, state_dir=tmp_path / "state", lease_s=30, heartbeat_s=0.2, redis_url=None, **kw
    )


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = make_engine(settings.sqlalchemy_url)
    yield eng
    eng.dispose()


def events(engine: Engine, job_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    with session_scope(engine) as s:
        return [(e.seq, e.kind, e.data) for e in repo.events_after(s, job_id, 0, limit=10_000)]


def messages(engine: Engine, job_id: str) -> list[str]:
    return [d["text"] for _, k, d in events(engine, job_id) if k == "message"]


def statuses(engine: Engine, job_id: str) -> list[str]:
    return [d["status"] for _, k, d in events(engine, job_id) if k == "status"]


def expire_lease(engine: Engine, job_id: str) -> None:
    with session_scope(engine) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1)))


# --- execute() in this process ---


def test_execute_succeeds_and_records_artifacts(settings: Settings, engine: Engine) -> None:
    job_id = submit(engine, digits_spec())
    assert execute(job_id, worker_name="test", settings=settings) == "succeeded"

    job = get(engine, job_id)
    assert (job.status, job.attempt, job.progress, job.error_code) == ("succeeded", 1, 1.0, None)
    assert job.lease_until is None and job.finished_at is not None
    with session_scope(engine) as s:
        arts = repo.list_artifacts(s, job_id)
    assert {a.name for a in arts} == ARTIFACT_NAMES
    for a in arts:
        path = resolve_under(settings.artifacts_dir, a.path)
        assert a.path.startswith(f"{job_id}/attempt-1/") and a.attempt == 1
        assert (a.size, a.sha256) == (path.stat().st_size, sha256_file(path))
    assert {a.name: a.media_type for a in arts}["report.json"] == "application/json"
    assert {a.name: a.media_type for a in arts}["report.html"] == "text/html"
    assert {a.name: a.media_type for a in arts}["tensorboard.tar.gz"] == "application/gzip"
    assert {a.name: a.media_type for a in arts}["MODEL_CARD.md"] == "text/markdown"

    report = json.loads((settings.artifacts_dir / job_id / "attempt-1" / "report.json").read_text())
    assert job.result["pruned"]["macs"] == report["pruned"]["macs"]
    assert job.result["dense"]["params"] == report["dense"]["params"]
    assert job.result["achieved_macs_ratio"] == pytest.approx(report["achieved_macs_ratio"])
    assert set(job.result) >= {"dense", "pruned", "achieved_macs_ratio", "latency_speedup"}

    evs = events(engine, job_id)
    assert [seq for seq, _, _ in evs] == list(range(1, len(evs) + 1))
    assert {"status", "phase", "epoch", "message"} <= {k for _, k, _ in evs}
    assert statuses(engine, job_id) == ["queued", "running", "succeeded"]
    phase = next(d for _, k, d in evs if k == "phase")
    assert phase == {"name": "finetune", "epochs": 1, "steps_per_epoch": 5}
    assert next(d for _, k, d in evs if k == "epoch")["phase"] == "finetune"

    # A duplicate delivery finds nothing to claim and changes nothing.
    assert execute(job_id, worker_name="other", settings=settings) is None
    assert get(engine, job_id).attempt == 1 and len(events(engine, job_id)) == len(evs)


def test_events_number_epochs_from_1_and_one_pruned_event_gives_macs_and_params(
    sqlite_db: str, tmp_path: Path
) -> None:
    settings = make_settings(sqlite_db, tmp_path)
    engine = make_engine(sqlite_db)
    job_id = submit(engine, digits_spec(epochs=2))
    assert execute(job_id, worker_name="test", settings=settings) == "succeeded"
    evs = events(engine, job_id)
    epochs = [d for _, k, d in evs if k == "epoch"]
    assert [d["epoch"] for d in epochs] == [1, 2], "as the CLI and the report count them"
    assert epochs[0]["text"].startswith("finetune epoch 1: ") and epochs[-1]["text"].startswith(
        "finetune epoch 2: "
    )
    assert {d["epoch"] for _, k, d in evs if k == "progress"} <= {1, 2}
    (pruned,) = [d for _, k, d in evs if k == "pruned"]
    result = get(engine, job_id).result
    assert (pruned["macs_before"], pruned["params_before"]) == (
        result["dense"]["macs"],
        result["dense"]["params"],
    )
    assert (pruned["macs_after"], pruned["params_after"]) == (
        result["pruned"]["macs"],
        result["pruned"]["params"],
    )
    assert pruned["macs_after"] < pruned["macs_before"] and pruned["params_after"] < pruned["params_before"]
    assert pruned["macs_ratio"] == pytest.approx(pruned["macs_after"] / pruned["macs_before"], abs=1e-4)
    kinds = [k for _, k, _ in evs]
    assert kinds.index("pruned") < kinds.index("epoch"), "magnitude prunes before it fine-tunes"
    engine.dispose()


@pytest.mark.parametrize(
    "spec, code",
    [
        (digits_spec(macs_ratio=0.0001), "unreachable_target"),
        ({**digits_spec(), "model": {"name": "resnet20", "weights": "upload:0123abcd"}}, "bad_weights"),
        ({**digits_spec(), "data": {"name": "imagefolder", "root": "/etc"}}, "bad_data"),
    ],
    ids=["unreachable-target", "missing-upload", "server-path"],
)
def test_pruning_error_fails_not_retryable(
    sqlite_db: str, tmp_path: Path, spec: dict[str, Any], code: str
) -> None:
    settings = make_settings(sqlite_db, tmp_path)
    engine = make_engine(sqlite_db)
    job_id = submit(engine, spec)
    assert execute(job_id, worker_name="test", settings=settings) == "failed"
    job = get(engine, job_id)
    assert (job.status, job.error_code, job.retryable) == ("failed", code, False)
    assert job.error_message and "\n" not in job.error_message and job.lease_until is None
    assert any(m.startswith(f"failed ({code})") for m in messages(engine, job_id))
    assert statuses(engine, job_id)[-1] == "failed"
    engine.dispose()


def test_unexpected_error_is_internal_and_retryable(
    sqlite_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pruning_core.jobs import runner

    def boom(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(runner, "run", boom)
    settings, engine = make_settings(sqlite_db, tmp_path), make_engine(sqlite_db)
    job_id = submit(engine, digits_spec())
    assert execute(job_id, worker_name="test", settings=settings) == "failed"
    job = get(engine, job_id)
    assert (job.status, job.error_code, job.retryable) == ("failed", "internal_error", True)
    assert job.error_message == "disk on fire second line"
    engine.dispose()


def test_a_lost_soft_limit_exception_still_stops_the_job_as_time_limit(
    sqlite_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soft limit's exception can be swallowed where the signal lands (a weakref callback); its
    flag then stops the job at the next training step, recorded as ``time_limit``, not ``cancelled``."""
    from worker import reporter

    monkeypatch.setattr(reporter.TIME_UP, "is_set", lambda: True)  # the flag of a limit already past
    settings, engine = make_settings(sqlite_db, tmp_path), make_engine(sqlite_db)
    job_id = submit(engine, digits_spec(epochs=300))  # ~30 s if the flag were ignored
    assert execute(job_id, worker_name="test", settings=settings) == "failed"
    job = get(engine, job_id)
    assert (job.status, job.error_code, job.retryable) == ("failed", "time_limit", False)
    engine.dispose()


def test_cancel_while_running(settings: Settings, engine: Engine) -> None:
    job_id = submit(engine, digits_spec(epochs=300))  # ~30 s if the cancel were ignored

    def cancel_when_running() -> None:
        wait_for(lambda: get(engine, job_id).status == "running", 30, "the claim", every=0.05)
        with session_scope(engine) as s:
            repo.request_cancel(s, job_id)

    t = threading.Thread(target=cancel_when_running, daemon=True)
    t.start()
    assert (
        execute(job_id, worker_name="test", settings=settings) == "cancelled"
    )  # an ignored cancel: succeeded
    t.join(5)
    job = get(engine, job_id)
    assert (job.status, job.cancel_requested, job.error_code, job.lease_until) == (
        "cancelled",
        True,
        None,
        None,
    )
    assert statuses(engine, job_id)[-1] == "cancelled"
    assert any(m.startswith("cancelled") for m in messages(engine, job_id))
    with session_scope(engine) as s:
        assert repo.list_artifacts(s, job_id) == []
    assert not (settings.artifacts_dir / job_id).exists(), "its checkpoints went with it"
    assert execute(job_id, worker_name="test", settings=settings) is None


def test_reporter_progress_heartbeat_cancel_and_loss(sqlite_db: str) -> None:
    engine = make_engine(sqlite_db)
    job_id = submit(engine, digits_spec(epochs=2))
    with session_scope(engine) as s:
        repo.claim_job(s, job_id, "w", lease_s=5)
    r = StoreReporter(
        engine, job_id, 1, lease_s=60, heartbeat_s=0.05, planned_epochs=2, progress_every_s=0
    ).start()
    try:
        r.phase("finetune", 2, 4)
        for epoch in range(2):
            for step in range(1, 5):
                r.step("finetune", epoch, step, 0.5)
            r.epoch(
                {
                    "phase": "finetune",
                    "epoch": epoch,
                    "top1": float("nan"),
                    "macs": 10,
                    "views": {"soft": 61.5},
                    "metrics": {"indicator": 0.97, "ratios": [0.1, 0.2]},
                }
            )
        evs = events(engine, job_id)
        progress = [d["progress"] for _, k, d in evs if k == "progress"]
        assert len(progress) == 8 and progress == sorted(progress) and progress[-1] == 0.99
        assert [d["epoch"] for _, k, d in evs if k == "epoch"] == [1, 2], "counted from 1 in events"
        first_epoch = [d for _, k, d in evs if k == "epoch"][0]
        assert first_epoch["top1"] is None  # NaN is not JSON
        assert first_epoch["metrics"] == {"indicator": 0.97, "ratios": [0.1, 0.2]}, "method numbers reach SSE"
        assert first_epoch["views"] == {"soft": 61.5}
        job = get(engine, job_id)
        assert (job.phase, job.progress) == ("finetune", 0.99)
        assert job.lease_until.replace(tzinfo=None) > (utcnow() + timedelta(seconds=30)).replace(tzinfo=None)

        assert not r.cancelled()
        with session_scope(engine) as s:
            repo.request_cancel(s, job_id)
        wait_for(r.cancelled, 5, "the cancel flag", every=0.02)
        assert not r.lost

        with session_scope(engine) as s:
            repo.requeue(s, repo.get_job(s, job_id))  # the reaper gave the attempt away
        wait_for(lambda: r.lost, 5, "the loss of the attempt", every=0.02)
        n = len(events(engine, job_id))
        r.message("not ours any more")
        assert len(events(engine, job_id)) == n
    finally:
        r.close()
        engine.dispose()


class _Crash(BaseException):
    """Stands in for a worker dying mid-job: nothing in execute() handles it."""


def test_reaper_requeues_and_the_retry_resumes(
    settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(engine, digits_spec(epochs=4))
    real_step = StoreReporter.step

    def dying_step(self: StoreReporter, phase: str, epoch: int, step: int, loss: float) -> None:
        real_step(self, phase, epoch, step, loss)
        if epoch >= 2:
            raise _Crash

    monkeypatch.setattr(StoreReporter, "step", dying_step)
    with pytest.raises(_Crash):
        execute(job_id, worker_name="doomed", settings=settings)
    monkeypatch.setattr(StoreReporter, "step", real_step)
    assert get(engine, job_id).status == "running"  # the row is left as a dead worker leaves it

    sent: list[str] = []
    assert reap_once(engine, sent.append, settings)["requeued"] == 0  # the lease is still valid
    expire_lease(engine, job_id)
    counts = reap_once(engine, sent.append, settings)
    assert (counts["requeued"], counts["enqueued"], sent) == (1, 1, [job_id])
    job = get(engine, job_id)
    assert (job.status, job.attempt, job.enqueued_at is not None) == ("queued", 1, True)

    assert execute(job_id, worker_name="second", settings=settings) == "succeeded"
    job = get(engine, job_id)
    assert (job.status, job.attempt, job.worker) == ("succeeded", 2, "second")
    # Once it succeeded, only its artifacts stay: no checkpoints, nothing of attempt 1.
    assert [p.name for p in (settings.artifacts_dir / job_id).iterdir()] == ["attempt-2"]
    assert not (settings.artifacts_dir / job_id / "attempt-2" / "checkpoints").exists()
    texts = messages(engine, job_id)
    assert "resuming from the checkpoints of attempt 1" in texts
    assert any("resuming at epoch 3" in t for t in texts)  # epochs 1-2 came from attempt 1
    assert statuses(engine, job_id) == ["queued", "running", "queued", "running", "succeeded"]
    with session_scope(engine) as s:
        assert {a.attempt for a in repo.list_artifacts(s, job_id)} == {2}
    epochs = [d["epoch"] for _, k, d in events(engine, job_id) if k == "epoch"]
    assert epochs == [1, 2, 3, 4]  # every epoch trained exactly once over the two attempts, from 1


def test_reaper_fails_exhausted_and_wakes_unqueued(settings: Settings, engine: Engine) -> None:
    lost = submit(engine, digits_spec(), max_attempts=1)
    lost_cancelled = submit(engine, digits_spec())
    waiting = submit(engine, digits_spec())
    cancelled = submit(engine, digits_spec())
    with session_scope(engine) as s:
        for job_id in (lost, lost_cancelled):
            assert repo.claim_job(s, job_id, "gone", lease_s=30) is not None
        repo.request_cancel(s, lost_cancelled)  # asked while running, then its worker died
        repo.request_cancel(s, cancelled)
    expire_lease(engine, lost)
    expire_lease(engine, lost_cancelled)

    sent: list[str] = []
    counts = reap_once(engine, sent.append, settings)  # the queued ones are too young to count
    assert (counts["failed"], counts["cancelled"], counts["requeued"], sent) == (1, 1, 0, [])
    job = get(engine, lost)
    assert (job.status, job.error_code, job.retryable) == ("failed", "worker_lost", True)
    assert get(engine, lost_cancelled).status == "cancelled"

    counts = reap_once(engine, sent.append, settings, unqueued_after_s=0)
    assert (counts["failed"], counts["enqueued"], sent) == (0, 1, [waiting])
    assert get(engine, waiting).enqueued_at is not None
    assert get(engine, cancelled).status == "cancelled"

    # Enqueued a moment ago: left alone, unless the message is old enough to have been lost.
    assert reap_once(engine, sent.append, settings, unqueued_after_s=0)["enqueued"] == 0
    assert reap_once(engine, sent.append, settings, unqueued_after_s=0, reenqueue_after_s=0)["enqueued"] == 1

    def broker_down(_job_id: str) -> None:
        raise ConnectionError("broker down")

    unsent: set[str] = set()
    counts = reap_once(engine, broker_down, settings, unqueued_after_s=0, reenqueue_after_s=0, unsent=unsent)
    assert (counts["enqueue_errors"], unsent, get(engine, waiting).status) == (1, {waiting}, "queued")
    sent.clear()
    counts = reap_once(engine, sent.append, settings, unsent=unsent)  # the failed send is retried at once
    assert (counts["enqueued"], sent, unsent) == (1, [waiting], set())


def test_uploads_resolve_for_their_owner_only(sqlite_db: str, tmp_path: Path) -> None:
    settings, engine = make_settings(sqlite_db, tmp_path), make_engine(sqlite_db)
    (settings.uploads_dir / "u").mkdir(parents=True)
    (settings.uploads_dir / "u" / "w.safetensors").write_bytes(b"x")
    (settings.uploads_dir / "u" / "data.zip").write_bytes(b"x")
    with session_scope(engine) as s:
        w = repo.add_upload(s, "alice", "weights", "w.safetensors", "u/w.safetensors", 1, "0" * 64, "x")
        d = repo.add_upload(s, "alice", "dataset", "data.zip", "u/data.zip", 1, "0" * 64, "x")
        gone = repo.add_upload(s, "alice", "weights", "g.safetensors", "u/g.safetensors", 1, "1" * 64, "x")
        escape = repo.add_upload(s, "alice", "weights", "e", "../../etc/passwd", 1, "2" * 64, "x")
    spec = {
        **digits_spec(),
        "model": {"name": "resnet20", "weights": f"upload:{w.id}"},
        "data": {"name": "imagefolder", "root": f"upload:{d.id}"},
        "kd": {"enabled": True, "teacher": f"upload:{w.id}"},
    }
    uploads = LocalStore(settings.uploads_dir)
    out = resolve_uploads(engine, spec, "alice", uploads, settings.uploads_dir)
    assert out["model"]["weights"] == out["kd"]["teacher"] == str(settings.uploads_dir / "u/w.safetensors")
    assert out["data"]["root"] == str(settings.uploads_dir / "u/data.zip")
    assert spec["model"]["weights"] == f"upload:{w.id}"  # the stored spec is not modified
    assert resolve_uploads(engine, digits_spec(), "alice", uploads, settings.uploads_dir) == digits_spec()
    with pytest.raises(WeightsError, match="not found"):
        resolve_uploads(engine, spec, "bob", uploads, settings.uploads_dir)
    with pytest.raises(DataError, match="upload reference"):
        resolve_uploads(
            engine, {"data": {"name": "cifar10", "root": "/srv/data"}}, "alice", uploads, settings.uploads_dir
        )
    for bad, what in ((gone, "missing"), (escape, "invalid path")):
        with pytest.raises(WeightsError, match=what):
            resolve_uploads(
                engine, {"model": {"weights": f"upload:{bad.id}"}}, "alice", uploads, settings.uploads_dir
            )
    engine.dispose()


def test_copy_checkpoints_takes_the_newest_earlier_attempt(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    assert copy_checkpoints(root, "j", 1) is None
    (root / "j" / "attempt-1" / "checkpoints").mkdir(parents=True)
    (root / "j" / "attempt-1" / "checkpoints" / "dense.pt").write_bytes(b"1")
    (root / "j" / "attempt-2" / "checkpoints").mkdir(parents=True)  # attempt 2 died before any checkpoint
    (root / "j" / "attempt-2" / "checkpoints" / "finetune.tmp").write_bytes(b"partial")
    assert copy_checkpoints(root, "j", 3) == 1
    assert [p.name for p in (root / "j" / "attempt-3" / "checkpoints").iterdir()] == ["dense.pt"]


# --- module boundaries and configuration ---


def test_worker_modules_import_no_torch() -> None:
    code = (
        "import sys, worker.celery_app, worker.execute, worker.reaper, worker.local, worker.reporter; "
        "print(','.join(m for m in ('torch', 'torchvision', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_celery_configuration() -> None:
    app = make_app(Settings(redis_url="redis://127.0.0.1:6379/0", job_time_limit_s=3600))
    c = app.conf
    assert (c.task_acks_late, c.task_reject_on_worker_lost, c.task_ignore_result) == (True, True, True)
    assert (c.worker_prefetch_multiplier, c.worker_concurrency, c.worker_max_tasks_per_child) == (1, 1, 1)
    assert c.task_time_limit == 3600 and 3000 <= c.task_soft_time_limit < 3600
    assert c.broker_transport_options["visibility_timeout"] > c.task_time_limit
    assert c.result_backend_transport_options["visibility_timeout"] > c.task_time_limit
    assert c.task_default_queue == QUEUE == "pruning"
    from worker.celery_app import app as module_app

    assert TASK_NAME == "pruning.run_job" and TASK_NAME in module_app.tasks


@pytest.fixture
def billiard_sigusr1() -> Iterator[None]:
    """SIGUSR1 handled by billiard's raising soft-limit handler, as in a prefork child; restored after."""
    from billiard.pool import soft_timeout_sighandler

    before = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_celerys_soft_limit_signal_only_flags_the_job(
    monkeypatch: pytest.MonkeyPatch, billiard_sigusr1
) -> None:
    """In a prefork child, billiard's SIGUSR1 handler raises ``SoftTimeLimitExceeded`` wherever the
    signal lands; inside torch's C++ that aborts the child (pybind11 terminate) and the row stays
    running. The task swaps it for the flag: the signal then raises nothing and sets ``TIME_UP``. Any
    other SIGUSR1 handler (a solo worker's traceback dump) is left alone."""
    from worker import reporter
    from worker.celery_app import flag_soft_time_limit

    event = threading.Event()
    monkeypatch.setattr(reporter, "TIME_UP", event)
    assert flag_soft_time_limit() is True
    signal.raise_signal(signal.SIGUSR1)  # raised here, it would fail this test
    assert event.is_set()

    def dump(_signum: int, _frame: object) -> None:
        pass

    signal.signal(signal.SIGUSR1, dump)
    assert flag_soft_time_limit() is False and signal.getsignal(signal.SIGUSR1) is dump


def test_the_celery_task_runs_its_job_with_the_flagging_handler(
    monkeypatch: pytest.MonkeyPatch, billiard_sigusr1
) -> None:
    """The task body swaps billiard's handler before ``execute`` runs the job."""
    from worker import execute as execute_module
    from worker import reporter
    from worker.celery_app import run_job

    seen = []
    monkeypatch.setattr(
        execute_module, "execute", lambda job_id, **kw: seen.append(signal.getsignal(signal.SIGUSR1))
    )
    run_job.run("some-job")
    assert seen == [reporter.on_soft_time_limit]


# --- real processes ---


@pytest.fixture
def celery_stack(pg_url: str, redis_url: str, tmp_path: Path, procs: Procs):
    """Workers with a 3 s lease on the shared Redis (``faultkit.celery_stack``)."""
    with start_celery_stack(pg_url, redis_url, tmp_path, procs, {"LEASE_S": "3"}, lease_s=3) as stack:
        yield stack


def test_celery_worker_runs_jobs_and_survives_a_kill(celery_stack, procs: Procs) -> None:
    settings, engine, send, enqueue = celery_stack
    w1 = procs.celery_worker("w1")
    try:
        first = send(digits_spec())
        job = wait_for(lambda: done(engine, first), 90, "the first job")
        assert (job.status, job.attempt, job.worker) == ("succeeded", 1, f"w1@{os.uname().nodename}")
        with session_scope(engine) as s:
            arts = repo.list_artifacts(s, first)
        assert {a.name for a in arts} == ARTIFACT_NAMES
        for a in arts:
            assert sha256_file(resolve_under(settings.artifacts_dir, a.path)) == a.sha256

        # Kill the worker (and its child) mid-job, as a lost machine would.
        long = send(digits_spec(epochs=LONG_EPOCHS))
        wait_for(
            lambda: any(k == "epoch" and d["epoch"] >= 2 for _, k, d in events(engine, long)),
            60,
            "two epochs of the long job",
            every=0.05,
        )
        procs.kill(w1)
        assert get(engine, long).status == "running"
        procs.celery_worker("w2")
        counts = wait_for(
            lambda: (c := reap_once(engine, enqueue, settings))["requeued"] and c, 20, "the lease to expire"
        )
        assert counts["enqueued"] == 1
        job = wait_for(lambda: done(engine, long), 120, "the resumed job")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{procs.logs()}") from None
    assert (job.status, job.attempt, job.worker) == ("succeeded", 2, f"w2@{os.uname().nodename}")
    assert statuses(engine, long) == ["queued", "running", "queued", "running", "succeeded"]
    assert "resuming from the checkpoints of attempt 1" in messages(engine, long)
    epochs = [d["epoch"] for _, k, d in events(engine, long) if k == "epoch"]
    assert epochs[-1] == LONG_EPOCHS and len(epochs) < LONG_EPOCHS + 2  # at most the epoch in flight twice


@pytest.mark.slow
def test_a_celery_worker_at_its_soft_limit_fails_the_job_as_time_limit(
    pg_url: str, redis_url: str, tmp_path: Path, procs: Procs
) -> None:
    """A real worker with a 60 s limit (soft at 57 s) and a job that would train for minutes: the soft
    limit's flag stops it in the same attempt, recorded ``time_limit``, before billiard's hard kill
    (which would give the attempt back instead)."""
    env = {"JOB_TIME_LIMIT_S": "60"}
    with start_celery_stack(pg_url, redis_url, tmp_path, procs, env, job_time_limit_s=60) as stack:
        _settings, engine, send, _enqueue = stack
        procs.celery_worker("w1")
        job_id = send(digits_spec(epochs=1000))
        try:
            job = wait_for(lambda: done(engine, job_id), 120, "the soft limit")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{procs.logs()}") from None
        assert (job.status, job.error_code, job.retryable, job.attempt) == ("failed", "time_limit", False, 1)
        assert "terminate called" not in procs.logs()


def test_two_celery_workers_run_six_jobs_exactly_once(celery_stack, procs: Procs) -> None:
    _settings, engine, send, _enqueue = celery_stack
    procs.celery_worker("a")
    procs.celery_worker("b")
    jobs = [send(digits_spec()) for _ in range(6)]
    try:
        wait_for(lambda: all(done(engine, j) for j in jobs), 150, "six jobs", every=0.5)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{procs.logs()}") from None
    for j in jobs:
        job = get(engine, j)
        assert (job.status, job.attempt) == ("succeeded", 1), (j, job.status, job.error_message)
        assert statuses(engine, j) == ["queued", "running", "succeeded"]
    host = os.uname().nodename
    assert {get(engine, j).worker for j in jobs} == {f"a@{host}", f"b@{host}"}  # both took jobs


def test_local_runner_runs_queue_and_stops_cleanly(sqlite_db: str, tmp_path: Path, procs: Procs) -> None:
    procs.env = service_env(tmp_path, DATABASE_URL=sqlite_db, LEASE_S="30")
    engine = make_engine(sqlite_db)
    quick = submit(engine, digits_spec())
    long = submit(engine, digits_spec(epochs=LONG_EPOCHS))
    runner = procs.start("local", sys.executable, "-m", "worker.local")
    try:
        job = wait_for(lambda: done(engine, quick), 90, "the first job")
        assert (job.status, job.attempt) == ("succeeded", 1)
        wait_for(
            lambda: any(k == "epoch" and d["epoch"] >= 2 for _, k, d in events(engine, long)),
            60,
            "two epochs of the second job",
            every=0.05,
        )
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 0
        job = get(engine, long)
        # given back at once, not left running; a deliberate stop does not use up an attempt
        assert (job.status, job.attempt) == ("queued", 0)
        procs.start("local2", sys.executable, "-m", "worker.local")
        job = wait_for(lambda: done(engine, long), 120, "the resumed job")
    except (AssertionError, subprocess.TimeoutExpired) as err:
        raise AssertionError(f"{err}\n{procs.logs()}") from None
    assert (job.status, job.attempt) == ("succeeded", 1)
    assert any("resuming at epoch" in m for m in messages(engine, long)), "it resumed from its checkpoint"
    engine.dispose()
