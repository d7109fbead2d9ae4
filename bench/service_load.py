"""The load generator of ``bench.service``: N concurrent clients on one ``httpx.AsyncClient``.

Each of the N asyncio tasks has its own client (one keep-alive connection) and sends its share of the requests back to back (a closed loop: a client sends
its next request when the previous answer arrived), until its share is done or the time cap passes.
Every request is timed with ``time.perf_counter`` from just before it is sent to the end of the body.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


@dataclass
class LevelResult:
    """One endpoint at one concurrency level."""

    endpoint: str
    concurrency: int
    planned: int
    latencies_s: list[float] = field(default_factory=list)  # of every request that got an answer
    errors: Counter[str] = field(default_factory=Counter)  # status code or exception name -> count
    bodies: list[dict[str, Any]] = field(default_factory=list)  # the 2xx JSON bodies, when kept
    ok: int = 0  # 2xx answers
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # CPU time of this (the load generator's) process during the level
    server_cpu_s: float | None = None  # CPU time of the server's processes, when a probe was given
    capped: bool = False  # the time cap stopped it before every planned request was sent

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "endpoint": self.endpoint,
            "concurrency": self.concurrency,
            "planned": self.planned,
            "completed": len(self.latencies_s),
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "capped": self.capped,
            "wall_s": self.wall_s,
            "client_cpu_s": self.client_cpu_s,
            "server_cpu_s": self.server_cpu_s,
            "throughput_rps": self.ok / self.wall_s if self.wall_s > 0 else 0.0,
            "p50_ms": percentile(lat, 50) * 1e3 if lat else None,
            "p99_ms": percentile(lat, 99) * 1e3 if lat else None,
            "mean_ms": sum(lat) / len(lat) * 1e3 if lat else None,
            "max_ms": lat[-1] * 1e3 if lat else None,
        }


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list: the smallest value with at least p% at or below it."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def shares(total: int, parts: int) -> list[int]:
    """``total`` requests split over ``parts`` clients as evenly as possible."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def run_level(
    base_url: str,
    headers: dict[str, str],
    endpoint: str,
    send: Send,
    requests: int,
    concurrency: int,
    cap_s: float,
    keep_bodies: bool = False,
    server_cpu: Callable[[], float] | None = None,
) -> LevelResult:
    """``requests`` calls of ``send(client, i)`` (i = 0..requests-1, each once) from ``concurrency``
    clients; stops sending after ``cap_s`` seconds. ``server_cpu()`` reads the server's CPU seconds."""
    result = LevelResult(endpoint, concurrency, requests)
    # One client (one keep-alive connection) per simulated user: httpx's shared connection pool costs
    # more CPU per request as it grows, which on a small machine would slow the server under test.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60.0, limits=limits)
        for _ in range(concurrency)
    ]
    try:
        counts = shares(requests, concurrency)
        offsets = [sum(counts[:k]) for k in range(concurrency)]
        cpu0, server0 = time.process_time(), server_cpu() if server_cpu else None
        start = time.perf_counter()
        deadline = start + cap_s

        async def one_client(client: httpx.AsyncClient, first: int, count: int) -> None:
            for i in range(first, first + count):
                if time.perf_counter() >= deadline:
                    result.capped = True
                    return
                t0 = time.perf_counter()
                try:
                    response = await send(client, i)
                except httpx.HTTPError as err:
                    result.errors[type(err).__name__] += 1
                    continue
                result.latencies_s.append(time.perf_counter() - t0)
                if 200 <= response.status_code < 300:
                    result.ok += 1
                    if keep_bodies:
                        result.bodies.append(response.json())
                else:
                    result.errors[str(response.status_code)] += 1

        await asyncio.gather(
            *(one_client(c, o, n) for c, o, n in zip(clients, offsets, counts, strict=True) if n)
        )
        result.wall_s = time.perf_counter() - start
        result.client_cpu_s = time.process_time() - cpu0
        if server_cpu and server0 is not None:
            result.server_cpu_s = server_cpu() - server0
    finally:
        for c in clients:
            await c.aclose()
    return result


def post_jobs(spec: dict[str, Any]) -> Send:
    async def send(client: httpx.AsyncClient, _i: int) -> httpx.Response:
        return await client.post("/v1/jobs", json=spec)

    return send


def get_jobs(ids: list[str]) -> Send:
    async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get(f"/v1/jobs/{ids[i % len(ids)]}")

    return send
