# ruff: noqa: F811 (the fixtures imported from test_api are arguments of the tests by name)
"""Webhooks of ended jobs (issue 31): the spec's `notify`, its write-only secret, the address policy
(at submit and at delivery), the outbox drained by the pump, signatures, retries with backoff.

A receiver on 127.0.0.1 (allowed through WEBHOOK_ALLOW) records what it gets. No worker runs: jobs end
through store.repo, as a worker would, and the pump's pass (``drain_once``) is called directly.
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest
from sqlalchemy import select, update

from pruning_core.settings import Settings
from store import db, repo, webhooks
from store.models import Job, JobStatus, WebhookDelivery
from tests.test_api import DIGITS, Api, assert_problem, make_api  # noqa: F401 (fixtures)
from worker.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    drain_once,
    sign,
    verify,
)

SECRET = "s3cret-s3cret-s3cret"
LOOPBACK = ("127.0.0.1/32",)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 answering each POST with the next of ``codes`` (then 200)."""

    codes: list[int] = field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=abc"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            rec.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(rec.codes.pop(0) if rec.codes else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


def _notify_spec(url: str, secret: str | None = SECRET) -> dict:
    notify: dict[str, Any] = {"url": url}
    if secret is not None:
        notify["secret"] = secret
    return DIGITS | {"notify": notify}


def _end(api: Api, job_id: str, status: JobStatus = JobStatus.SUCCEEDED) -> None:
    with db.session_scope(api.engine) as s:
        job = repo.claim_job(s, job_id, "test-worker", lease_s=60)
        assert repo.finish_job(s, job_id, job.attempt, status, result={"achieved_macs_ratio": 0.5})


def _drain(api: Api, settings: Settings | None = None, passes: int = 10) -> None:
    """Pump passes until nothing is due; waits out each backoff (tiny in these tests)."""
    for _ in range(passes):
        drain_once(api.engine, settings or api.settings)
        time.sleep(0.05)


def _deliveries(api: Api, job_id: str) -> list[dict]:
    r = api.client.get(f"/v1/jobs/{job_id}/deliveries", headers=api.a)
    assert r.status_code == 200, r.text
    return r.json()["items"]


@pytest.fixture
def hook_api(make_api, sqlite_url: str) -> Api:
    return make_api(sqlite_url, webhook_allow=LOOPBACK, webhook_backoff_s=0.01, webhook_max_attempts=5)


# --- the spec and the address policy at submit ---


def test_private_address_refused_without_webhook_allow(make_api, sqlite_url: str, receiver) -> None:
    api = make_api(sqlite_url)
    c = api.client
    for url in (receiver.url, "http://10.1.2.3/h", "http://169.254.169.254/latest", "http://[::1]:8/x"):
        body = assert_problem(c.post("/v1/jobs", json=_notify_spec(url), headers=api.a), 422)
        assert [e["field"] for e in body["errors"]] == ["notify.url"], url
        assert "WEBHOOK_ALLOW" in body["errors"][0]["message"]
    body = assert_problem(c.post("/v1/jobs", json=_notify_spec("ftp://example.com/"), headers=api.a), 422)
    assert body["errors"][0]["field"] == "notify.url"
    with db.session_scope(api.engine) as s:
        assert s.scalar(select(Job.id)) is None  # nothing was queued


def test_secret_is_required_and_write_only(hook_api: Api, receiver: Receiver, caplog) -> None:
    api, c = hook_api, hook_api.client
    body = assert_problem(c.post("/v1/jobs", json=_notify_spec(receiver.url, None), headers=api.a), 422)
    assert [e["field"] for e in body["errors"]] == ["notify.secret"]
    r = c.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["spec"]["notify"] == {"url": receiver.url}
    assert SECRET not in r.text and SECRET not in c.get(job["urls"]["self"], headers=api.a).text
    assert SECRET not in c.get("/v1/jobs", headers=api.a).text
    with db.session_scope(api.engine) as s:
        row = s.get(Job, job["id"])
        assert SECRET not in json.dumps(row.spec) and row.notify_secret == SECRET
    _end(api, job["id"])
    _drain(api, passes=2)
    assert SECRET not in receiver.got[0][1].decode()
    assert SECRET not in caplog.text
    # a rerun keeps the secret unless it is given
    again = c.post(f"/v1/jobs/{job['id']}/rerun", headers=api.a).json()
    other = c.post(
        f"/v1/jobs/{job['id']}/rerun", json={"notify": {"secret": "another-secret-1234"}}, headers=api.a
    ).json()
    with db.session_scope(api.engine) as s:
        assert s.get(Job, again["id"]).notify_secret == SECRET
        assert s.get(Job, other["id"]).notify_secret == "another-secret-1234"
    assert other["spec"]["notify"] == {"url": receiver.url}
    dropped = c.post(f"/v1/jobs/{job['id']}/rerun", json={"notify": None}, headers=api.a).json()
    assert "notify" not in dropped["spec"]
    with db.session_scope(api.engine) as s:
        assert s.get(Job, dropped["id"]).notify_secret is None


def test_address_allowed() -> None:
    refused = [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
    ]
    refused += ["::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "224.0.0.1"]
    for ip in refused:
        assert not webhooks.address_allowed(ip_address(ip)), ip
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert webhooks.address_allowed(ip_address(ip)), ip
    assert webhooks.address_allowed(ip_address("127.0.0.1"), LOOPBACK)
    assert webhooks.address_allowed(ip_address("::ffff:127.0.0.1"), LOOPBACK)
    assert not webhooks.address_allowed(ip_address("127.0.0.2"), LOOPBACK)
    assert webhooks.url_problem("http://localhost:1/x") is not None  # a name is judged by its addresses
    assert webhooks.url_problem("http://no-such-host.invalid/x") is not None


def test_webhook_allow_is_a_cidr_list(monkeypatch) -> None:
    monkeypatch.setenv("WEBHOOK_ALLOW", "127.0.0.1, 10.0.0.0/8 ,")
    assert Settings().webhook_allow == ("127.0.0.1/32", "10.0.0.0/8")
    monkeypatch.setenv("WEBHOOK_ALLOW", "not-a-network")
    with pytest.raises(ValueError):
        Settings()


# --- delivery ---


def test_delivered_signed_after_retries_then_stops(hook_api: Api, receiver: Receiver) -> None:
    api = hook_api
    receiver.codes = [500, 503]  # then 200
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    _drain(api, passes=2)
    assert receiver.got == [] and _deliveries(api, job["id"]) == []  # nothing until the job ends
    _end(api, job["id"])
    _drain(api)
    assert len(receiver.got) == 3  # 500, 503, 200: and not one more after the 2xx

    headers, body = receiver.got[-1]
    ts, signature = headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()]
    assert signature == sign(SECRET, ts, body) and verify(SECRET, ts, body, signature)
    assert not verify(SECRET, ts, body.replace(b"succeeded", b"failed"), signature)  # tampered body
    assert not verify(SECRET, str(int(ts) + 1), body, signature)  # another timestamp
    assert not verify("wrong-secret-wrong", ts, body, signature)
    assert not verify(
        SECRET, str(int(time.time()) - 3600), body, sign(SECRET, str(int(time.time()) - 3600), body)
    )
    assert headers[EVENT_HEADER.lower()] == "job.succeeded"
    assert len({h[DELIVERY_HEADER.lower()] for h, _ in receiver.got}) == 1  # one delivery, three tries
    resource = json.loads(body)
    assert resource == api.client.get(job["urls"]["self"], headers=api.a).json()  # the job resource
    assert resource["status"] == "succeeded"

    (d,) = _deliveries(api, job["id"])
    assert d["status"] == "delivered" and d["attempts"] == 3 and d["event"] == "job.succeeded"
    assert [a["status_code"] for a in d["log"]] == [500, 503, 200]
    assert d["log"][0]["error"] == "HTTP 500" and d["log"][2]["error"] is None
    assert d["next_attempt_at"] is None and d["finished_at"]
    metrics = api.client.get("/metrics", headers=api.a).text
    assert "webhook_deliveries_delivered_total 1.0" in metrics


def test_attempts_are_bounded(make_api, sqlite_url: str, receiver: Receiver) -> None:
    api = make_api(sqlite_url, webhook_allow=LOOPBACK, webhook_backoff_s=0.01, webhook_max_attempts=3)
    receiver.codes = [500] * 10
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    _end(api, job["id"], JobStatus.FAILED)
    _drain(api)
    assert len(receiver.got) == 3
    (d,) = _deliveries(api, job["id"])
    assert d["status"] == "failed" and d["attempts"] == 3 and d["event"] == "job.failed"
    assert "webhook_deliveries_failed_total 1.0" in api.client.get("/metrics", headers=api.a).text


def test_backoff_doubles() -> None:
    assert [webhooks.backoff_s(n, 10) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert webhooks.backoff_s(30, 10) == webhooks.MAX_BACKOFF_S


def test_backoff_holds_the_next_attempt(make_api, sqlite_url: str, receiver: Receiver) -> None:
    api = make_api(sqlite_url, webhook_allow=LOOPBACK, webhook_backoff_s=3600)
    receiver.codes = [502]
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    _end(api, job["id"])
    _drain(api, passes=3)
    assert len(receiver.got) == 1  # the second attempt waits an hour
    (d,) = _deliveries(api, job["id"])
    assert d["status"] == "pending" and d["next_attempt_at"] and d["log"][0]["status_code"] == 502


def test_address_checked_again_at_delivery(hook_api: Api, receiver: Receiver) -> None:
    """Allowed at submit, refused when it is sent (as a name rebound to a private address would be):
    nothing reaches the receiver, and the refusal is recorded, not retried."""
    api = hook_api
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    _end(api, job["id"])
    _drain(api, api.settings.model_copy(update={"webhook_allow": ()}))
    assert receiver.got == []
    (d,) = _deliveries(api, job["id"])
    assert d["status"] == "failed" and d["attempts"] == 1
    assert d["log"][0]["status_code"] is None and "not a global address" in d["log"][0]["error"]


def test_cancelled_and_unreachable(hook_api: Api, receiver: Receiver) -> None:
    api = hook_api
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.a).json()["status"] == "cancelled"
    # a receiver that is down: a connection error, tried again
    down = _notify_spec("http://127.0.0.1:9/hook")
    job2 = api.client.post("/v1/jobs", json=down, headers=api.a).json()
    api.client.post(f"/v1/jobs/{job2['id']}/cancel", headers=api.a)
    _drain(api, passes=3)
    assert [h[EVENT_HEADER.lower()] for h, _ in receiver.got] == ["job.cancelled"]
    (d,) = _deliveries(api, job2["id"])
    assert d["attempts"] >= 2 and d["log"][0]["status_code"] is None and "Connect" in d["log"][0]["error"]


def test_outbox_survives_a_restart(hook_api: Api, receiver: Receiver, sqlite_url: str) -> None:
    """The delivery is a row written with the job's end: a pump started later (another process, after
    a restart) sends it; one that claimed it and died leaves it to be sent once its claim lapses."""
    api = hook_api
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    _end(api, job["id"])
    with db.session_scope(api.engine) as s:  # a pump claims it, then dies before posting
        (delivery_id,) = webhooks.due_deliveries(s)
        assert webhooks.claim_delivery(s, delivery_id, hold_s=3600) is not None
    engine = db.make_engine(sqlite_url)  # "after the restart": a fresh engine, as a new process has
    try:
        drain_once(engine, api.settings)
        assert receiver.got == []  # claimed: not sent twice at once
        with db.session_scope(engine) as s:  # the claim lapses
            s.execute(update(WebhookDelivery).values(next_at=WebhookDelivery.created_at))
        drain_once(engine, api.settings)
    finally:
        engine.dispose()
    assert len(receiver.got) == 1 and _deliveries(api, job["id"])[0]["status"] == "delivered"


def test_deleting_a_job_drops_its_deliveries(hook_api: Api, receiver: Receiver) -> None:
    api = hook_api
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    _end(api, job["id"])
    assert api.client.delete(job["urls"]["self"], headers=api.a).status_code == 204
    with db.session_scope(api.engine) as s:
        assert s.scalar(select(WebhookDelivery.id)) is None
    _drain(api, passes=2)
    assert receiver.got == []
    assert_problem(api.client.get(f"/v1/jobs/{job['id']}/deliveries", headers=api.b), 404)


def test_postgres_outbox(make_api, pg_url: str, receiver: Receiver) -> None:
    api = make_api(pg_url, webhook_allow=LOOPBACK, webhook_backoff_s=0.01)
    receiver.codes = [500]
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    _end(api, job["id"])
    _drain(api, passes=4)
    (d,) = _deliveries(api, job["id"])
    assert d["status"] == "delivered" and [a["status_code"] for a in d["log"]] == [500, 200]
    with db.session_scope(api.engine) as s:
        assert s.get(Job, job["id"]).status == JobStatus.SUCCEEDED


def test_a_sweep_refuses_notify(hook_api: Api, receiver: Receiver) -> None:
    body = {"spec": _notify_spec(receiver.url), "methods": ["magnitude"]}
    problem = assert_problem(hook_api.client.post("/v1/sweeps", json=body, headers=hook_api.a), 422)
    assert "spec.notify" in [e["field"] for e in problem["errors"]]


def test_the_pump_thread_delivers(hook_api: Api, receiver: Receiver) -> None:
    """The reaper and the local runner start this thread: it delivers without anyone calling it."""
    from worker.webhooks import start_pump

    api = hook_api
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    stop = threading.Event()
    thread = start_pump(api.engine, api.settings, stop)
    try:
        _end(api, job["id"])
        deadline = time.monotonic() + 20
        while not receiver.got and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(10)
    assert len(receiver.got) == 1 and not thread.is_alive()


def test_the_readme_snippet_verifies_a_delivery(hook_api: Api, receiver: Receiver) -> None:
    """The receiver's check the docs show (docs/webhooks.md) accepts a real delivery and refuses a tampered one."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "webhooks.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", page, re.S) if "X-Pruning-Signature" in c]
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 (the project's own docs)
    api = hook_api
    job = api.client.post("/v1/jobs", json=_notify_spec(receiver.url), headers=api.a).json()
    _end(api, job["id"])
    _drain(api, passes=2)
    (headers, body), secret = receiver.got[0], SECRET
    as_sent = {
        "X-Pruning-Timestamp": headers["x-pruning-timestamp"],
        "X-Pruning-Signature": headers["x-pruning-signature"],
    }
    assert scope["verify"](secret, as_sent, body)
    assert not scope["verify"](secret, as_sent, body + b" ")
    assert not scope["verify"]("x" * 20, as_sent, body)


def _fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Resolve the names in ``answers`` to the next address of their list (the last one repeats);
    others as usual. Returns the names looked up, in order."""
    import socket

    real, looked = socket.getaddrinfo, []

    def fake(host: str, port: Any, *args: Any, **kw: Any) -> list:
        if host not in answers:
            return real(host, port, *args, **kw)
        looked.append(host)
        ip = answers[host].pop(0) if len(answers[host]) > 1 else answers[host][0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return looked


def test_a_name_rebound_to_loopback_after_submit_reaches_nothing(
    make_api, sqlite_url: str, receiver: Receiver, monkeypatch
) -> None:
    """DNS rebinding: public at submit, 127.0.0.1 when sent. The connection is made only to an address
    checked as it is made, so nothing reaches the receiver on loopback."""
    api = make_api(sqlite_url, webhook_backoff_s=0.01)  # no WEBHOOK_ALLOW
    looked = _fake_dns(monkeypatch, {"rebind.example": ["93.184.216.34", "127.0.0.1"]})
    url = f"http://rebind.example:{receiver.port}/hook"
    r = api.client.post("/v1/jobs", json=_notify_spec(url), headers=api.a)
    assert r.status_code == 201, r.text
    _end(api, r.json()["id"])
    _drain(api, passes=3)
    assert receiver.got == [] and len(looked) >= 2
    (d,) = _deliveries(api, r.json()["id"])
    assert d["status"] == "failed" and "127.0.0.1" in d["log"][0]["error"]


def test_a_name_is_connected_to_at_its_checked_address(
    hook_api: Api, receiver: Receiver, monkeypatch
) -> None:
    """The socket goes to the address the check resolved, while the request still names the host."""
    _fake_dns(monkeypatch, {"hook.test": ["127.0.0.1"]})
    url = f"http://hook.test:{receiver.port}/hook"
    job = hook_api.client.post("/v1/jobs", json=_notify_spec(url), headers=hook_api.a).json()
    _end(hook_api, job["id"])
    _drain(hook_api, passes=2)
    ((headers, _body),) = receiver.got
    assert headers["host"] == f"hook.test:{receiver.port}"
    assert _deliveries(hook_api, job["id"])[0]["status"] == "delivered"


def test_a_real_job_run_by_the_local_runner_calls_its_webhook(
    sqlite_url: str, tmp_path, receiver: Receiver, procs
) -> None:
    """End to end: ``python -m worker.local`` runs a digits job with ``notify``; its webhook pump (a
    thread of that process) posts the succeeded job, signed."""
    from tests.faultkit import done, service_env, wait_for

    db.migrate(sqlite_url)
    engine = db.make_engine(sqlite_url)
    spec = DIGITS | {"notify": {"url": receiver.url}}  # as stored: the secret apart
    with db.session_scope(engine) as s:
        job, _ = repo.create_job(s, "alice", spec, "magnitude", notify_secret=SECRET)
        job_id = job.id
    procs.env = service_env(tmp_path, DATABASE_URL=sqlite_url, WEBHOOK_ALLOW="127.0.0.1/32")
    procs.start("local", sys.executable, "-m", "worker.local")
    try:
        assert wait_for(lambda: done(engine, job_id), 180, "the job").status == "succeeded"
        wait_for(lambda: receiver.got, 30, "the webhook")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{procs.logs()}") from None
    finally:
        engine.dispose()
    ((headers, body),) = receiver.got
    assert verify(SECRET, headers["x-pruning-timestamp"], body, headers["x-pruning-signature"])
    resource = json.loads(body)
    assert resource["id"] == job_id and resource["status"] == "succeeded" and resource["result"]
    log = "".join(p.log_path.read_text(errors="replace") for p in procs.procs)
    assert "webhook to 127.0.0.1" in log and SECRET not in log
