"""The webhook pump: POSTs the job resource of every ended job with ``notify`` to its URL.

Deliveries come from the outbox (``store.webhooks``), written in the transaction that ended the job, so
they survive any process restarting: the pump (a thread of the reaper, ``python -m worker.reaper``, and
of the local runner) claims a due row for a while, posts, and records the attempt; a 2xx ends it, any
other answer or error waits ``WEBHOOK_BACKOFF_S`` doubled after each failure, up to
``WEBHOOK_MAX_ATTEMPTS``. A pump that dies mid-attempt leaves its claim to lapse and the row is tried
again (receivers must expect a delivery more than once: ``X-Pruning-Delivery`` names it).

Every connection is checked as it is made (``GuardedBackend``): each address the host resolves to must
be global or inside WEBHOOK_ALLOW, and the socket goes to an address so checked, so a name that
resolved to a public address at submit cannot be rebound to 127.0.0.1 since. Redirects are not
followed, proxies from the environment not used.

Signature (docs/webhooks.md): ``X-Pruning-Signature: sha256=<hex HMAC-SHA256(secret, "<ts>." + body)>``
with ``X-Pruning-Timestamp: <ts>`` (Unix seconds).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from sqlalchemy import Engine

from pruning_core.settings import Settings
from store import repo, webhooks
from store.db import read_sessions, session_scope
from store.models import DeliveryStatus, Job, WebhookDelivery, utcnow
from store.resources import job_out

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Pruning-Signature"
TIMESTAMP_HEADER = "X-Pruning-Timestamp"
EVENT_HEADER = "X-Pruning-Event"
DELIVERY_HEADER = "X-Pruning-Delivery"
USER_AGENT = "pruning-service-webhook/1"
POLL_S = 2.0  # how often the pump looks for due deliveries
BATCH = 20  # deliveries one pass tries at most


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float = 300.0) -> bool:
    """What a receiver checks: the signature matches (in constant time) and the timestamp is within
    ``tolerance_s`` of now (a replayed old delivery fails)."""
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's network backend, connecting only to addresses ``store.webhooks`` allows: the host is
    resolved here, every address checked, and the socket opened to a checked address (TLS still
    verifies the certificate against the host name)."""

    def __init__(self, allow: Sequence[str]):
        self.allow = tuple(allow)
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        ips = webhooks.checked_addresses(host, port, self.allow)
        last: Exception | None = None
        for ip in ips:
            try:
                return self.inner.connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as err:
                last = err
        raise last or httpcore.ConnectError(f"could not connect to {host}")

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None):
        raise httpcore.ConnectError("webhooks go over TCP only")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def http_client(settings: Settings) -> httpx.Client:
    """An httpx client whose every connection goes through ``GuardedBackend``."""
    transport = httpx.HTTPTransport(retries=0)
    pool = transport._pool  # httpx keeps its httpcore pool here; fail closed if that ever changes
    if not hasattr(pool, "_network_backend"):
        raise RuntimeError("this httpx/httpcore cannot pin webhook connections to checked addresses")
    pool._network_backend = GuardedBackend(settings.webhook_allow)
    timeout = httpx.Timeout(settings.webhook_timeout_s)
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False)


def post(
    client: httpx.Client, url: str, body: bytes, secret: str | None, event: str, delivery_id: str
) -> tuple[int | None, str | None, bool]:
    """One attempt: ``(status_code, error, permanent)``; ``permanent`` when the address was refused."""
    ts = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: ts,
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
    }
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, ts, body)
    try:
        r = client.post(url, content=body, headers=headers)
    except webhooks.AddressRefused as err:
        return None, str(err), err.permanent
    except httpx.HTTPError as err:
        return None, f"{type(err).__name__}: {err}", False
    return r.status_code, None if r.is_success else f"HTTP {r.status_code}", False


def deliver(engine: Engine, settings: Settings, delivery_id: str, client: httpx.Client) -> str | None:
    """Claim one due delivery, try it, record the attempt; returns its status after, or None if another
    pump had it (or the job was deleted meanwhile)."""
    hold_s = settings.webhook_timeout_s * 3 + 30  # past any attempt (connect, write, read)
    with session_scope(engine) as s:
        d = webhooks.claim_delivery(s, delivery_id, hold_s)
        job = s.get(Job, d.job_id) if d is not None else None
        if d is None or job is None:
            return None
        body = job_out(job).model_dump_json().encode()
        url, event, secret, job_id = d.url, d.event, job.notify_secret, job.id
    at = utcnow()
    code, error, permanent = post(client, url, body, secret, event, delivery_id)
    with session_scope(engine) as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None:
            return None
        webhooks.record_attempt(
            s,
            d,
            at=at,
            status_code=code,
            error=error,
            max_attempts=settings.webhook_max_attempts,
            base_backoff_s=settings.webhook_backoff_s,
            final=permanent,
        )
        status = d.status
        if status != DeliveryStatus.PENDING:
            delivered = status == DeliveryStatus.DELIVERED
            repo.bump_counter(s, repo.WEBHOOKS_DELIVERED if delivered else repo.WEBHOOKS_FAILED)
    host = urlsplit(url).hostname  # never the whole URL (its query may hold a token), never the secret
    log.info("job %s: webhook to %s, attempt %d: %s (%s)", job_id, host, d.attempts, code or error, status)
    return status


def drain_once(engine: Engine, settings: Settings, client: httpx.Client | None = None) -> dict[str, int]:
    """Try every delivery due now (at most ``BATCH``); counts of the statuses they ended the pass in."""
    with read_sessions(engine)() as s:
        due = webhooks.due_deliveries(s, BATCH)
    counts: dict[str, int] = {}
    if not due:
        return counts
    own = client is None
    client = client or http_client(settings)
    try:
        for delivery_id in due:
            status = deliver(engine, settings, delivery_id, client)
            if status is not None:
                counts[status] = counts.get(status, 0) + 1
    finally:
        if own:
            client.close()
    return counts


def run_forever(engine: Engine, settings: Settings, stop: threading.Event, poll_s: float = POLL_S) -> None:
    """Drain due deliveries every ``poll_s`` until ``stop``; a failed pass (database down) is retried."""
    while not stop.is_set():
        try:
            drain_once(engine, settings)
        except Exception:
            log.warning("webhook pass failed", exc_info=True)
        stop.wait(poll_s)


def start_pump(engine: Engine, settings: Settings, stop: threading.Event) -> threading.Thread:
    """``run_forever`` in a daemon thread (deliveries never hold up the reaper's passes)."""
    thread = threading.Thread(
        target=run_forever, args=(engine, settings, stop), name="webhook-pump", daemon=True
    )
    thread.start()
    return thread
