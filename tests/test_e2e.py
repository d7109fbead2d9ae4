"""End to end with the real parts: a uvicorn server, a Celery worker process, PostgreSQL and Redis; and
the same flow in embedded mode (SQLite, local runner). A digits job is submitted over HTTP, runs, streams
its events, and its artifacts download with a matching sha256; the exported model loads and its MACs
match report.json."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from bench.stack import free_port, process, wait_ready, worker_command
from pruning_core.artifacts.export import load_pruned
from pruning_core.graph.macs import count_macs

KEY = "pk_e2e_bootstrap_key_for_tests"
JOB = {
    "model": {"name": "resnet20"},
    "data": {"name": "digits"},
    "target": {"macs_ratio": 0.5},
    "schedule": {"epochs": 2, "batch_size": 64, "max_steps_per_epoch": 4},
    "export": {"formats": ["safetensors", "onnx"]},
}
LONG_JOB = {**JOB, "schedule": {"epochs": 50, "batch_size": 16}}


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"STATE_DIR": str(tmp / "state"), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", **extra}
    return env


def _stream_until_done(client: httpx.Client, job_id: str, timeout: float = 180.0) -> list[dict]:
    """Follow the SSE stream, reconnecting with Last-Event-ID, until the job is terminal."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        headers = {"Accept": "text/event-stream"}
        if events:
            headers["Last-Event-ID"] = str(events[-1]["id"])
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            current: dict = {}
            for line in r.iter_lines():
                if line.startswith("id:"):
                    current["id"] = int(line[3:].strip())
                elif line.startswith("event:"):
                    current["kind"] = line[6:].strip()
                elif line.startswith("data:"):
                    current["data"] = json.loads(line[5:].strip())
                elif not line and "id" in current:
                    events.append(current)
                    current = {}
        if client.get(f"/v1/jobs/{job_id}").json()["status"] in ("succeeded", "failed", "cancelled"):
            return events
    raise AssertionError("the job did not finish in time")


def _check_finished_job(client: httpx.Client, job_id: str, events: list[dict], dest: Path) -> None:
    assert [e["id"] for e in events] == list(range(1, len(events) + 1)), "events are numbered 1..n, none lost"
    kinds = {e["kind"] for e in events}
    assert {"status", "phase", "epoch"} <= kinds
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    arts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
    assert {"model.safetensors", "architecture.json", "report.json", "report.html", "model.onnx"} <= set(arts)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "architecture.json", "report.json", "report.html"):
        r = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert r.status_code == 200
        digest = hashlib.sha256(r.content).hexdigest()
        assert digest == arts[name]["sha256"]
        assert r.headers["etag"].strip('"') == digest
        assert base64.b64decode(r.headers["repr-digest"].split(":")[1]) == bytes.fromhex(digest)
        (dest / name).write_bytes(r.content)
    page = client.get(f"/v1/jobs/{job_id}/artifacts/report.html")
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-disposition"].startswith("attachment")  # downloaded, not run on our origin
    report = json.loads((dest / "report.json").read_text())
    model = load_pruned(dest)
    assert count_macs(model, torch.zeros(1, 1, 8, 8)) == report["pruned"]["macs"]
    assert abs(report["achieved_macs_ratio"] - 0.5) <= 0.02


def test_embedded_mode_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = _env(tmp_path, PORT=str(port), AUTH_DISABLED="1")
    with process([sys.executable, "-m", "api"], env, tmp_path / "api.log") as api:
        wait_ready(base, api, tmp_path / "api.log")
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/v1/jobs", json=JOB)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            events = _stream_until_done(c, job_id)
            _check_finished_job(c, job_id, events, tmp_path / "dl")
    # JOB gives no weights and no dense epochs: the user is told over HTTP that magnitude prunes at random
    texts = [e["data"].get("text", "") for e in events if e["kind"] == "message"]
    assert any(t.startswith("warning: magnitude ranks channels") for t in texts), texts


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A migrated PostgreSQL database, uvicorn on a free port, Redis; the worker is started by the test."""
    port = free_port()
    env = _env(tmp_path, DATABASE_URL=pg_url, REDIS_URL=redis_url, BOOTSTRAP_API_KEY=KEY, LEASE_S="20")
    subprocess.run([sys.executable, "-m", "store", "migrate"], env=env, check=True, capture_output=True)
    server = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "api.app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with process(server, env, tmp_path / "api.log") as api:
        wait_ready(f"http://127.0.0.1:{port}", api, tmp_path / "api.log")
        yield f"http://127.0.0.1:{port}", env


def _worker(env: dict[str, str], tmp: Path, name: str):
    return process(worker_command(name), env, tmp / f"{name}.log")


def _wait_status(c: httpx.Client, job_id: str, wanted: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in wanted:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {wanted}: {job}")


def test_real_stack_end_to_end_and_cancel(stack, tmp_path: Path) -> None:
    base, env = stack
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        # cancel while queued: no worker is running yet
        queued = c.post("/v1/jobs", json=JOB).json()
        assert c.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 202
        assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"

        with _worker(env, tmp_path, "w1"):
            job_id = c.post("/v1/jobs", json=JOB).json()["id"]
            events = _stream_until_done(c, job_id)
            _check_finished_job(c, job_id, events, tmp_path / "dl")

            # cancel while running: wait for its first epoch, then cancel
            long_id = c.post("/v1/jobs", json=LONG_JOB).json()["id"]
            _wait_status(c, long_id, {"running"})
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                page = c.get(f"/v1/jobs/{long_id}/events", params={"after": 0}).json()["items"]
                if any(e["kind"] == "epoch" for e in page):
                    break
                time.sleep(0.5)
            assert c.post(f"/v1/jobs/{long_id}/cancel").status_code == 202
            done = _wait_status(c, long_id, {"cancelled", "failed", "succeeded"}, timeout=60)
            assert done["status"] == "cancelled", done
        # the cancelled queued job never ran
        assert c.get(f"/v1/jobs/{queued['id']}").json()["attempt"] == 0
