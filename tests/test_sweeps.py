"""Sweeps (issue 28): one request runs several methods on the user's model and ranks them.

The API in-process (TestClient on SQLite) and the worker's ``execute`` in this process, job by job, as a
worker would run them; figures are checked against each child's own ``report.json``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

import pruning_client.cli as cli
from api.app import create_app
from pruning_client.sdk import ApiError, Client
from pruning_core.settings import Settings
from pruning_core.spec import METHODS
from store import db, repo, sweeps
from store.models import Job, JobStatus, Sweep, utcnow
from worker.execute import execute
from worker.reaper import reap_once
from worker.reporter import StoreReporter
from worker.sweeps import advance_open

PROBLEM = "application/problem+json"
# Digits, tiny: 20 training and 5 test images per class, two epochs of two steps (psap and epi need
# two epochs), one dense epoch first.
BASE: dict[str, Any] = {
    "model": {"name": "resnet20"},
    "data": {"name": "digits", "per_class": 20, "test_per_class": 5},
    "target": {"macs_ratio": 0.5},
    "schedule": {
        "dense_epochs": 1,
        "epochs": 2,
        "batch_size": 64,
        "max_steps_per_epoch": 2,
        "bn_recalibration_batches": 1,
    },
    "export": {"formats": ["safetensors"], "latency_max_s": 0.5},
}
# Every method, TAS with a one-epoch search (its default is ten).
ALL_METHODS: list[Any] = [m if m != "tas" else {"name": "tas", "search_epochs": 1} for m in METHODS]


class Service:
    """The API on SQLite, two owners' keys, and a worker that runs the queue in this process."""

    def __init__(self, settings: Settings, client: TestClient):
        self.settings, self.client = settings, client
        self.engine = db.make_engine(settings.sqlalchemy_url)
        with db.session_scope(self.engine) as s:
            _, key_a = repo.create_api_key(s, "alice")
            _, key_b = repo.create_api_key(s, "bob")
        self.a = {"Authorization": f"Bearer {key_a}"}
        self.b = {"Authorization": f"Bearer {key_b}"}

    def submit(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        r = self.client.post("/v1/sweeps", json=body, headers=headers or self.a)
        assert r.status_code == 201, r.text
        return r.json()

    def get(self, sweep_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/sweeps/{sweep_id}", headers=self.a)
        assert r.status_code == 200, r.text
        return r.json()

    def work(self, limit: int = 50) -> list[str]:
        """Run queued jobs one at a time, oldest first, until none is left (children appear as the dense
        job ends) or ``limit`` have run."""
        ran: list[str] = []
        while len(ran) < limit and (ids := self._queued()):
            execute(ids[0], worker_name="test-worker", settings=self.settings)
            ran.append(ids[0])
        return ran

    def _queued(self) -> list[str]:
        with db.read_sessions(self.engine)() as s:
            return repo.queued_job_ids(s, limit=100)

    def report(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=self.a)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def service(tmp_path: Path, sqlite_url: str) -> Iterator[Service]:
    yield from _service(tmp_path, sqlite_url)


@pytest.fixture
def pg_service(tmp_path: Path, pg_url: str) -> Iterator[Service]:
    yield from _service(tmp_path, pg_url)


def _service(tmp_path: Path, url: str) -> Iterator[Service]:
    db.migrate(url)
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=url,
        redis_url=None,
        auth_disabled=False,
        lease_s=30,
        heartbeat_s=0.5,
        max_sweep_jobs=6,
        rate_per_s=0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        svc = Service(settings, client)
        yield svc
        svc.engine.dispose()


def assert_problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def test_a_digits_sweep_over_every_method_ranks_figures_equal_to_each_report(service: Service) -> None:
    sweep = service.submit({"spec": BASE, "methods": ALL_METHODS, "rank_by": "top1"})
    assert sweep["status"] == "running" and sweep["stage"] == "dense"
    assert [j["role"] for j in sweep["jobs"]] == ["dense"]  # the children wait for its weights
    service.work()
    done = service.get(sweep["id"])
    assert done["status"] == "succeeded", done
    board = done["leaderboard"]
    rows = board["rows"]
    assert sorted(r["method"] for r in rows) == sorted(METHODS)  # one row per method

    # the dense phase ran once: one dense job, and no child trained a dense phase of its own
    dense_jobs = [j for j in done["jobs"] if j["role"] == "dense"]
    assert len(dense_jobs) == 1 and board["dense"]["job_id"] == dense_jobs[0]["id"]
    dense_report = service.report(dense_jobs[0]["id"])
    assert [p["name"] for p in dense_report["phases"] if p["name"] == "dense"] == ["dense"]
    refs = set()
    for row in rows:
        assert row["status"] == "succeeded", row
        report = service.report(row["job_id"])
        assert not [h for h in report["history"] if h["phase"] == "dense"], row["method"]
        assert report["spec"]["schedule"]["dense_epochs"] == 0
        job = service.client.get(f"/v1/jobs/{row['job_id']}", headers=service.a).json()
        refs.add(job["spec"]["model"]["weights"])
        # every figure is the child's report's
        assert row["top1"] == report["pruned"]["top1"]
        assert row["test_images"] == report["data_summary"]["test_images"] == 50
        assert row["macs"] == report["pruned"]["macs"] and row["params"] == report["pruned"]["params"]
        assert row["achieved_macs_ratio"] == report["achieved_macs_ratio"]
        assert row["speedup"] == report["latency_speedup"]
        at = max(report["latency"]["batches"], key=lambda b: b["batch_size"])
        assert row["speedup_interval"] == [at["speedup"]["low"], at["speedup"]["high"]]
        assert row["training_macs"] == sum(h["train_macs"] or 0 for h in report["history"])
        # and the child starts from the dense job's trained network: its dense top-1 is the dense job's
        assert report["dense"]["top1"] == dense_report["pruned"]["top1"]
    assert len(refs) == 1 and refs.pop().startswith("upload:")  # all from the one dense checkpoint
    # training MACs: the dense training counted once, beside each child's own
    dense_macs = sum(h["train_macs"] or 0 for h in dense_report["history"])
    assert dense_macs > 0 and board["dense"]["training_macs"] == dense_macs
    assert board["training_macs_total"] == dense_macs + sum(r["training_macs"] for r in rows)

    # the winner by top-1 is named, first, and its artifacts are the sweep's too
    best = max(r["top1"] for r in rows)
    assert rows[0]["rank"] == 1 and rows[0]["top1"] == best and done["winner"] == rows[0]["job_id"]
    arts = service.client.get(f"/v1/sweeps/{sweep['id']}/artifacts", headers=service.a).json()["items"]
    names = [a["name"] for a in arts]
    assert names[:2] == ["leaderboard.json", "sweep.html"] and "model.safetensors" in names
    r = service.client.get(f"/v1/sweeps/{sweep['id']}/artifacts/leaderboard.json", headers=service.a)
    assert r.status_code == 200 and json.loads(r.content) == board
    html = service.client.get(f"/v1/sweeps/{sweep['id']}/artifacts/sweep.html", headers=service.a).text
    assert "<svg" in html and 'class="winner"' in html and "<script" not in html
    for row in rows:
        assert f"/v1/jobs/{row['job_id']}/artifacts/report.html" in html
    r = service.client.get(f"/v1/sweeps/{sweep['id']}/artifacts/model.safetensors", headers=service.a)
    w = service.client.get(f"/v1/jobs/{done['winner']}/artifacts/model.safetensors", headers=service.a)
    assert r.status_code == 200 and r.content == w.content

    # the sweep's own files are served as job artifacts are: digest, ETag, ranges, a changed file refused
    url = f"/v1/sweeps/{sweep['id']}/artifacts/leaderboard.json"
    whole = service.client.get(url, headers=service.a)
    digest = base64.b64encode(hashlib.sha256(whole.content).digest()).decode()
    assert whole.headers["repr-digest"] == f"sha-256=:{digest}:"
    part = service.client.get(url, headers={**service.a, "Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == whole.content[:10]
    etag = {"If-None-Match": whole.headers["etag"]}
    assert service.client.get(url, headers={**service.a, **etag}).status_code == 304
    assert_problem(service.client.get(url, headers={**service.a, "Range": "bytes=99999999-"}), 416)
    html_path = next(service.settings.artifacts_dir.glob(f"sweep-{sweep['id']}/sweep.html"))
    html_path.write_text(html.replace("Sweep", "Swept"))  # same size, other bytes
    gone = service.client.get(f"/v1/sweeps/{sweep['id']}/artifacts/sweep.html", headers=service.a)
    assert_problem(gone, 410)


def test_too_many_children_is_a_422_problem(service: Service) -> None:
    body = {"spec": BASE, "methods": list(METHODS), "targets": [{"macs_ratio": 0.5}, {"macs_ratio": 0.3}]}
    r = service.client.post("/v1/sweeps", json=body, headers=service.a)
    problem = assert_problem(r, 422)
    assert "MAX_SWEEP_JOBS" in problem["detail"] and "10 children" in problem["detail"]
    with db.read_sessions(service.engine)() as s:
        assert s.query(Job).count() == 0 and s.query(Sweep).count() == 0  # nothing was created


def test_another_owners_sweep_is_a_404_problem(service: Service) -> None:
    sweep = service.submit({"spec": BASE | {"schedule": {"epochs": 1}}, "methods": ["magnitude"]})
    for method, path in [
        ("get", ""),
        ("get", "/events"),
        ("get", "/artifacts"),
        ("get", "/artifacts/leaderboard.json"),
        ("post", "/cancel"),
    ]:
        r = getattr(service.client, method)(f"/v1/sweeps/{sweep['id']}{path}", headers=service.b)
        assert_problem(r, 404)
    assert service.client.get("/v1/sweeps", headers=service.b).json()["items"] == []
    assert service.get(sweep["id"])["cancel_requested"] is False  # bob's cancel changed nothing


def test_cancel_cancels_every_child(service: Service) -> None:
    no_dense = BASE | {"schedule": BASE["schedule"] | {"dense_epochs": 0}}
    sweep = service.submit({"spec": no_dense, "methods": ["magnitude", "psap", "epi"]})
    assert sweep["stage"] == "children" and len(sweep["jobs"]) == 3
    # one child is running on a worker when the cancel arrives
    running = sweep["jobs"][0]["id"]
    with db.session_scope(service.engine) as s:
        claimed = repo.claim_job(s, running, "w", lease_s=30)
        assert claimed is not None
    r = service.client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=service.a)
    assert r.status_code == 202
    jobs = {j["id"]: j for j in r.json()["jobs"]}
    assert all(j["status"] == "cancelled" for i, j in jobs.items() if i != running)
    assert r.json()["status"] == "running"  # its running child has not stopped yet
    with db.read_sessions(service.engine)() as s:
        assert s.get(Job, running).cancel_requested
    with db.session_scope(service.engine) as s:  # the worker stops at its next step
        repo.finish_job(s, running, claimed.attempt, JobStatus.CANCELLED)
    advance_open(service.engine, service.settings, lambda _id: None)  # the reaper's re-check
    done = service.get(sweep["id"])
    assert done["status"] == "cancelled" and done["counts"]["cancelled"] == 3
    assert [r["status"] for r in done["leaderboard"]["rows"]] == ["cancelled"] * 3


def test_cancel_during_the_dense_phase_creates_no_children(service: Service) -> None:
    sweep = service.submit({"spec": BASE, "methods": ["magnitude", "s2h"]})
    r = service.client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=service.a)
    done = r.json()
    assert done["status"] == "cancelled" and [j["status"] for j in done["jobs"]] == ["cancelled"]
    rows = done["leaderboard"]["rows"]
    assert [(r["method"], r["status"], r["error"]["code"]) for r in rows] == [
        ("magnitude", "cancelled", "not_run"),
        ("s2h", "cancelled", "not_run"),
    ]
    assert service.work() == []


def test_a_failed_child_is_a_row_with_its_error(service: Service) -> None:
    # no dense phase: both children queued at once; one fails at run time
    no_dense = BASE | {"schedule": BASE["schedule"] | {"dense_epochs": 0, "epochs": 1}}
    sweep = service.submit({"spec": no_dense, "methods": ["magnitude", "s2h"], "rank_by": "pareto"})
    bad = next(j["id"] for j in sweep["jobs"] if j["method"] == "s2h")
    with db.session_scope(service.engine) as s:  # as a worker whose job failed would record it
        job = repo.claim_job(s, bad, "w", lease_s=30)
        repo.finish_job(
            s, bad, job.attempt, JobStatus.FAILED, error_code="diverged", error_message="loss went NaN"
        )
    service.work()
    done = service.get(sweep["id"])
    assert done["status"] == "succeeded"  # a failed child is not a failed sweep
    rows = {r["method"]: r for r in done["leaderboard"]["rows"]}
    assert rows["s2h"]["status"] == "failed" and rows["s2h"]["rank"] is None
    assert rows["s2h"]["error"] == {"code": "diverged", "message": "loss went NaN"}
    assert rows["magnitude"]["status"] == "succeeded" and rows["magnitude"]["rank"] == 1
    assert done["winner"] == rows["magnitude"]["job_id"] and rows["magnitude"]["pareto"]


def test_children_count_against_the_owners_queued_quota(service: Service, tmp_path: Path) -> None:
    service.settings.quota_queued_jobs = 2  # the app reads the same settings object
    no_dense = BASE | {"schedule": BASE["schedule"] | {"dense_epochs": 0}}
    r = service.client.post(
        "/v1/sweeps", json={"spec": no_dense, "methods": ["magnitude", "psap", "epi"]}, headers=service.a
    )
    assert_problem(r, 429)
    service.submit({"spec": no_dense, "methods": ["magnitude", "psap"]})  # two fit


def test_the_sweep_ends_when_its_last_child_ends_whoever_notices(service: Service) -> None:
    """A worker killed after its job ended but before it moved the sweep on: the reaper's pass ends it."""
    no_dense = BASE | {"schedule": BASE["schedule"] | {"dense_epochs": 0}}
    sweep = service.submit({"spec": no_dense, "methods": ["magnitude", "s2h"]})
    with db.session_scope(service.engine) as s:
        for j in sweep["jobs"]:
            job = repo.claim_job(s, j["id"], "w", lease_s=30)
            repo.finish_job(s, j["id"], job.attempt, JobStatus.FAILED, error_code="x", error_message="y")
    assert service.get(sweep["id"])["status"] == "running"  # no worker moved it on
    advance_open(service.engine, service.settings, lambda _id: None)
    done = service.get(sweep["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "no_child_succeeded"
    assert [r["error"]["code"] for r in done["leaderboard"]["rows"]] == ["x", "x"]
    advance_open(service.engine, service.settings, lambda _id: None)  # again: nothing changes
    with db.read_sessions(service.engine)() as s:
        assert sweeps.open_sweep_ids(s) == []


class _Crash(BaseException):
    """Stands in for a worker dying mid-job: nothing in execute() handles it."""


def test_a_child_whose_worker_dies_resumes_and_the_sweep_still_ends(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = service.submit(
        {"spec": BASE, "methods": ["magnitude"], "targets": [{"macs_ratio": 0.5}, {"macs_ratio": 0.3}]}
    )
    (dense,) = service.work(limit=1)  # the dense job alone; it creates the two children
    children = [j["id"] for j in service.get(sweep["id"])["jobs"] if j["role"] == "child"]
    assert len(children) == 2 and dense not in children
    real_step = StoreReporter.step

    def dying_step(self: StoreReporter, phase: str, epoch: int, step: int, loss: float) -> None:
        real_step(self, phase, epoch, step, loss)
        if epoch >= 1:
            raise _Crash

    monkeypatch.setattr(StoreReporter, "step", dying_step)
    with pytest.raises(_Crash):
        execute(children[0], worker_name="doomed", settings=service.settings)
    monkeypatch.setattr(StoreReporter, "step", real_step)
    with db.session_scope(service.engine) as s:  # its lease runs out
        s.execute(
            update(Job).where(Job.id == children[0]).values(lease_until=utcnow() - timedelta(seconds=1))
        )
    reap_once(service.engine, lambda _id: None, service.settings)
    advance_open(service.engine, service.settings, lambda _id: None)
    assert service.get(sweep["id"])["status"] == "running"  # a child is queued again, not lost

    service.work()
    done = service.get(sweep["id"])
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 3
    rows = {r["job_id"]: r for r in done["leaderboard"]["rows"]}
    assert set(rows) == set(children) and all(r["status"] == "succeeded" for r in rows.values())
    resumed = service.client.get(f"/v1/jobs/{children[0]}", headers=service.a).json()
    assert resumed["attempt"] == 2
    assert rows[children[0]]["top1"] == service.report(children[0])["pruned"]["top1"]


def test_sweep_events_sum_the_jobs_progress(service: Service) -> None:
    no_dense = BASE | {"schedule": BASE["schedule"] | {"dense_epochs": 0, "epochs": 1}}
    sweep = service.submit({"spec": no_dense, "methods": ["magnitude", "s2h"]})
    first, second = (j["id"] for j in sweep["jobs"])
    with db.session_scope(service.engine) as s:
        job = repo.claim_job(s, first, "w", lease_s=30)
        repo.heartbeat(s, first, job.attempt, 30, progress=0.5)
    snap = service.client.get(f"/v1/sweeps/{sweep['id']}/events", headers=service.a).json()
    assert snap["progress"] == pytest.approx(0.25) and snap["counts"]["running"] == 1
    with db.session_scope(service.engine) as s:
        repo.finish_job(s, first, job.attempt, JobStatus.FAILED, error_code="x", error_message="y")
        repo.request_cancel(s, second)
    advance_open(service.engine, service.settings, lambda _id: None)
    with service.client.stream(
        "GET", f"/v1/sweeps/{sweep['id']}/events", headers=service.a | {"Accept": "text/event-stream"}
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith(("event:", "data:"))]
    assert lines[0] == "event: status"
    last = json.loads(lines[1].removeprefix("data:").strip())
    assert last["status"] == "failed" and last["progress"] == 1.0  # neither child succeeded


# --- SDK and CLI, against the same in-process API ---


@pytest.fixture
def sdk_on_service(service: Service, monkeypatch: pytest.MonkeyPatch) -> Client:
    """``Client`` (and the CLI's) talking to the in-process API."""
    transport = service.client._transport
    key = service.a["Authorization"].removeprefix("Bearer ")
    monkeypatch.setattr(cli, "Client", functools.partial(Client, transport=transport))
    monkeypatch.setenv("PRUNE_API_KEY", key)
    monkeypatch.setenv("PRUNE_URL", "http://testserver")
    with Client(transport=transport) as c:
        yield c


def test_sdk_sweep_and_its_listing(service: Service, sdk_on_service: Client) -> None:
    no_dense = BASE | {"schedule": BASE["schedule"] | {"dense_epochs": 0, "epochs": 1}}
    sweep = sdk_on_service.sweep(no_dense, ["magnitude"], [0.5, "0.4"], rank_by="speedup")
    assert [j.target for j in sweep.jobs] == [{"macs_ratio": 0.5}, {"macs_ratio": 0.4}]
    assert [s.id for s in sdk_on_service.sweeps()] == [sweep.id]
    service.work()
    done = sdk_on_service.wait_sweep(sweep.id, timeout=5)
    assert done.status == "succeeded" and done.rank_by == "speedup"
    names = [a.name for a in sdk_on_service.sweep_artifacts(sweep.id)]
    assert names[:2] == ["leaderboard.json", "sweep.html"]
    (last,) = list(sdk_on_service.sweep_events(sweep.id))
    assert last.kind == "status" and last.data.winner == done.winner
    with pytest.raises(ApiError) as err:
        sdk_on_service.get_sweep("0" * 32)
    assert err.value.status == 404


def test_cli_sweep_watch_shows_the_jobs_then_the_leaderboard(
    service: Service, sdk_on_service: Client, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = tmp_path / "digits.yaml"
    spec.write_text(json.dumps(BASE | {"schedule": BASE["schedule"] | {"epochs": 1}}))
    assert cli.main(["sweep", str(spec), "--methods", "magnitude,s2h", "--targets", "0.5"]) == 0
    sweep_id = capsys.readouterr().out.split()[0]
    codes: list[int] = []
    watcher = threading.Thread(target=lambda: codes.append(cli.main(["sweeps", "watch", sweep_id])))
    watcher.start()
    service.work()
    watcher.join(60)
    out = capsys.readouterr().out
    assert codes == [0], out
    assert "(dense training)" in out and "ROLE" in out  # the live table of its jobs
    assert "RANK" in out and "SPEED-UP [95%]" in out and "winner by top1:" in out
    board = service.get(sweep_id)["leaderboard"]
    for row in board["rows"]:
        assert f"{row['top1']:.2f} (n=50)" in out
    assert cli.main(["sweeps"]) == 0 and sweep_id in capsys.readouterr().out
    r = cli.main(["sweep", str(spec), "--targets", "half"])
    assert r == 2 and "target 'half'" in capsys.readouterr().err


def test_a_failed_dense_job_ends_the_sweep_with_every_child_a_row(service: Service) -> None:
    sweep = service.submit({"spec": BASE, "methods": ["magnitude", "s2h"]})
    dense = sweep["jobs"][0]["id"]
    with db.session_scope(service.engine) as s:
        job = repo.claim_job(s, dense, "w", lease_s=30)
        repo.finish_job(s, dense, job.attempt, JobStatus.FAILED, error_code="bad_data", error_message="no")
    advance_open(service.engine, service.settings, lambda _id: None)
    done = service.get(sweep["id"])
    assert done["status"] == "failed" and done["error"] == {"code": "dense_failed", "message": "no"}
    assert [(r["method"], r["status"]) for r in done["leaderboard"]["rows"]] == [
        ("magnitude", "failed"),
        ("s2h", "failed"),
    ]
    assert done["leaderboard"]["winner"] is None and done["winner"] is None


def test_cancelling_the_last_child_as_a_job_ends_the_sweep(service: Service) -> None:
    no_dense = BASE | {"schedule": BASE["schedule"] | {"dense_epochs": 0}}
    sweep = service.submit({"spec": no_dense, "methods": ["magnitude"]})
    (child,) = (j["id"] for j in sweep["jobs"])
    r = service.client.post(f"/v1/jobs/{child}/cancel", headers=service.a)
    assert r.status_code == 202 and r.json()["sweep_id"] == sweep["id"]
    done = service.get(sweep["id"])
    assert done["status"] == "cancelled" and done["leaderboard"]["rows"][0]["status"] == "cancelled"


def test_the_sweep_flow_on_postgresql(pg_service: Service) -> None:
    """Submit, a child that fails, isolation, cancel, the end computed from the rows: on PostgreSQL."""
    service = pg_service
    no_dense = BASE | {"schedule": BASE["schedule"] | {"dense_epochs": 0}}
    sweep = service.submit({"spec": no_dense, "methods": ["magnitude", "psap", "epi"]})
    assert_problem(service.client.get(f"/v1/sweeps/{sweep['id']}", headers=service.b), 404)
    first, *_ = (j["id"] for j in sweep["jobs"])
    with db.session_scope(service.engine) as s:
        job = repo.claim_job(s, first, "w", lease_s=30)
        repo.finish_job(s, first, job.attempt, JobStatus.FAILED, error_code="x", error_message="y")
    r = service.client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=service.a)
    done = r.json()
    assert done["status"] == "cancelled" and done["counts"] | {"planned": 0} == {
        "queued": 0,
        "running": 0,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 2,
        "planned": 0,
    }
    rows = done["leaderboard"]["rows"]
    assert [r["status"] for r in rows] == ["failed", "cancelled", "cancelled"]
    assert rows[0]["error"] == {"code": "x", "message": "y"}


def test_a_sweep_through_celery_workers_on_redis(
    pg_url: str, redis_url: str, tmp_path: Path, procs: Any
) -> None:
    """The deployed path: a real Celery worker process runs the dense job, its ``after_job`` creates the
    children and sends them through Redis (``broker_enqueue``), the worker runs them and the last one
    ends the sweep, with no reaper pass."""
    from api.sweep_plan import SweepIn, plan
    from pruning_core.spec import JobSpec
    from tests.faultkit import celery_stack, wait_for

    body = SweepIn(spec=JobSpec.model_validate(BASE), methods=["magnitude", "epi"])
    children, dense, errors = plan(body)
    assert not errors and dense is not None
    with celery_stack(pg_url, redis_url, tmp_path, procs, {}) as (settings, engine, _send, enqueue):
        with db.session_scope(engine) as s:
            sweep, ids = sweeps.create_sweep(
                s, "alice", body.model_dump(mode="json"), "top1", children, dense
            )
            sweep_id = sweep.id
        assert len(ids) == 1  # the dense job alone; the children follow from its weights
        enqueue(ids[0])
        procs.celery_worker("w1")

        def ended() -> dict[str, Any] | None:
            with db.session_scope(engine) as s:
                row = s.get(Sweep, sweep_id)
                if row is None or row.status == "running":
                    return None
                return {
                    "status": row.status,
                    "error": row.error_code,
                    "board": row.leaderboard,
                    "winner": row.winner_job_id,
                }

        try:
            done = wait_for(ended, 240, "the sweep to end")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{procs.logs()}") from None
        with db.session_scope(engine) as s:
            jobs = sweeps.sweep_jobs(s, sweep_id)
            workers = {(j.method, j.status, (j.worker or "").split("@")[0]) for j in jobs}
            ids_all = [j.id for j in jobs]
    assert (done["status"], done["error"]) == ("succeeded", None)
    assert workers == {("magnitude", "succeeded", "w1"), ("epi", "succeeded", "w1")} and len(jobs) == 3
    rows = done["board"]["rows"]
    assert sorted(r["method"] for r in rows) == ["epi", "magnitude"]
    assert all(r["status"] == "succeeded" and r["top1"] is not None for r in rows)
    assert done["winner"] in set(ids_all[1:])
