"""The load generator of ``bench.service``: N concurrent clients, one ``httpx.AsyncClient`` each.

Each of the N asyncio tasks has its own client (one keep-alive connection) and sends its requests back
to back (a closed loop: a client sends its next request when the previous answer arrived). Three shapes:

- ``run_level``: one endpoint, a fixed number of requests shared out, until done or a time cap;
- ``run_mixed``: for a fixed time, each client submits a job (``POST /v1/jobs`` with an
  ``Idempotency-Key``, as the SDK does) and polls it (``GET /v1/jobs/{id}``) a few times, then again
  (a cycle begun before the end is finished: the same mix of requests at every level);
- ``run_burst``: one ``POST /v1/jobs`` per client, all at once, then a share of them sent again with
  the same ``Idempotency-Key`` (a replay must create nothing).

Every request is timed with ``time.perf_counter`` from just before it is sent to the end of the body. A
503 is the server's "overloaded, come back later": a client waits its ``Retry-After`` (capped by the
time left) as the SDK would, and it is counted apart from other errors.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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
            **error_classes(self.errors),
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


def error_classes(errors: Counter[str]) -> dict[str, int]:
    """Errors split as the issue reads them: 503s (allowed, with Retry-After), other 5xx (never
    allowed), and the rest (4xx answers and transport errors)."""
    unavailable = errors.get("503", 0)
    server = sum(n for k, n in errors.items() if k.isdigit() and k.startswith("5") and k != "503")
    return {
        "unavailable_503": unavailable,
        "server_errors": server,
        "other_errors": sum(errors.values()) - unavailable - server,
    }


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list: the smallest value with at least p% at or below it."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def shares(total: int, parts: int) -> list[int]:
    """``total`` requests split over ``parts`` clients as evenly as possible."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def timed(
    result: LevelResult, call: Awaitable[httpx.Response], keep_body: bool = False
) -> httpx.Response | None:
    """Await one request, recording its latency and outcome in ``result``; None on a transport error."""
    t0 = time.perf_counter()
    try:
        response = await call
    except httpx.HTTPError as err:
        result.errors[type(err).__name__] += 1
        return None
    result.latencies_s.append(time.perf_counter() - t0)
    if 200 <= response.status_code < 300:
        result.ok += 1
        if keep_body:
            result.bodies.append(response.json())
    else:
        result.errors[str(response.status_code)] += 1
    return response


@asynccontextmanager
async def client_pool(
    base_url: str, headers: dict[str, str], n: int
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``n`` clients of one keep-alive connection each. (One per simulated user: httpx's shared
    connection pool costs more CPU per request as it grows, which on a small machine would slow the
    server under test.)"""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    # One SSL context for all: each client would otherwise load the CA bundle, ~70 ms apiece here, which
    # made setting up the 1,000 clients of a burst take longer than the burst itself.
    tls = ssl.create_default_context()
    clients = [
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60.0, limits=limits, verify=tls)
        for _ in range(n)
    ]
    try:
        yield clients
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


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
    async with client_pool(base_url, headers, concurrency) as clients:
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
                await timed(result, send(client, i), keep_bodies)

        await asyncio.gather(
            *(one_client(c, o, n) for c, o, n in zip(clients, offsets, counts, strict=True) if n)
        )
        result.wall_s = time.perf_counter() - start
        result.client_cpu_s = time.process_time() - cpu0
        if server_cpu and server0 is not None:
            result.server_cpu_s = server_cpu() - server0
    return result


def post_jobs(spec: dict[str, Any]) -> Send:
    async def send(client: httpx.AsyncClient, _i: int) -> httpx.Response:
        return await client.post("/v1/jobs", json=spec)

    return send


def get_jobs(ids: list[str]) -> Send:
    async def send(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get(f"/v1/jobs/{ids[i % len(ids)]}")

    return send


def retry_after_s(response: httpx.Response) -> float | None:
    """The 503's ``Retry-After`` in seconds (None when absent or not a number of seconds)."""
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


@dataclass
class MixedResult:
    """One concurrency level of submit-and-poll: the POSTs and the GETs apart, one wall clock."""

    concurrency: int
    duration_s: float
    polls: int
    post: LevelResult
    get: LevelResult
    job_ids: list[str] = field(default_factory=list)
    no_retry_after: int = 0  # 503s that came without a usable Retry-After
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None

    def summary(self) -> dict[str, Any]:
        post, get = (r.summary() | {"wall_s": self.wall_s} for r in (self.post, self.get))
        for row in (post, get):
            row["throughput_rps"] = row["ok"] / self.wall_s if self.wall_s > 0 else 0.0
        both = Counter(self.post.errors) + Counter(self.get.errors)
        ok = self.post.ok + self.get.ok
        return {
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "polls_per_job": self.polls,
            "wall_s": self.wall_s,
            "requests": len(self.post.latencies_s)
            + len(self.get.latencies_s)
            + sum(n for k, n in both.items() if not k.isdigit()),
            "ok": ok,
            "throughput_rps": ok / self.wall_s if self.wall_s > 0 else 0.0,
            "jobs_per_s": self.post.ok / self.wall_s if self.wall_s > 0 else 0.0,
            "jobs": len(self.job_ids),
            "distinct_jobs": len(set(self.job_ids)),
            "error_kinds": dict(both),
            **error_classes(both),
            "no_retry_after": self.no_retry_after,
            "client_cpu_s": self.client_cpu_s,
            "server_cpu_s": self.server_cpu_s,
            "post": post,
            "get": get,
        }


async def run_mixed(
    base_url: str,
    headers: dict[str, str],
    spec: dict[str, Any],
    concurrency: int,
    duration_s: float,
    polls: int,
    server_cpu: Callable[[], float] | None = None,
) -> MixedResult:
    """``concurrency`` clients, each submitting a job and polling it ``polls`` times, over and over;
    no cycle starts after ``duration_s``, and the cycles under way then are finished and counted."""
    result = MixedResult(
        concurrency,
        duration_s,
        polls,
        LevelResult("POST /v1/jobs", concurrency, 0),
        LevelResult("GET /v1/jobs/{id}", concurrency, 0),
    )
    async with client_pool(base_url, headers, concurrency) as clients:
        cpu0, server0 = time.process_time(), server_cpu() if server_cpu else None
        start = time.perf_counter()
        deadline = start + duration_s

        async def back_off(response: httpx.Response | None) -> bool:
            """Wait out a 503 (True when there was one)."""
            if response is None or response.status_code != 503:
                return False
            wait = retry_after_s(response)
            if wait is None:
                result.no_retry_after += 1
                wait = 1.0
            await asyncio.sleep(max(0.0, min(wait, deadline - time.perf_counter())))
            return True

        async def one_client(client: httpx.AsyncClient) -> None:
            while time.perf_counter() < deadline:
                key = {"Idempotency-Key": uuid.uuid4().hex}
                answer = await timed(result.post, client.post("/v1/jobs", json=spec, headers=key))
                if answer is None or await back_off(answer) or not answer.is_success:
                    continue
                job_id = answer.json()["id"]
                result.job_ids.append(job_id)
                # A cycle begun is finished, past the deadline too: cut cycles would tilt the mix towards
                # POSTs (a few times costlier than a GET) the more clients there are, which with 256
                # clients doing a few cycles each lowered the 2xx/s by itself.
                for _ in range(polls):
                    await back_off(await timed(result.get, client.get(f"/v1/jobs/{job_id}")))

        await asyncio.gather(*(one_client(c) for c in clients))
        result.wall_s = time.perf_counter() - start
        result.client_cpu_s = time.process_time() - cpu0
        if server_cpu and server0 is not None:
            result.server_cpu_s = server_cpu() - server0
    return result


async def run_burst(
    base_url: str,
    headers: dict[str, str],
    spec: dict[str, Any],
    jobs: int,
    replays: int,
    retries: int = 5,
) -> dict[str, Any]:
    """``jobs`` clients each send one ``POST /v1/jobs`` at the same moment, with an Idempotency-Key of
    its own; a 503 is retried with the same key after its Retry-After (at most ``retries`` times).
    Then the first ``replays`` keys are sent again, all at once."""
    keys = [f"burst-{i}-{uuid.uuid4().hex}" for i in range(jobs)]
    first: Counter[str] = Counter()  # the status of each first answer (or the transport error)
    final: Counter[str] = Counter()  # the status each client ended with
    ids: dict[str, str] = {}  # key -> job id

    async def submit(
        client: httpx.AsyncClient, key: str, record: Counter[str] | None
    ) -> httpx.Response | None:
        for attempt in range(retries + 1):
            try:
                answer = await client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
            except httpx.HTTPError as err:
                outcome, answer = type(err).__name__, None
            else:
                outcome = str(answer.status_code)
            if attempt == 0 and record is not None:
                record[outcome] += 1
            if answer is None or answer.status_code != 503 or attempt == retries:
                return answer
            await asyncio.sleep(retry_after_s(answer) or 1.0)
        return None

    async with client_pool(base_url, headers, jobs) as clients:
        start = time.perf_counter()
        answers = await asyncio.gather(*(submit(c, k, first) for c, k in zip(clients, keys, strict=True)))
        wall_s = time.perf_counter() - start
        for key, answer in zip(keys, answers, strict=True):
            final[str(answer.status_code) if answer is not None else "transport error"] += 1
            if answer is not None and answer.is_success:
                ids[key] = answer.json()["id"]
        replay_codes: Counter[str] = Counter()
        t0 = time.perf_counter()
        again = await asyncio.gather(
            *(submit(c, k, None) for c, k in zip(clients, keys[:replays], strict=False))
        )
        replay_wall_s = time.perf_counter() - t0
    same = 0
    for key, answer in zip(keys, again, strict=False):
        replay_codes[str(answer.status_code) if answer is not None else "transport error"] += 1
        if answer is not None and answer.is_success and answer.json()["id"] == ids.get(key):
            same += 1
    return {
        "jobs": jobs,
        "wall_s": wall_s,
        "first_answers": dict(first),
        "final_answers": dict(final),
        "created": len(ids),
        "distinct_ids": len(set(ids.values())),
        "ids": sorted(ids.values()),
        "replays": replays,
        "replay_wall_s": replay_wall_s,
        "replay_answers": dict(replay_codes),
        "replays_same_job": same,
    }
