"""Engine and sessions. SQLite (the default, embedded mode) gets WAL and a busy timeout so the API and
the local runner can share one file; PostgreSQL comes through DATABASE_URL.

SQLite transactions: the sqlite3 driver's own transaction handling is switched off and every
transaction opens with ``BEGIN IMMEDIATE`` (emitted lazily, when a session first touches the
database). A transaction therefore takes SQLite's single write lock up front and waits for it up to the
busy timeout (30 s) instead of failing: with deferred transactions a session that reads and then writes
(create_job, append_event, the API's "get then cancel") fails at once with "database is locked"
(SQLITE_BUSY_SNAPSHOT, which the busy timeout does not cover) whenever another process committed in
between. The price is that SQLite write transactions run one at a time, so keep sessions short: never
hold one across a training step, an upload or an SSE wait. SAVEPOINTs (``Session.begin_nested``) work
correctly in this mode.

Read-only sessions (``read_sessions``) never take the write lock: on SQLite they open a deferred
``BEGIN`` (a WAL snapshot, which proceeds while another connection writes), on PostgreSQL a READ ONLY
transaction. The API serves every GET from them, so a burst of reads cannot queue behind, or in front
of, the worker's claims and heartbeats.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from pruning_core.settings import get_settings

SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY = "pruning_read_only"  # execution option on read-only engines, seen by the SQLite BEGIN hook


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` -> the psycopg 3 driver (the one installed)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 20, wait_s: float = SQLITE_BUSY_TIMEOUT_S
) -> Engine:
    """An engine for ``url``. ``wait_s`` bounds both the wait for a pooled connection and (SQLite) the
    wait for the write lock; past it the caller gets ``sqlalchemy.exc.TimeoutError`` or
    ``OperationalError`` ("database is locked") instead of waiting on."""
    url = normalize_url(url)
    pool = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": wait_s}
    if url.startswith("sqlite"):
        database = make_url(url).database
        in_memory = not database or database == ":memory:"
        if not in_memory and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": wait_s},
            **({} if in_memory else pool),  # an in-memory database lives in one connection
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (see _begin)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(wait_s * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            reads_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if reads_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def read_only(engine: Engine) -> Engine:
    """The same engine and pool, for transactions that only read (see the module docstring)."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(**{READ_ONLY: True, "postgresql_readonly": True})
    return engine.execution_options(**{READ_ONLY: True})


@lru_cache
def get_engine(url: str | None = None) -> Engine:
    return make_engine(url or get_settings().sqlalchemy_url)


def sessions(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(engine or get_engine(), expire_on_commit=False)


def read_sessions(engine: Engine | None = None) -> sessionmaker[Session]:
    """Sessions whose transactions only read: never SQLite's write lock (PostgreSQL refuses writes)."""
    return sessions(read_only(engine or get_engine()))


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    with sessions(engine)() as s, s.begin():
        yield s


def _alembic_config(url: str | None):
    from alembic.config import Config

    here = Path(__file__).resolve().parent
    cfg = Config(str(here / "alembic.ini"))
    cfg.set_main_option("script_location", str(here / "migrations"))
    # ConfigParser interpolates "%": a URL-encoded password must be escaped
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().sqlalchemy_url).replace("%", "%%"))
    return cfg


def migrate(url: str | None = None, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision`` (the API and `make run` call this at start).

    Safe to run from several processes at once on PostgreSQL (an advisory lock serialises them)."""
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Run Alembic migrations down to ``revision`` ("base" drops every table)."""
    from alembic import command

    command.downgrade(_alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at (None if it was never migrated)."""
    from alembic.migration import MigrationContext

    engine = make_engine(url or get_settings().sqlalchemy_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()
