"""Shared fixtures for the service tests: real PostgreSQL and Redis on this machine (started if down),
fresh databases per test session, SQLite files per test."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Several torch processes share 2 cores in these tests (server, workers, CLI runs): with two OpenMP
# threads each, a thread spin-waiting for a preempted partner slows every process down (~100x seen), so
# the processes the tests start run one thread each (no partner to wait for). Only those: OpenMP reads
# the variables once, when torch loads it, so torch is imported here first and this process keeps its
# two threads and the default waiting. (Sleeping threads instead, OMP_WAIT_POLICY=PASSIVE, made this
# process's own digits training runs 2x slower: each of their many tiny parallel regions then pays a
# thread wake-up; an S2H run took 139 s instead of 55 s.)
import torch  # noqa: E402,F401  (before the variables below, on purpose)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Under pytest-xdist (`make test` runs two workers) each worker is one of two processes training on 2
# cores: one thread each, for the same reason.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... or None
if XDIST_WORKER:
    torch.set_num_threads(1)

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")

# The start commands this machine kind documents for a service that is down.
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ensure(port: int, start: str, what: str) -> None:
    if _port_open(port):
        return
    subprocess.run(start, shell=True, check=False, capture_output=True)
    for _ in range(50):
        if _port_open(port):
            return
        time.sleep(0.2)
    pytest.fail(f"{what} is not reachable on 127.0.0.1:{port} and could not be started with: {start}")


@pytest.fixture(scope="session")
def pg_server() -> str:
    _ensure(5432, PG_START, "PostgreSQL")
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = pg_server.replace("postgresql://", "postgresql://", 1)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_server.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _redis_dbs() -> Iterator[int]:
    """Redis database indexes 1-15, split between the xdist workers so that two never share one."""
    index = int(XDIST_WORKER[2:]) if XDIST_WORKER else 0
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return itertools.cycle(range(1 + index, 16, max(1, count)))


_REDIS_DBS = _redis_dbs()


@pytest.fixture(scope="session")
def redis_server() -> str:
    if shutil.which("redis-server"):
        _ensure(6379, REDIS_START, "Redis")
    return REDIS_BASE


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A Redis database index of its own (flushed before and after)."""
    import redis

    db = next(_REDIS_DBS)
    url = f"{redis_server}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator:
    """A redis-server of this test's own (nothing on disk), which the test may kill and restart."""
    from tests.faultkit import RedisServer

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def private_pg() -> Iterator:
    """A PostgreSQL instance of this test's own (initdb, a free port), which the test may restart."""
    from tests.faultkit import PostgresServer

    if not PostgresServer.available():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not available")
    server = PostgresServer()
    server.init()
    yield server
    server.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator:
    """Subprocesses started by the test, all killed at its end."""
    from tests.faultkit import Procs

    p = Procs(tmp_path, {})
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3-compatible server over HTTP on 127.0.0.1 (moto's server mode, in a thread), on a free port;
    its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A fresh bucket on ``s3_server`` and the settings that point at it (``object_store_url``,
    ``s3_endpoint_url``), with the standard AWS credential variables set for boto3."""
    import boto3

    from store import objects

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    objects.s3_client.cache_clear()  # a client made before keeps the credentials it was made with
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    yield {"object_store_url": f"s3://{bucket}/svc", "s3_endpoint_url": s3_server}
    objects.s3_client.cache_clear()
