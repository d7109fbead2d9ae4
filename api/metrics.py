"""Prometheus metrics: requests by route template and status, latency, jobs created.

A registry per app (not the process-global one), so several apps in one process (tests) do not clash.
The middleware is plain ASGI, so streamed responses (SSE, downloads) pass through untouched. Label values
are bounded, whatever clients send: a method outside HTTP's own is counted as ``OTHER`` and a path no
route matches as ``<unmatched>``, so invented methods and paths cannot grow the series without end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store import repo

log = logging.getLogger("api.metrics")

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
OTHER_METHOD = "OTHER"
UNMATCHED = "<unmatched>"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to answer a request (to the end of the body), by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.jobs_created = Counter(
            "jobs_created_total", "Jobs created (idempotent replays not counted).", registry=self.registry
        )
        self.enqueue_failures = Counter(
            "job_enqueue_failures_total",
            "Jobs committed but not sent to the broker (the reaper retries).",
            registry=self.registry,
        )

    def watch_store(self, read_sessions: sessionmaker[Session]) -> None:
        """Also show the counters other processes keep in the database (``StoreCounters``)."""
        self.registry.register(StoreCounters(read_sessions))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# The database's counters (store.repo.bump_counter), as Prometheus counters named <name>_total.
STORE_COUNTERS = {
    repo.RETENTION_DELETED: "Ended jobs deleted, with their files, by retention (JOB_RETENTION_DAYS).",
    repo.WEBHOOKS_DELIVERED: "Webhook deliveries that got a 2xx.",
    repo.WEBHOOKS_FAILED: "Webhook deliveries given up (attempts used up, or the address refused).",
}


class StoreCounters(Collector):
    """Counters the reaper or a worker keeps in the database, read at each scrape, so /metrics shows
    them whichever process counted (and across restarts)."""

    def __init__(self, read_sessions: sessionmaker[Session]) -> None:
        self.read_sessions = read_sessions

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        try:
            with self.read_sessions() as s:
                values = repo.counters(s)
        except Exception:  # the database is down: the request metrics still render
            log.warning("reading the stored counters failed", exc_info=True)
            return iter(())
        return self._families(values)

    @staticmethod
    def _families(values: dict[str, int]) -> Iterator[Metric]:
        for name, text in STORE_COUNTERS.items():
            yield CounterMetricFamily(name, text, value=values.get(name, 0))


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope.get("method", "")
            method = method if method in KNOWN_METHODS else OTHER_METHOD
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
