"""``python -m bench.service`` end to end with tiny numbers against the real PostgreSQL and Redis: a real
uvicorn server, a real Celery worker, the results JSON and the markdown section (a temporary file, never
the repository's BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import redis

from bench import service, service_markdown

LEVELS = (1, 4)
REQUESTS = 20


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
    assert path.name in text
