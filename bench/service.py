"""``python -m bench.service``: the HTTP API and the queue against the real stack (PostgreSQL + Redis).

1. A fresh PostgreSQL database ``bench_<random>`` (created, migrated with ``python -m store migrate``,
   dropped at the end) and a Redis database index of its own (flushed before and after).
2. uvicorn (``--factory api.app:create_app``, ``--api-workers`` processes, 1 by default) on a free
   loopback port, authenticated with a bootstrap key.
3. Load: per concurrency level, ``--posts`` ``POST /v1/jobs`` (a tiny digits JobSpec; each one commits a
   row and sends a real Celery message to Redis, which no worker consumes during this phase), then
   ``--gets`` ``GET /v1/jobs/{id}`` over the jobs just created; throughput, p50/p99 latency, errors.
4. Queued to running: the load phase's messages are deleted from the queue and one Celery worker is
   started as deployed (concurrency 1, prefetch 1, a fresh pool process per job). ``--queue-jobs`` digits
   jobs go one at a time to an idle worker (each once the worker's fresh pool process is up, plus a
   second), then ``--back-to-back`` more, each as soon as the previous one was seen finished.
5. Submit and poll, the worker still running jobs: at each level of ``--mixed`` (1, 16, 64, 256) that
   many clients, for ``--mixed-seconds``, each submit a job and poll it ``--polls`` times, over and over
   (each level as an owner of its own, with an API key from the database). Per level: requests, 2xx/s,
   p50/p99 per endpoint, 503s apart from other 5xx, server CPU; "no collapse" when the 2xx/s at the
   highest level is not below that at 16.
6. Burst: ``--burst`` ``POST /v1/jobs`` at once (one client each, an Idempotency-Key each), then
   ``--replays`` of them again with the same keys. The worker is then stopped and every job of every
   owner is accounted for in PostgreSQL and Redis: one row per key, each queued job's message in the
   queue exactly once, none for a finished one.

Writes ``<out>/service-<time>.json`` and regenerates the ``<!-- bench:service -->`` section of
BENCHMARKS.md (``--markdown`` for another file). Never imports torch (the worker's child does).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from api.queue import redis_keys

from . import service_markdown
from .service_load import get_jobs, post_jobs, run_burst, run_level, run_mixed
from .stack import cpu_model, free_port, process, tail, wait_ready, worker_command

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_FORMAT = "pruning-service/bench-service-v1"

PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Index 15: the test fixtures take 1..14, so a benchmark never flushes a running test's queue.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
QUEUE = "pruning"  # the Celery queue (a Redis list of that name)
UNACKED = "unacked"  # kombu's hash of messages delivered to a worker and not yet acknowledged
TERMINAL = {"succeeded", "failed", "cancelled"}

# A tiny, valid digits job: a few seconds on a CPU when a worker runs it.
JOB_SPEC: dict[str, Any] = {
    "model": {"name": "resnet20"},
    "data": {"name": "digits"},
    "target": {"macs_ratio": 0.5},
    "schedule": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 5},
    "export": {"formats": ["safetensors"]},
}
WARMUP = 10  # untimed POSTs and GETs before the first level (first connections, lazy imports)
SETTLE_S = 1.0  # idle time after the worker's fresh pool process appeared, before an "idle" job is sent
RUNNING_POLL_S = 0.01  # how often the client polls for `running`
MIXED_PAUSE_S = 2.0  # between submit-and-poll levels, so one level's tail does not overlap the next
SERVICE_VERSIONS = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "psycopg",
    "celery",
    "kombu",
    "redis",
    "httpx",
)


def log(text: str) -> None:
    print(f"[bench.service {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the stack ---


@contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    """A fresh database on the server of ``admin_url``, dropped afterwards (connections and all)."""
    name = f"bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_db(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


def wait_log(proc: subprocess.Popen, log_path: Path, needle: str, timeout: float = 180.0) -> float:
    """Seconds until ``needle`` appears in the process's log."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if needle in log_path.read_text(errors="replace"):
            return time.perf_counter() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}:\n{tail(log_path)}")
        time.sleep(0.1)
    raise RuntimeError(f"no {needle!r} in {log_path} after {timeout:.0f} s:\n{tail(log_path)}")


# One owner floods the service on purpose: the per-owner quotas (429s) are off, so the figures are the
# service's capacity, not the quotas'.
NO_QUOTAS = {"RATE_PER_S": "0", "QUOTA_QUEUED_JOBS": "0", "QUOTA_RUNNING_JOBS": "0"}


def base_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "AUTH_DISABLED")}
    env |= NO_QUOTAS
    return env | {"STATE_DIR": str(state_dir), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", **extra}


def server_command(port: int, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    return cmd + (["--workers", str(workers)] if workers > 1 else [])


# --- what ran where ---


def machine_info() -> dict[str, Any]:
    cpu = cpu_model()
    versions = {}
    for name in SERVICE_VERSIONS + ("uvloop", "httptools"):
        try:
            versions[name] = version(name)
        except Exception:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m_start": os.getloadavg()[0],
        "nice": os.nice(0),  # this process's niceness, which the server and worker inherit
        "python": platform.python_version(),
        "versions": versions,
    }


def uvicorn_flavour(versions: dict[str, str | None]) -> str:
    """What uvicorn's ``auto`` loop and HTTP choices pick with the packages installed."""
    loop = "uvloop" if versions.get("uvloop") else "asyncio event loop (no uvloop installed)"
    http = "httptools" if versions.get("httptools") else "h11 (no httptools installed)"
    return f"{loop}, {http}, access log off"


def server_info(pg_url: str, r: redis.Redis) -> dict[str, Any]:
    with psycopg.connect(pg_url) as conn:
        pg = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("server_version", "synchronous_commit", "fsync", "shared_buffers", "max_connections")
        }
    info = r.info("server")
    return {
        "postgresql": pg,
        "redis": {
            "version": info.get("redis_version"),
            "appendonly": r.config_get("appendonly").get("appendonly"),
        },
    }


def count_jobs(pg_url: str) -> dict[str, int]:
    with psycopg.connect(pg_url) as conn:
        total, enqueued = conn.execute("SELECT count(*), count(enqueued_at) FROM jobs").fetchone()
        distinct = conn.execute("SELECT count(DISTINCT id) FROM jobs").fetchone()[0]
    return {"rows": total, "distinct_ids": distinct, "enqueued": enqueued}


# --- phase 1: load ---


async def load_phase(
    base: str,
    headers: dict[str, str],
    levels: list[int],
    posts: int,
    gets: int,
    cap_s: float,
    server_pid: int,
) -> dict[str, Any]:
    """POST then GET at each level; the GETs read the jobs that level's POSTs created."""
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as c:
        warm_ids = []
        for _ in range(WARMUP):
            r = await c.post("/v1/jobs", json=JOB_SPEC)
            r.raise_for_status()
            warm_ids.append(r.json()["id"])
        for job_id in warm_ids:
            (await c.get(f"/v1/jobs/{job_id}")).raise_for_status()
    rows: dict[str, list[dict[str, Any]]] = {"post": [], "get": []}

    def cpu() -> float:
        return cpu_seconds(server_pid)

    post_ids: list[str] = []
    for n in levels:
        log(f"load: {n} concurrent client(s), {posts} POST /v1/jobs")
        res = await run_level(
            base,
            headers,
            "POST /v1/jobs",
            post_jobs(JOB_SPEC),
            posts,
            n,
            cap_s,
            keep_bodies=True,
            server_cpu=cpu,
        )
        ids = [b["id"] for b in res.bodies]
        post_ids += ids
        rows["post"].append(res.summary() | {"distinct_ids": len(set(ids))})
        log(f"  {_line(rows['post'][-1])}")
        log(f"load: {n} concurrent client(s), {gets} GET /v1/jobs/{{id}}")
        res = await run_level(
            base, headers, "GET /v1/jobs/{id}", get_jobs(ids or warm_ids), gets, n, cap_s, server_cpu=cpu
        )
        rows["get"].append(res.summary())
        log(f"  {_line(rows['get'][-1])}")
    return {
        "warmup_requests": WARMUP,
        "post_ids": len(post_ids) + len(warm_ids),
        "post_ids_distinct": len(set(post_ids) | set(warm_ids)),
        **rows,
    }


def _line(row: dict[str, Any]) -> str:
    p50 = f"{row['p50_ms']:.1f}" if row["p50_ms"] is not None else "-"
    p99 = f"{row['p99_ms']:.1f}" if row["p99_ms"] is not None else "-"
    capped = " (time cap reached)" if row["capped"] else ""
    return (
        f"{row['completed']} in {row['wall_s']:.1f} s: {row['throughput_rps']:.0f} req/s, "
        f"p50 {p50} ms, p99 {p99} ms, {row['errors']} error(s){capped}"
    )


# --- phase 2: queued to running ---


def _time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return (b - a).total_seconds() if a and b else None


def one_queued_job(c: httpx.Client, job_timeout_s: float) -> dict[str, Any]:
    """Submit one job and follow it: server timestamps, and when the client first sees it running."""
    t_sent = time.perf_counter()
    r = c.post("/v1/jobs", json=JOB_SPEC)
    t_answered = time.perf_counter()
    r.raise_for_status()
    job = r.json()
    seen_running = None
    deadline = t_sent + job_timeout_s
    while time.perf_counter() < deadline:
        job = c.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] != "queued":
            seen_running = time.perf_counter()
            break
        time.sleep(RUNNING_POLL_S)
    while job["status"] not in TERMINAL and time.perf_counter() < deadline:
        time.sleep(0.2)
        job = c.get(f"/v1/jobs/{job['id']}").json()
    events = c.get(f"/v1/jobs/{job['id']}/events", params={"after": 0}).json()["items"]
    phase = next((e for e in events if e["kind"] == "phase"), None)
    created, started, finished = (_time(job[k]) for k in ("created_at", "started_at", "finished_at"))
    return {
        "id": job["id"],
        "status": job["status"],
        "post_ms": (t_answered - t_sent) * 1e3,
        "created_to_started_s": _seconds(created, started),
        "post_answered_to_running_seen_s": seen_running - t_answered if seen_running else None,
        "post_sent_to_running_seen_s": seen_running - t_sent if seen_running else None,
        "started_to_first_phase_s": _seconds(started, _time(phase["created_at"]) if phase else None),
        "created_to_finished_s": _seconds(created, finished),
    }


def pool_children(pid: int) -> set[int]:
    """The worker's pool processes: every process whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children (uvicorn's worker processes)."""
    total = 0.0
    for p in {pid} | pool_children(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_new_child(pid: int, old: set[int], timeout: float = 60.0) -> float:
    """Seconds until the worker has a pool process that is not one of ``old``."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if pool_children(pid) - old:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise RuntimeError(f"the worker forked no new pool process in {timeout:.0f} s")


@contextmanager
def celery_worker(env: dict[str, str], work: Path) -> Iterator[tuple[subprocess.Popen, Path, float]]:
    """One Celery worker as deployed: (process, its log, seconds until it was ready). Stopped on exit
    with SIGTERM (a warm shutdown: the job in hand finishes, an unacknowledged message goes back)."""
    worker_log = work / "worker.log"
    name = f"bench-{secrets.token_hex(3)}"
    with process(worker_command(name), env, worker_log) as proc:
        ready_s = wait_log(proc, worker_log, " ready.")
        log(f"worker {name} ready after {ready_s:.1f} s")
        yield proc, worker_log, ready_s


def queue_phase(
    base: str,
    headers: dict[str, str],
    worker: tuple[subprocess.Popen, Path, float],
    idle_jobs: int,
    back_to_back: int,
    job_timeout_s: float,
) -> dict[str, Any]:
    """``idle_jobs`` jobs each sent once the worker's fresh child is up and idle; then ``back_to_back``
    jobs each sent as soon as the previous one was seen finished."""
    proc, worker_log, ready_s = worker
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    log(f"queue: {idle_jobs} + {back_to_back} job(s), one at a time")
    used: set[int] = set()
    with httpx.Client(base_url=base, headers=headers, timeout=60) as c:
        for i in range(idle_jobs + back_to_back):
            series = "idle" if i < idle_jobs else "back-to-back"
            respawn_s = None
            if series == "idle":
                respawn_s = wait_new_child(proc.pid, used)
                time.sleep(SETTLE_S)
            used |= pool_children(proc.pid)
            row = {"series": series, "child_wait_s": respawn_s, **one_queued_job(c, job_timeout_s)}
            rows.append(row)
            log(
                f"  job {i + 1} ({series}): {row['status']}, "
                f"created -> started {_fmt_s(row['created_to_started_s'])}, "
                f"POST answered -> running seen {_fmt_s(row['post_answered_to_running_seen_s'])}, "
                f"started -> first phase event {_fmt_s(row['started_to_first_phase_s'])}"
            )
            if row["status"] not in TERMINAL:
                raise RuntimeError(
                    f"job {row['id']} did not finish in {job_timeout_s:.0f} s:\n{tail(worker_log)}"
                )
    return {
        "worker_command": "celery " + " ".join(worker_command("bench")[3:]),
        "worker_ready_s": ready_s,
        "settle_s": SETTLE_S,
        "poll_s": RUNNING_POLL_S,
        "wall_s": time.perf_counter() - t0,
        "jobs": rows,
        "summary": {
            series: summarize([r for r in rows if r["series"] == series])
            for series in ("idle", "back-to-back")
            if any(r["series"] == series for r in rows)
        },
    }


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f} ms"


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    keys = [k for k in rows[0] if k.endswith("_s") or k.endswith("_ms")] if rows else []
    out: dict[str, dict[str, float | None]] = {}
    for k in keys:
        values = [r[k] for r in rows if r[k] is not None]
        out[k] = {
            "median": statistics.median(values) if values else None,
            "max": max(values) if values else None,
            "n": len(values),
        }
    return out


# --- phase 3: submit and poll, with the worker running ---


def owner_key(pg_url: str, owner: str) -> dict[str, str]:
    """Headers with a new API key of ``owner``, stored in the database as ``prune keys create`` does
    (so each request also pays the key lookup a real client's does)."""
    from store import repo
    from store.db import make_engine, sessions

    engine = make_engine(pg_url)
    try:
        with sessions(engine)() as s:
            _, plaintext = repo.create_api_key(s, owner, "bench")
            s.commit()
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {plaintext}"}


def finished_jobs(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL").fetchone()[0]


def no_collapse(rows: list[dict[str, Any]], low: int = 16) -> dict[str, Any] | None:
    """The issue's criterion: 2xx/s at the highest level not below that at ``low`` clients."""
    by_level = {r["concurrency"]: r for r in rows}
    high = max(by_level, default=0)
    if low not in by_level or high <= low:
        return None
    a, b = by_level[low]["throughput_rps"], by_level[high]["throughput_rps"]
    return {
        "low": low,
        "high": high,
        "low_rps": a,
        "high_rps": b,
        "ratio": b / a if a else None,
        "pass": b >= a,
    }


async def mixed_phase(
    base: str, pg_url: str, levels: list[int], duration_s: float, polls: int, server_pid: int
) -> dict[str, Any]:
    """Each level as an owner of its own: per-owner counts (the broker priority) start from zero."""
    rows = []
    for n in levels:
        headers = owner_key(pg_url, f"mixed-{n}")
        done0 = finished_jobs(pg_url)
        log(f"mixed: {n} client(s) submit and poll ({polls} GETs per job) for {duration_s:g} s")
        res = await run_mixed(
            base, headers, JOB_SPEC, n, duration_s, polls, server_cpu=lambda: cpu_seconds(server_pid)
        )
        row = res.summary() | {
            "owner": f"mixed-{n}",
            "worker_finished": finished_jobs(pg_url) - done0,
            "load_avg_1m": os.getloadavg()[0],  # the machine is shared: how busy it was just then
        }
        rows.append(row)
        log(f"  {_mixed_line(row)}")
        await asyncio.sleep(MIXED_PAUSE_S)
    verdict = no_collapse(rows)
    if verdict:
        log(f"mixed: no collapse {'PASS' if verdict['pass'] else 'FAIL'}: {verdict}")
    return {"duration_s": duration_s, "polls_per_job": polls, "levels": rows, "no_collapse": verdict}


def _mixed_line(row: dict[str, Any]) -> str:
    p99 = {k: row[k]["p99_ms"] for k in ("post", "get")}
    return (
        f"{row['requests']} requests in {row['wall_s']:.1f} s: {row['throughput_rps']:.0f} 2xx/s "
        f"({row['jobs_per_s']:.0f} jobs/s), p99 POST {_ms(p99['post'])} GET {_ms(p99['get'])} ms, "
        f"503: {row['unavailable_503']}, other 5xx: {row['server_errors']}, other errors: "
        f"{row['other_errors']}; the worker finished {row['worker_finished']} job(s)"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# --- phase 4: a burst of submissions, then every job accounted for ---


async def burst_phase(base: str, pg_url: str, jobs: int, replays: int) -> dict[str, Any]:
    headers = owner_key(pg_url, "burst")
    log(f"burst: {jobs} POST /v1/jobs at once, then {replays} replayed with the same Idempotency-Key")
    res = await run_burst(base, headers, JOB_SPEC, jobs, replays)
    log(
        f"  {res['created']} created ({res['distinct_ids']} distinct) in {res['wall_s']:.1f} s, first answers "
        f"{res['first_answers']}; replays {res['replay_answers']}, {res['replays_same_job']} gave the same job"
    )
    return res | {"owner": "burst"}


def queued_messages(r: redis.Redis) -> tuple[Counter[str], Counter[str]]:
    """Task ids of the messages waiting in the queue, and of those delivered but not acknowledged."""
    keys = redis_keys(QUEUE)
    with r.pipeline(transaction=True) as pipe:  # one snapshot of every list and the unacked hash
        for key in keys:
            pipe.lrange(key, 0, -1)
        pipe.hvals(UNACKED)
        *lists, unacked = pipe.execute()
    waiting = Counter(json.loads(raw)["headers"]["id"] for raw in (m for lst in lists for m in lst))
    delivered = Counter(json.loads(raw)[0]["headers"]["id"] for raw in unacked)
    return waiting, delivered


def account(pg_url: str, r: redis.Redis, owners: list[str]) -> dict[str, Any]:
    """Each of ``owners``' jobs against its broker messages (run with the worker stopped, so nothing
    moves): a queued job has exactly one message, waiting or delivered; a running one at most one; a
    finished one none. Anything else is lost (no message) or duplicated (more than one). (The load
    phase's jobs, owner admin, lost their messages on purpose and are left out.)"""
    waiting, delivered = queued_messages(r)
    with psycopg.connect(pg_url) as conn:
        jobs = conn.execute(
            "SELECT id, owner, status, idempotency_key, enqueued_at IS NOT NULL FROM jobs"
        ).fetchall()
    out = {o: JobCount() for o in owners}
    for job_id, owner, status, key, enqueued in jobs:
        if owner in out:
            out[owner].add(job_id, status, key, enqueued, waiting[job_id] + delivered[job_id])
    strays = sorted((set(waiting) | set(delivered)) - {job_id for job_id, *_ in jobs})
    return {
        "owners": {o: c.summary() for o, c in out.items()},
        "messages": sum(waiting.values()) + sum(delivered.values()),
        "messages_without_a_job": strays,
    }


@dataclass
class JobCount:
    """One owner's jobs, counted against their broker messages."""

    ids: set[str] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    rows: int = 0
    status: Counter[str] = field(default_factory=Counter)
    once: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    not_marked_enqueued: int = 0

    def add(self, job_id: str, status: str, key: str | None, enqueued: bool, messages: int) -> None:
        self.rows += 1
        self.ids.add(job_id)
        if key:
            self.keys.add(key)
        self.status[status] += 1
        self.not_marked_enqueued += not enqueued
        if status == "queued":
            ok = messages == 1
        elif status == "running":  # its message in hand, or back in the queue for a resumption
            ok = messages <= 1
        else:
            ok = messages == 0
        if ok:
            self.once += 1
        else:
            (self.lost if messages == 0 else self.duplicated).append(job_id)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "distinct_ids": len(self.ids),
            "distinct_keys": len(self.keys),
            "status": dict(self.status),
            "accounted_once": self.once,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "examples": (self.lost + self.duplicated)[:10],
            "not_marked_enqueued": self.not_marked_enqueued,
        }


# --- the whole run ---


def run_benchmark(args: argparse.Namespace, command: str) -> dict[str, Any]:
    started, t0 = dt.datetime.now(dt.UTC), time.perf_counter()
    machine = machine_info()
    key = "pk_bench_" + secrets.token_hex(16)
    headers = {"Authorization": f"Bearer {key}"}
    with (
        tempfile.TemporaryDirectory(prefix="bench-service-") as tmp,
        pg_database(args.pg_admin_url) as pg_url,
        redis_db(args.redis_url) as r,
    ):
        work = Path(tmp)
        database = pg_url.rsplit("/", 1)[1]
        env = base_env(work / "state", DATABASE_URL=pg_url, REDIS_URL=args.redis_url, BOOTSTRAP_API_KEY=key)
        log(f"database {database}: migrating")
        done = subprocess.run(
            [sys.executable, "-m", "store", "migrate"], env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"python -m store migrate failed ({done.returncode}):\n{done.stderr[-3000:]}")
        servers = server_info(pg_url, r)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server_log = work / "api.log"
        with process(server_command(port, args.api_workers), env, server_log) as server:
            ready_s = wait_ready(base, server, server_log)
            log(f"uvicorn ({args.api_workers} worker process(es)) ready on {base} after {ready_s:.1f} s")
            load = asyncio.run(
                load_phase(
                    base, headers, args.concurrency, args.posts, args.gets, args.max_seconds, server.pid
                )
            )
            load["db"] = count_jobs(pg_url)
            keys = redis_keys(QUEUE)  # one list per priority step (the API ranks each owner's jobs)
            load["queued_messages"] = sum(r.llen(k) for k in keys)
            r.delete(*keys)  # nobody runs the load phase's jobs: their rows stay queued, their messages go
            log(
                f"load: {load['db']} in the database, {load['queued_messages']} message(s) in the queue (deleted)"
            )
            queue = mixed = burst = accounting = None
            if args.queue_jobs + args.back_to_back or args.mixed or args.burst:
                with celery_worker(env, work) as worker:
                    if args.queue_jobs + args.back_to_back:
                        queue = queue_phase(
                            base, headers, worker, args.queue_jobs, args.back_to_back, args.job_timeout
                        )
                    if args.mixed:
                        mixed = asyncio.run(
                            mixed_phase(base, pg_url, args.mixed, args.mixed_seconds, args.polls, server.pid)
                        )
                    if args.burst:
                        burst = asyncio.run(burst_phase(base, pg_url, args.burst, args.replays))
                    log("stopping the worker (warm shutdown), then accounting for every job")
                owners = [row["owner"] for row in mixed["levels"]] if mixed else []
                accounting = account(pg_url, r, owners + (["burst"] if burst else []))
            if server.poll() is not None:
                raise RuntimeError(f"the server died during the run:\n{tail(server_log)}")
            server_errors = tail(server_log, 20)
    machine["load_avg_1m_end"] = os.getloadavg()[0]
    return {
        "format": RESULTS_FORMAT,
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        "machine": machine,
        "servers": servers,
        "setup": {
            "database": database,
            "redis_url": args.redis_url,
            "api_workers": args.api_workers,
            "uvicorn": uvicorn_flavour(machine["versions"]),
            "concurrency": args.concurrency,
            "posts_per_level": args.posts,
            "gets_per_level": args.gets,
            "max_seconds_per_level": args.max_seconds,
            "mixed_levels": args.mixed,
            "mixed_seconds": args.mixed_seconds,
            "polls_per_job": args.polls,
            "burst": args.burst,
            "replays": args.replays,
            "job_spec": JOB_SPEC,
        },
        "load": load,
        "queue": queue,
        "mixed": mixed,
        "burst": burst,
        "accounting": accounting,
        "server_log_tail": server_errors,
    }


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels are integers >= 1")
    return levels


def parse_levels_or_none(text: str) -> list[int]:
    return [] if text.strip() == "0" else parse_levels(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=parse_levels, default=[1, 16, 64], help="levels (default 1,16,64)")
    p.add_argument("--requests", type=int, help="POSTs and GETs per level alike (overrides the two below)")
    p.add_argument("--posts", type=int, default=1000, help="POST /v1/jobs per level (default 1000)")
    p.add_argument("--gets", type=int, default=2000, help="GET /v1/jobs/{id} per level (default 2000)")
    p.add_argument(
        "--max-seconds", type=float, default=60.0, help="time cap per endpoint and level (default 60)"
    )
    p.add_argument(
        "--queue-jobs", type=int, default=5, help="jobs for queued-to-running (default 5; 0 skips)"
    )
    p.add_argument(
        "--back-to-back",
        type=int,
        default=3,
        help="then jobs sent as soon as the previous finished (default 3)",
    )
    p.add_argument(
        "--mixed",
        type=parse_levels_or_none,
        default=[1, 16, 64, 256],
        help="submit-and-poll levels, the worker running (default 1,16,64,256; 0 skips)",
    )
    p.add_argument(
        "--mixed-seconds", type=float, default=30.0, help="seconds per submit-and-poll level (default 30)"
    )
    p.add_argument("--polls", type=int, default=3, help="GETs of each submitted job (default 3)")
    p.add_argument(
        "--burst", type=int, default=1000, help="POST /v1/jobs sent at once (default 1000; 0 skips)"
    )
    p.add_argument(
        "--replays", type=int, default=100, help="of those, sent again with the same key (default 100)"
    )
    p.add_argument("--job-timeout", type=float, default=180.0, help="seconds one of those jobs may take")
    p.add_argument(
        "--api-workers",
        type=int,
        default=1,
        help="uvicorn worker processes (default 1, as deployed; >1 hits uvicorn#3149, ~40 ms per request)",
    )
    p.add_argument(
        "--pg-admin-url", default=PG_ADMIN_URL, help=f"where to create the database ({PG_ADMIN_URL})"
    )
    p.add_argument("--redis-url", default=REDIS_URL, help=f"a Redis database index, flushed ({REDIS_URL})")
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="folder for the results JSON (bench/results)"
    )
    p.add_argument("--markdown", type=Path, help="file whose service section is regenerated (BENCHMARKS.md)")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="only regenerate the markdown from a results file"
    )
    args = p.parse_args(argv)
    if args.api_workers > 1:
        log(f"warning: --api-workers {args.api_workers}: {service_markdown.NODELAY_BUG}")
    if args.requests is not None:
        args.posts = args.gets = args.requests
    if min(args.polls, args.burst, args.replays) < 0 or args.replays > args.burst or args.mixed_seconds <= 0:
        p.error("--polls, --burst and --replays are >= 0, --replays <= --burst, --mixed-seconds > 0")
    if min(args.posts, args.gets) < 1 or args.api_workers < 1 or min(args.queue_jobs, args.back_to_back) < 0:
        p.error("--posts/--gets/--requests and --api-workers are >= 1, --queue-jobs and --back-to-back >= 0")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # so the finally blocks stop the servers and drop the database


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    md = args.markdown or REPO_DIR / "BENCHMARKS.md"
    if args.render:
        service_markdown.update_section(
            md, service_markdown.render_section(json.loads(args.render.read_text()), args.render)
        )
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.service", *(sys.argv[1:] if argv is None else argv)])
    results = run_benchmark(args, command)
    stamp = results["date"].replace(":", "").replace("+0000", "Z")
    path = args.out / f"service-{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    service_markdown.update_section(md, service_markdown.render_section(results, path))
    log(f"results: {path}; markdown: {md} ({results['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
