"""Webhooks of ended jobs: which addresses a ``notify.url`` may reach, and the outbox.

The outbox is one ``WebhookDelivery`` row per ended job whose spec has ``notify``, written in the
transaction that ends the job (``store.repo``), so a delivery is never lost to a crash between the two.
The webhook pump (worker/webhooks.py, in the reaper and the local runner) claims due rows by
compare-and-set, tries them and records each attempt here.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .models import DeliveryStatus, Job, WebhookDelivery, utcnow

IPAddress = IPv4Address | IPv6Address
MAX_BACKOFF_S = 3600.0
ERROR_MAX = 300  # characters of an attempt's error kept in its log entry


class AddressRefused(Exception):
    """A webhook host that does not resolve, or (``permanent``) resolves to an address the operator did
    not allow."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


# --- where a webhook may go ---


def address_allowed(ip: IPAddress, allow: Sequence[str] = ()) -> bool:
    """Whether a webhook may connect to ``ip``: a global unicast address, or one inside a network of
    ``allow`` (CIDRs: WEBHOOK_ALLOW). IPv4-mapped IPv6 addresses are judged as their IPv4 address."""
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ip_network(net, strict=False) for net in allow):  # another IP version: never in it
        return True
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (TCP), in the resolver's order. AddressRefused if none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise AddressRefused(f"{host} does not resolve ({err})") from None
    ips = list(dict.fromkeys(ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not ips:
        raise AddressRefused(f"{host} does not resolve")
    return ips


def checked_addresses(host: str, port: int, allow: Sequence[str] = ()) -> list[IPAddress]:
    """``host``'s addresses, all of them allowed (``address_allowed``); AddressRefused naming the first
    that is not. Every address must pass: a resolver may hand out any of them on the next lookup."""
    ips = resolve(host, port)
    for ip in ips:
        if not address_allowed(ip, allow):
            raise AddressRefused(
                f"{host} resolves to {ip}, which is not a global address (an operator may allow its "
                "network with WEBHOOK_ALLOW)",
                permanent=True,
            )
    return ips


def url_problem(url: str, allow: Sequence[str] = ()) -> str | None:
    """Why a webhook may not be sent to ``url`` now (its host unresolvable or not allowed), or None."""
    parts = urlsplit(url)
    try:
        checked_addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), allow)
    except AddressRefused as err:
        return str(err)
    return None


# --- the outbox ---


def enqueue_delivery(s: Session, job_id: str) -> WebhookDelivery | None:
    """The ended job's delivery, due now, if its spec has ``notify`` (call in the transaction that ends
    it); None otherwise."""
    row = s.execute(select(Job.spec, Job.status).where(Job.id == job_id)).first()
    notify = (row.spec or {}).get("notify") if row is not None else None
    if not notify or not notify.get("url"):
        return None
    delivery = WebhookDelivery(
        job_id=job_id, event=f"job.{row.status}", url=notify["url"], next_at=utcnow(), log=[]
    )
    s.add(delivery)
    s.flush()
    return delivery


def due_deliveries(s: Session, limit: int = 20) -> list[str]:
    """Ids of pending deliveries due now, oldest due first."""
    q = select(WebhookDelivery.id).where(
        WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_at <= utcnow()
    )
    return list(s.scalars(q.order_by(WebhookDelivery.next_at, WebhookDelivery.id).limit(limit)))


def claim_delivery(s: Session, delivery_id: str, hold_s: float) -> WebhookDelivery | None:
    """Take a due delivery for ``hold_s`` seconds (compare-and-set on ``next_at``): another pump skips
    it meanwhile, and if this one dies it is due again afterwards. None if it was not due any more."""
    now = utcnow()
    res = s.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_at <= now,
        )
        .values(next_at=now + timedelta(seconds=hold_s))
    )
    if res.rowcount != 1:
        return None
    return s.get(WebhookDelivery, delivery_id, populate_existing=True)


def backoff_s(attempts: int, base_s: float) -> float:
    """The wait after the ``attempts``-th failed attempt: ``base_s``, doubled each time, at most an hour."""
    return min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempts - 1))


def record_attempt(
    s: Session,
    delivery: WebhookDelivery,
    *,
    at: datetime,
    status_code: int | None,
    error: str | None,
    max_attempts: int,
    base_backoff_s: float,
    final: bool = False,
) -> WebhookDelivery:
    """Log one attempt; a 2xx delivers, anything else waits its backoff or, after ``max_attempts`` (or
    ``final``: the address was refused), fails."""
    entry: dict[str, Any] = {
        "at": at.isoformat(),
        "status_code": status_code,
        "error": error and error[:ERROR_MAX],
    }
    delivery.log = [*(delivery.log or []), entry]
    delivery.attempts = (delivery.attempts or 0) + 1
    if status_code is not None and 200 <= status_code < 300:
        delivery.status, delivery.next_at, delivery.finished_at = DeliveryStatus.DELIVERED, None, utcnow()
    elif final or delivery.attempts >= max_attempts:
        delivery.status, delivery.next_at, delivery.finished_at = DeliveryStatus.FAILED, None, utcnow()
    else:
        delivery.next_at = utcnow() + timedelta(seconds=backoff_s(delivery.attempts, base_backoff_s))
    s.flush()
    return delivery


def list_deliveries(s: Session, job_id: str) -> list[WebhookDelivery]:
    q = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
    return list(s.scalars(q.order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
