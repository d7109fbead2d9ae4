"""``python -m bench.service`` end to end with tiny numbers against the real PostgreSQL and Redis: a real
uvicorn server, a real Celery worker, the results JSON and the markdown section (a temporary file, never
the repository's BENCHMARKS.md). The properties the issue asks of the load test are asserted here at a
small size: no 5xx but 503 (and a 503 always with Retry-After), every burst job created once, a replay
creating nothing, every job's broker message there exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import redis

from bench import service, service_markdown

LEVELS = (1, 4)
REQUESTS = 20
MIXED = (1, 8)
BURST, REPLAYS = 40, 10


def test_job_count_lost_and_duplicated() -> None:
    c = service.JobCount()
    c.add("q1", "queued", "k1", True, 1)  # waiting once: fine
    c.add("q0", "queued", "k2", True, 0)  # no message: lost
    c.add("q2", "queued", "k3", True, 2)  # twice: duplicated
    c.add("r1", "running", "k4", True, 1)  # in hand, or back for a resumption: fine
    c.add("s0", "succeeded", None, True, 0)
    c.add("s1", "succeeded", None, False, 1)  # finished yet still queued: duplicated
    s = c.summary()
    assert (s["rows"], s["accounted_once"], s["lost"], s["duplicated"]) == (6, 3, 1, 2)
    assert s["distinct_keys"] == 4 and s["not_marked_enqueued"] == 1
    assert set(s["examples"]) == {"q0", "q2", "s1"}


def test_no_collapse_compares_the_top_level_with_16() -> None:
    rows = [{"concurrency": n, "throughput_rps": rps} for n, rps in ((1, 50), (16, 100), (256, 99))]
    assert service.no_collapse(rows) == {
        "low": 16,
        "high": 256,
        "low_rps": 100,
        "high_rps": 99,
        "ratio": 0.99,
        "pass": False,
    }
    assert service.no_collapse(rows[:2]) is None  # nothing above 16
    assert service.no_collapse(rows[:1] + rows[2:]) is None  # no 16


def test_update_section_replaces_only_its_own_markers(tmp_path: Path) -> None:
    md = tmp_path / "B.md"
    md.write_text("# Title\n\n<!-- bench:cpu -->\ncpu text\n<!-- /bench:cpu -->\n")
    section = f"{service_markdown.START}\nfirst\n{service_markdown.END}\n"
    service_markdown.update_section(md, section)
    service_markdown.update_section(md, section.replace("first", "second"))
    text = md.read_text()
    assert text.startswith("# Title\n\n<!-- bench:cpu -->\ncpu text\n<!-- /bench:cpu -->\n")
    assert text.count(service_markdown.START) == 1 and "second" in text and "first" not in text


def test_service_benchmark_tiny_run(tmp_path: Path, pg_server: str, redis_url: str) -> None:
    out, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    argv = ["--concurrency", ",".join(map(str, LEVELS)), "--requests", str(REQUESTS)]
    argv += ["--queue-jobs", "1", "--back-to-back", "0", "--max-seconds", "30"]
    argv += ["--mixed", ",".join(map(str, MIXED)), "--mixed-seconds", "2", "--polls", "2"]
    argv += ["--burst", str(BURST), "--replays", str(REPLAYS)]
    argv += ["--pg-admin-url", pg_server, "--redis-url", redis_url, "--out", str(out), "--markdown", str(md)]
    assert service.main(argv) == 0

    (path,) = out.glob("service-*.json")
    results = json.loads(path.read_text())
    load = results["load"]
    for endpoint in ("post", "get"):
        rows = load[endpoint]
        assert [r["concurrency"] for r in rows] == list(LEVELS)
        for r in rows:
            assert r["errors"] == 0, r
            assert r["completed"] == r["ok"] == REQUESTS and not r["capped"]
            assert 0 < r["p50_ms"] <= r["p99_ms"]
            assert r["throughput_rps"] > 0
    # every POST made its own job, committed and sent to the broker once
    posts = len(LEVELS) * REQUESTS + load["warmup_requests"]
    assert all(r["distinct_ids"] == REQUESTS for r in load["post"])
    assert load["post_ids"] == load["post_ids_distinct"] == posts
    assert load["db"] == {"rows": posts, "distinct_ids": posts, "enqueued": posts}
    assert load["queued_messages"] == posts

    (job,) = results["queue"]["jobs"]
    assert job["series"] == "idle" and job["status"] == "succeeded"
    assert 0 < job["created_to_started_s"] < 60
    assert 0 < job["post_answered_to_running_seen_s"] < 60
    assert job["started_to_first_phase_s"] > 0

    # submit and poll with the worker running: no 5xx but 503, and a 503 says when to come back
    mixed = results["mixed"]["levels"]
    assert [r["concurrency"] for r in mixed] == list(MIXED)
    for r in mixed:
        assert r["server_errors"] == 0 and r["other_errors"] == 0 and r["no_retry_after"] == 0, r
        assert r["post"]["ok"] > 0 and r["get"]["ok"] > 0 and r["throughput_rps"] > 0
        assert r["jobs"] == r["distinct_jobs"] == r["post"]["ok"]
        for endpoint in ("post", "get"):
            assert 0 < r[endpoint]["p50_ms"] <= r[endpoint]["p99_ms"]

    # the burst: one job per key, a replay returns the same job and creates nothing
    burst = results["burst"]
    assert burst["created"] == burst["distinct_ids"] == BURST
    assert burst["final_answers"] == {"201": BURST}
    assert burst["replay_answers"] == {"200": REPLAYS} and burst["replays_same_job"] == REPLAYS

    # every job of those owners accounted for once, in PostgreSQL and Redis
    accounting = results["accounting"]
    owners = accounting["owners"]
    assert set(owners) == {f"mixed-{n}" for n in MIXED} | {"burst"}
    assert owners["burst"]["rows"] == BURST
    for n, r in zip(MIXED, mixed, strict=True):
        assert owners[f"mixed-{n}"]["rows"] == r["jobs"]
    for a in owners.values():
        assert a["rows"] == a["distinct_ids"] == a["distinct_keys"] == a["accounted_once"], a
        assert a["lost"] == a["duplicated"] == a["not_marked_enqueued"] == 0, a
    assert accounting["messages_without_a_job"] == []

    # cleaned up: the database is gone, the Redis index is empty
    with psycopg.connect(pg_server) as conn:
        gone = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (results["setup"]["database"],))
        assert gone.fetchone() is None
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()

    text = md.read_text()
    assert text.startswith(service_markdown.START) and text.rstrip().endswith(service_markdown.END)
    assert "### `POST /v1/jobs`" in text and "### `GET /v1/jobs/{id}`" in text
    for n in LEVELS:
        assert text.count(f"| {n} | {REQUESTS} |") == 2  # a row in each endpoint's table
    assert "| 1 | idle worker |" in text and "succeeded" in text
    assert "### Submit and poll, the worker running" in text and "No collapse: not judged" in text
    assert f"### Burst: {BURST:,} jobs submitted at once" in text and "### Every job accounted for" in text
    for n in MIXED:
        assert f"| mixed-{n} |" in text
    assert path.name in text
