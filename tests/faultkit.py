"""Helpers for tests with real processes and faults: the job invariant every fault test asserts,
subprocess management, and private Redis / PostgreSQL servers a test may kill and restart (the shared
servers on 6379 / 5432 are never touched)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from pruning_core.settings import Settings
from store import repo
from store.db import make_engine, migrate, read_sessions, session_scope
from store.files import resolve_under, sha256_file
from store.models import Job

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = ("succeeded", "failed", "cancelled")


# --- the invariant ---


def check_job(engine: Engine, job_id: str, artifacts_root: Path) -> Job:
    """Assert what every fault must leave behind, and return the row:

    - exactly one terminal state: the row's, announced by exactly one terminal status event, the last
      status event;
    - at most ``max_attempts`` attempts, and as many ``running`` events as attempts claimed;
    - events numbered 1..n without gaps;
    - one set of artifacts: if succeeded, every row of the finishing attempt, each file on disk with its
      recorded size and sha256, and nothing else under the job's directory (no other attempt, no
      checkpoint); otherwise no artifact and no directory.
    """
    with read_sessions(engine)() as s:
        job = repo.get_job(s, job_id)
        evs = [(e.seq, e.kind, e.data) for e in repo.events_after(s, job_id, 0, limit=100_000)]
        arts = repo.list_artifacts(s, job_id)
    assert job is not None, job_id
    assert job.status in TERMINAL, (job_id, job.status)
    assert [seq for seq, _, _ in evs] == list(range(1, len(evs) + 1)), "events numbered without gaps"
    status_evs = [d["status"] for _, k, d in evs if k == "status"]
    assert [st for st in status_evs if st in TERMINAL] == [job.status], status_evs
    assert status_evs[-1] == job.status, status_evs
    assert 0 <= job.attempt <= job.max_attempts, (job.attempt, job.max_attempts)
    assert status_evs.count("running") == job.attempt, status_evs
    job_dir = artifacts_root / job_id
    if job.status != "succeeded":
        assert arts == [], [a.name for a in arts]
        assert not job_dir.exists(), sorted(p.name for p in job_dir.rglob("*"))
        return job
    assert arts and {a.attempt for a in arts} == {job.attempt}, [(a.name, a.attempt) for a in arts]
    for a in arts:
        path = resolve_under(artifacts_root, a.path)
        assert (path.stat().st_size, sha256_file(path)) == (a.size, a.sha256), a.name
    on_disk = {p.relative_to(artifacts_root).as_posix() for p in job_dir.rglob("*") if p.is_file()}
    assert on_disk == {a.path for a in arts}, sorted(on_disk ^ {a.path for a in arts})
    return job


def events(engine: Engine, job_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    with read_sessions(engine)() as s:
        return [(e.seq, e.kind, e.data) for e in repo.events_after(s, job_id, 0, limit=100_000)]


def get(engine: Engine, job_id: str) -> Job:
    with read_sessions(engine)() as s:
        return repo.get_job(s, job_id)


def done(engine: Engine, job_id: str) -> Job | None:
    job = get(engine, job_id)
    return job if job.status in TERMINAL else None


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- processes ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def service_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a service process under test: its own state dir, fast heartbeats, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "STATE_DIR")}
    env |= {
        "STATE_DIR": str(tmp_path / "state"),
        "HEARTBEAT_S": "0.5",
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    return env | extra


class Procs:
    """Subprocesses in their own sessions, logs to files; all killed (group-wide) at the end."""

    def __init__(self, tmp_path: Path, env: dict[str, str]):
        self.tmp_path, self.env, self.procs = tmp_path, env, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.tmp_path / f"{name}.log").open("ab")
        p = subprocess.Popen(
            args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        p.log_path = self.tmp_path / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def celery_worker(self, name: str, app: str = "worker.celery_app") -> subprocess.Popen:
        return self.start(
            name,
            str(BIN / "celery"),
            "-A",
            app,
            "worker",
            "-n",
            f"{name}@%h",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        )

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        """SIGKILL the process group, and any descendant in a group of its own (the local runner's jobs)."""
        strays = descendants(p.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log_path.read_text(errors='replace')[-3000:]}"  # type: ignore[attr-defined]
            for p in self.procs
        )

    def close(self) -> None:
        for p in self.procs:
            self.kill(p)


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [c for c, pp in parents.items() if pp == parent]
        out += children
        todo += children
    return out


def kill_children(pid: int) -> list[int]:
    """SIGKILL the direct children of ``pid`` (a Celery worker's pool child, the local runner's job)."""
    kids = [c for c in descendants(pid) if _parent(c) == pid]
    for c in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(c, signal.SIGKILL)
    return kids


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# --- private servers ---


class RedisServer:
    """A redis-server of our own on a free port, nothing on disk: a restart loses every key."""

    def __init__(self, tmp_path: Path):
        self.port, self.dir = free_port(), tmp_path / "redis"
        self.dir.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), 10, "redis-server", every=0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PostgresServer:
    """A PostgreSQL instance of our own (initdb in a temp dir, a free port, trust auth) that a test may
    stop and start. As root, the server runs as the ``postgres`` user (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: other pytest sessions reset /tmp/pytest-of-<user> to 0700, which
        # would lock the postgres user out of its data directory in the middle of a test.
        self.port, self.dir = free_port(), Path(tempfile.mkdtemp(prefix="pruning-test-pg-"))
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @staticmethod
    def available() -> bool:
        root_ok = os.geteuid() != 0 or shutil.which("runuser") is not None
        return (PG_BIN / "initdb").is_file() and root_ok

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        out = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"{' '.join(args[:1])} failed ({out.returncode}): {out.stdout}{out.stderr}")

    def init(self) -> None:
        if self.prefix:
            shutil.chown(self.dir, "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        self.start()

    def start(self, tries: int = 3) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        for i in range(tries):
            try:
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-o", opts, "-w", "-l",
                          str(self.dir / "log"), "start")  # fmt: skip
                return
            except RuntimeError as err:  # seen once: a start right after a stop failed; say why, retry
                print(err, file=sys.stderr)
                if i == tries - 1:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, RuntimeError):
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


# --- jobs sent as the API sends them, to real Celery workers ---


def submit(engine: Engine, job_spec: dict[str, Any], owner: str = "alice", max_attempts: int = 3) -> str:
    """A queued job row for ``owner`` (the API's commit, without the enqueue); its id."""
    with session_scope(engine) as s:
        job, _ = repo.create_job(s, owner, job_spec, "magnitude", max_attempts=max_attempts)
        return job.id


@contextlib.contextmanager
def celery_stack(
    pg_url: str, redis_url: str, tmp_path: Path, procs: Procs, env: dict[str, str], **settings: Any
) -> Iterator[tuple[Settings, Engine, Callable[..., str], Callable[[str], None]]]:
    """A migrated database, ``procs`` set up to start workers (``env`` on top of the service's), and
    (settings, engine, ``send(spec, max_attempts=3) -> job id``, enqueue): ``send`` commits, enqueues
    and marks the job enqueued, as the API does. ``settings``: fields of this process's ``Settings``."""
    from worker.celery_app import enqueuer, make_app  # Celery only for the tests that use it

    migrate(pg_url)
    procs.env = service_env(tmp_path, DATABASE_URL=pg_url, REDIS_URL=redis_url, **env)
    config = Settings(database_url=pg_url, redis_url=redis_url, state_dir=tmp_path / "state", **settings)
    engine = make_engine(pg_url)
    app = make_app(config)
    enqueue = enqueuer(app)

    def send(job_spec: dict[str, Any], max_attempts: int = 3) -> str:
        job_id = submit(engine, job_spec, max_attempts=max_attempts)
        enqueue(job_id)
        with session_scope(engine) as s:
            repo.mark_enqueued(s, job_id)
        return job_id

    try:
        yield config, engine, send, enqueue
    finally:
        app.close()
        engine.dispose()
