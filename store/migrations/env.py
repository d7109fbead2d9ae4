"""Alembic environment: the URL from the config (set by store.db.migrate) or the one Settings object."""

from alembic import context
from sqlalchemy import text

from pruning_core.settings import get_settings
from store.db import make_engine, normalize_url
from store.models import Base

config = context.config
url = normalize_url(config.get_main_option("sqlalchemy.url") or get_settings().sqlalchemy_url)

# Any constant: every process migrating the same PostgreSQL database queues on this lock, so an API and a
# worker started together do not both try to create the tables.
MIGRATION_LOCK_ID = 0x5052554E  # "PRUN"


def run_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(url)
    sqlite = url.startswith("sqlite")
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # session-level: held until released below, across the whole migration run
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
            conn.commit()
        try:
            context.configure(
                connection=conn,
                target_metadata=Base.metadata,
                render_as_batch=sqlite,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
        finally:
            if conn.in_transaction():  # only after a failure: roll it back before unlocking
                conn.rollback()
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
                conn.commit()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
