"""The ``<!-- bench:service -->`` section of BENCHMARKS.md, rendered from a ``bench.service`` results file.

Only the text between the markers is rewritten; a file without them gets the section appended.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

START, END = "<!-- bench:service -->", "<!-- /bench:service -->"
REPO_DIR = Path(__file__).resolve().parent.parent
NODELAY_BUG = (
    "uvicorn's multi-process mode leaves TCP_NODELAY off on accepted connections (Kludex/uvicorn#3149, "
    "open), which adds a delayed-ACK wait of about 40 ms to every keep-alive request after the first"
)


def update_section(path: Path, section: str) -> Path:
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO_DIR)) if path.is_relative_to(REPO_DIR) else str(path)


def _ms(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cores(row: dict[str, Any]) -> str:
    """CPU seconds per wall second of the uvicorn process(es) and of the load generator."""
    wall = row["wall_s"] or float("nan")
    server = "–" if row.get("server_cpu_s") is None else f"{row['server_cpu_s'] / wall:.2f}"
    return f"{server} / {row['client_cpu_s'] / wall:.2f}"


def _nice(machine: dict[str, Any]) -> str:
    nice = machine.get("nice")
    return f"; the benchmark and the processes it started ran at niceness {nice}" if nice else ""


def load_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Concurrent clients | Requests | Throughput req/s | p50 ms | p99 ms | Errors | CPU cores: server / load generator |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        requests = f"{r['completed']:,}" + (f" of {r['planned']:,} (time cap)" if r["capped"] else "")
        errors = str(r["errors"])
        if r["errors"]:
            errors += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(r["error_kinds"].items())) + ")"
        lines.append(
            f"| {r['concurrency']} | {requests} | {r['throughput_rps']:.0f} | {_ms(r['p50_ms'])} | "
            f"{_ms(r['p99_ms'])} | {errors} | {_cores(r)} |"
        )
    return "\n".join(lines)


def _p(row: dict[str, Any]) -> str:
    return f"{_ms(row['p50_ms'], 0)} / {_ms(row['p99_ms'], 0)}"


def mixed_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Concurrent clients | Requests | Throughput 2xx/s | Jobs submitted/s | POST p50 / p99 ms | "
        "GET p50 / p99 ms | 503 | Other 5xx | Other errors | CPU cores: server / load generator | "
        "Jobs the worker finished | Load average (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        other = str(r["other_errors"])
        if r["other_errors"]:
            kinds = {k: v for k, v in r["error_kinds"].items() if not k.startswith("5")}
            other += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + ")"
        lines.append(
            f"| {r['concurrency']} | {r['requests']:,} | {r['throughput_rps']:.0f} | {r['jobs_per_s']:.0f} | "
            f"{_p(r['post'])} | {_p(r['get'])} | {r['unavailable_503']} | {r['server_errors']} | {other} | "
            f"{_cores(r)} | {r['worker_finished']} | {r.get('load_avg_1m', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def verdict_text(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return "No collapse: not judged (it needs a level of 16 clients and a higher one)."
    word = "**pass**" if verdict["pass"] else "**FAIL**"
    sign = "≥" if verdict["pass"] else "<"
    return (
        f"No collapse (2xx/s at {verdict['high']} clients not below that at {verdict['low']}): {word}, "
        f"{verdict['high_rps']:.0f} {sign} {verdict['low_rps']:.0f} 2xx/s ({verdict['ratio']:.2f}×)."
    )


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items())) or "none"


def accounting_table(accounting: dict[str, Any]) -> str:
    lines = [
        "| Owner | Rows | Distinct ids | Distinct Idempotency-Keys | Status | Accounted for once | Lost | Duplicated |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for owner, a in accounting["owners"].items():
        status = ", ".join(f"{k} {v:,}" for k, v in sorted(a["status"].items()))
        lines.append(
            f"| {owner} | {a['rows']:,} | {a['distinct_ids']:,} | {a['distinct_keys']:,} | {status} | "
            f"{a['accounted_once']:,} | {a['lost']} | {a['duplicated']} |"
        )
    return "\n".join(lines)


def burst_text(burst: dict[str, Any], accounting: dict[str, Any] | None) -> str:
    text = (
        f"{burst['jobs']:,} clients (one connection each) sent one `POST /v1/jobs` each at the same moment, "
        f"each with an `Idempotency-Key` of its own (a 503 would be retried with the same key after its "
        f"`Retry-After`). All answered in {burst['wall_s']:.1f} s; first answers {_codes(burst['first_answers'])}; "
        f"final answers {_codes(burst['final_answers'])}: {burst['created']:,} jobs, {burst['distinct_ids']:,} "
        f"distinct ids. Then {burst['replays']:,} of them were sent again at once with the same keys "
        f"({burst['replay_wall_s']:.1f} s): answers {_codes(burst['replay_answers'])}, "
        f"{burst['replays_same_job']:,} returned the job the first request created."
    )
    if accounting:
        a = accounting["owners"].get(burst["owner"])
        if a:
            text += (
                f" In the database afterwards: {a['rows']:,} rows for the burst's owner "
                f"({a['distinct_ids']:,} distinct ids, {a['distinct_keys']:,} distinct keys)."
            )
    return text


def accounting_text(accounting: dict[str, Any]) -> str:
    strays = accounting["messages_without_a_job"]
    return (
        "Every job of the submit-and-poll owners and of the burst, counted once the worker had stopped (a "
        "warm shutdown: the job in hand finished, the message it had taken went back): a *queued* job must "
        "have exactly one message in the queue's Redis lists or kombu's `unacked` hash, a *running* one at "
        "most one, a finished one none; a job with no message is *lost*, one with more *duplicated*. "
        f"{accounting['messages']:,} messages in Redis in all, {len(strays)} without a job row. (The first "
        "phase's jobs are left out: their messages were deleted on purpose.)"
    )


QUEUE_COLUMNS = (
    ("created_to_started_s", "created → started (server) ms"),
    ("post_answered_to_running_seen_s", "POST answered → `running` seen (client) ms"),
    ("started_to_first_phase_s", "started → first `phase` event ms"),
    ("created_to_finished_s", "created → finished s"),
)


def _q(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if key == "created_to_finished_s" else f"{value * 1e3:.0f}"


def queue_table(queue: dict[str, Any]) -> str:
    head = ["Job", "Sent", *(label for _, label in QUEUE_COLUMNS), "Status"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(QUEUE_COLUMNS) + "---|"]
    for i, job in enumerate(queue["jobs"], 1):
        cells = [str(i), SERIES[job["series"]], *(_q(k, job[k]) for k, _ in QUEUE_COLUMNS), job["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    for series, summary in queue["summary"].items():
        for stat in ("median", "max"):
            cells = [f"**{stat}**", SERIES[series], *(_q(k, summary[k][stat]) for k, _ in QUEUE_COLUMNS), ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SERIES = {"idle": "idle worker", "back-to-back": "right after the previous"}


def _range_s(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f} s" if hi - lo < 0.05 else f"{lo:.1f}–{hi:.1f} s"


def queue_text(queue: dict[str, Any]) -> str:
    idle = [j for j in queue["jobs"] if j["series"] == "idle"]
    b2b = [j for j in queue["jobs"] if j["series"] == "back-to-back"]
    respawn = [j["child_wait_s"] for j in idle[1:] if j["child_wait_s"] is not None]
    text = (
        f"One Celery worker started as deployed (`{queue['worker_command']}`), ready "
        f"{queue['worker_ready_s']:.1f} s after it was launched. *created → started* comes from the job "
        f"resource's own timestamps: the API's commit to the worker's compare-and-set claim. It covers the "
        f"Redis delivery, the hand-over to the pool process (`--max-tasks-per-child 1`: a fresh one per job, "
        f"forked from the worker), that process's first import of `worker.execute` and its first database "
        f"connection. *POST answered → `running` seen* is what a client observes polling "
        f"`GET /v1/jobs/{{id}}` every {queue['poll_s'] * 1e3:g} ms. Torch is imported in the pool process "
        f"after the claim, so its cost shows in *started → first `phase` event* (imports, data, model), not "
        f"in queued-to-running."
    )
    if idle:
        text += (
            f"\n\n*Idle worker*: each job was sent {queue['settle_s']:g} s after the worker's fresh pool process "
            f"had appeared"
        )
        text += (
            f" (the replacement for the previous job's pool process appeared {_range_s(respawn)} after the "
            f"client saw that job finish)."
            if respawn
            else "."
        )
    if b2b:
        idle_med = statistics.median(j["created_to_started_s"] for j in idle) if idle else None
        b2b_vals = [j["created_to_started_s"] for j in b2b]
        text += (
            "\n\n*Right after the previous*: each job was sent as soon as the client saw the previous one "
            "finish, as a busy queue would hand it over. The previous job's pool process may then still be on its "
            "way out and its replacement not yet up (`--max-tasks-per-child 1`), and created → started "
            f"was {_range_s(b2b_vals)}"
            + (f" against {idle_med * 1e3:.0f} ms idle" if idle_med is not None else "")
            + ": the fresh process per job is paid in queued-to-running latency when jobs queue up "
            "(small beside any real pruning job)."
        )
    return text


def render_section(results: dict[str, Any], source: Path) -> str:
    m, s, srv, load = results["machine"], results["setup"], results["servers"], results["load"]
    v = m["versions"]
    pg, rd = srv["postgresql"], srv["redis"]
    workers = s["api_workers"]
    worker_text = (
        "one uvicorn worker process (the default; `--api-workers N` for more)"
        if workers == 1
        else (
            f"{workers} uvicorn worker processes (`--api-workers {workers}`; beware: {NODELAY_BUG}, so "
            f"these figures include that delay)"
        )
    )
    levels = ", ".join(str(c) for c in s["concurrency"])
    parts = [
        f"## Service: HTTP API and queue (`{results['command']}`)",
        f"Run {results['date']}, {results['wall_s'] / 60:.1f} min in all; results file `{_shown(source)}`.  \n"
        f"Machine: {m['cpu']}, {m['cores']} cores, shared (1-minute load average {m['load_avg_1m_start']:.2f} "
        f"at the start, {m['load_avg_1m_end']:.2f} at the end{_nice(m)}); Python {m['python']}; FastAPI {v['fastapi']}, "
        f"Starlette {v['starlette']}, uvicorn {v['uvicorn']}, SQLAlchemy {v['sqlalchemy']}, psycopg {v['psycopg']}, "
        f"Celery {v['celery']}, redis-py {v['redis']}, httpx {v['httpx']}; PostgreSQL {pg['server_version'].split()[0]} "
        f"(synchronous_commit {pg['synchronous_commit']}, fsync {pg['fsync']}), Redis {rd['version']} "
        f"(appendonly {rd['appendonly']}).",
        f"Setup: {worker_text}, {s['uvicorn']}; PostgreSQL, Redis, the server, the Celery worker and the load "
        f"generator all on this machine, over loopback. A fresh database (migrated) and a Redis database index "
        f"of its own per run. Clients authenticate with the bootstrap API key. The per-owner quotas are "
        f"off (`RATE_PER_S=0`, `QUOTA_QUEUED_JOBS=0`, `QUOTA_RUNNING_JOBS=0`): each phase floods the service "
        f"as one owner on purpose, so these figures are the service's capacity, not its quotas' (which would "
        f"answer 429 with `Retry-After`). The load generator is "
        f"one asyncio process, one `httpx.AsyncClient` (one keep-alive connection) per simulated client: at "
        f"each level ({levels}) that many clients send their share of the requests back to back; each request is timed from send to the "
        f"end of the body. {load['warmup_requests']} untimed POSTs and GETs come first. Throughput is 2xx "
        f"answers over the level's wall time; p50/p99 are nearest-rank; an error is any non-2xx answer or a "
        f"transport error. At most {s['max_seconds_per_level']:g} s per endpoint and level.",
        f"### `POST /v1/jobs` ({s['posts_per_level']:,} per level)",
        load_table(load["post"]),
        f"Each POST validates the tiny digits JobSpec, commits the job row and its first event, sends a real "
        f"Celery message to Redis and records that it was sent (a second commit). Check after the load: "
        f"{load['db']['rows']:,} job rows ({load['db']['distinct_ids']:,} distinct ids, "
        f"{load['db']['enqueued']:,} marked enqueued) for {load['post_ids']:,} POSTs, the warm-up's included; "
        f"{load['queued_messages']:,} messages waited in the queue (no worker ran during the load; they were "
        f"deleted before the next phase).",
        f"### `GET /v1/jobs/{{id}}` ({s['gets_per_level']:,} per level)",
        load_table(load["get"]),
        "The GETs cycle over the jobs that level's POSTs created (one indexed row read per request).",
    ]
    queue = results.get("queue")
    if queue:
        parts += [
            f"### Queued to running ({len(queue['jobs'])} digits jobs, one at a time)",
            queue_table(queue),
        ]
        parts.append(queue_text(queue))
    mixed = results.get("mixed")
    if mixed:
        parts += [
            f"### Submit and poll, the worker running ({mixed['duration_s']:g} s per level)",
            "Each client, in a loop for the level's time: `POST /v1/jobs` (the tiny digits job, with an "
            f"`Idempotency-Key` as the SDK sends), then {mixed['polls_per_job']} × `GET /v1/jobs/{{id}}` of "
            "that job, back to back; no cycle starts after the level's time, and those under way are finished "
            "and counted (so every level has the same mix of requests, and its wall time a tail). Meanwhile the "
            "Celery worker (as above) runs the queued jobs one after another, claiming, heartbeating and "
            "writing events in the same database. Each level is an owner of its own with an API key from the "
            "database (looked up on every request, as for any client but the bootstrap key), so each level's "
            "per-owner counts start from zero. Throughput counts 2xx answers of both endpoints over the "
            "level's wall time; a 503 (overloaded, with `Retry-After`, which the issue allows) is counted "
            "apart from other 5xx (never allowed) and the client waits its `Retry-After`.",
            mixed_table(mixed["levels"]),
            verdict_text(mixed["no_collapse"]),
        ]
    burst = results.get("burst")
    if burst:
        parts += [
            f"### Burst: {burst['jobs']:,} jobs submitted at once",
            burst_text(burst, results.get("accounting")),
        ]
    accounting = results.get("accounting")
    if accounting:
        parts += ["### Every job accounted for", accounting_table(accounting), accounting_text(accounting)]
    rows = load["post"] + load["get"] + (mixed["levels"] if mixed else [])
    peak = max((r["server_cpu_s"] or 0) / r["wall_s"] for r in rows if r["wall_s"])
    gen = max(r["client_cpu_s"] / r["wall_s"] for r in rows if r["wall_s"])
    server_kind = "the uvicorn process" if workers == 1 else "the uvicorn processes"
    parts.append(
        f"Read these as a floor for this machine, not a capacity claim. The load generator, uvicorn, "
        f"PostgreSQL and Redis share the same {m['cores']} cores, with each other and with whatever else runs "
        f"on the machine (see the load averages above). The CPU column is CPU time over the level's wall time: "
        f"{server_kind} used at most {peak:.2f} cores and the load generator at most {gen:.2f}; the rest went "
        f"to PostgreSQL (two commits per POST), Redis and the other work on the machine. "
        + (
            "A single uvicorn process runs the endpoints (sync, in its thread pool) under one GIL, so it "
            "cannot use much more than one core; "
            if workers == 1
            else ""
        )
        + "once the server is saturated, more clients add queueing rather than throughput: latency then "
        "grows roughly in proportion to the number of clients (p50 ≈ clients / throughput). More API "
        "processes (`--api-workers`), more cores, or a load generator on another machine would each move "
        "these figures." + _contention(m, peak)
    )
    if mixed:
        parts.append(mixed_reading(mixed))
    return f"{START}\n" + "\n\n".join(parts).rstrip() + f"\n{END}\n"


def _contention(machine: dict[str, Any], peak: float) -> str:
    """A warning when the machine had more runnable work than cores all along."""
    low = min(machine["load_avg_1m_start"], machine["load_avg_1m_end"])
    if low <= machine["cores"]:
        return ""
    nice = f", and the benchmark ran at niceness {machine['nice']}" if machine.get("nice") else ""
    return (
        f" In this run the machine was busy throughout (load average at least {low:.1f} on "
        f"{machine['cores']} cores){nice}: the server never had "
        f"more than {peak:.2f} of a core, so these figures measure the contention more than the service; "
        f"compare them only with runs at a similar load."
    )


def mixed_reading(mixed: dict[str, Any]) -> str:
    """Where submit-and-poll saturates, from the figures."""
    rows = mixed["levels"]
    best = max(rows, key=lambda r: r["throughput_rps"])
    top = rows[-1]
    errors = sum(r["server_errors"] for r in rows)
    unavailable = sum(r["unavailable_503"] for r in rows)
    return (
        f"Submit and poll: throughput peaked at {best['concurrency']} clients ({best['throughput_rps']:.0f} "
        f"2xx/s, {best['jobs_per_s']:.0f} jobs/s); at {top['concurrency']} clients it was "
        f"{top['throughput_rps']:.0f} 2xx/s with a POST p99 of {_ms(top['post']['p99_ms'], 0)} ms: past the "
        f"saturation point the extra clients wait in the event loop for one of the API's threads (`API_THREADS`, api/app.py; each "
        f"request holds one, and one database connection, only while it runs), so latency grows with the "
        f"number of clients while the rate of answers holds. Over all levels: {errors} 5xx other than 503, "
        f"{unavailable} 503s. The worker shares the cores: each tiny job forks a fresh process that imports "
        f"torch, a few CPU seconds taken from the API while it runs."
    )
