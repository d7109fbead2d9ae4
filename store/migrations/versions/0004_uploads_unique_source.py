"""uploads: one row per (owner, kind, source_sha256), a unique index, so that concurrent uploads of the
same bytes by one owner store one file (the loser of the insert is answered with the winner's upload).
Duplicates made before it are merged into the owner's oldest upload of those bytes: jobs that name a
duplicate (``upload:<id>`` in their spec) are pointed at the oldest, then the duplicate rows go (their
files stay on disk, unreferenced: never served, removed with the upload root).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 04:00:00
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UNIQUE = "uq_uploads_owner_kind_source_sha256"
REF_FIELDS = (("model", "weights"), ("kd", "teacher"), ("data", "root"))  # as store.repo.UPLOAD_REF_FIELDS

uploads = sa.table(
    "uploads",
    sa.column("id", sa.String),
    sa.column("owner", sa.String),
    sa.column("kind", sa.String),
    sa.column("source_sha256", sa.String),
    sa.column("created_at", sa.DateTime),
)
jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("owner", sa.String), sa.column("spec", sa.JSON))


def _duplicates(bind: sa.Connection) -> dict[str, tuple[str, str]]:
    """duplicate upload id -> (owner, the id of the owner's oldest upload of the same bytes and kind)."""
    u = uploads.c
    rows = sa.select(u.id, u.owner, u.kind, u.source_sha256).order_by(
        u.owner, u.kind, u.source_sha256, u.created_at, u.id
    )
    first: dict[tuple[str, str, str], str] = {}
    dups: dict[str, tuple[str, str]] = {}
    for id_, owner, kind, sha in bind.execute(rows):
        if (kept := first.setdefault((owner, kind, sha), id_)) != id_:
            dups[id_] = (owner, kept)
    return dups


def _repoint(spec: dict[str, Any], to: dict[str, str]) -> bool:
    """Point ``spec``'s upload references at the kept uploads; whether it changed."""
    changed = False
    for section, field in REF_FIELDS:
        value = (spec.get(section) or {}).get(field)
        if isinstance(value, str) and value.startswith("upload:") and value[7:] in to:
            spec[section][field] = f"upload:{to[value[7:]]}"
            changed = True
    return changed


def upgrade() -> None:
    bind = op.get_bind()
    if dups := _duplicates(bind):
        to = {dup: kept for dup, (_, kept) in dups.items()}
        owners = sorted({owner for owner, _ in dups.values()})
        for job_id, spec in bind.execute(sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.owner.in_(owners))):
            spec = {k: dict(v) if isinstance(v, dict) else v for k, v in (spec or {}).items()}
            if _repoint(spec, to):
                bind.execute(jobs.update().where(jobs.c.id == job_id).values(spec=spec))
        bind.execute(uploads.delete().where(uploads.c.id.in_(list(dups))))
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.create_index(UNIQUE, ["owner", "kind", "source_sha256"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.drop_index(UNIQUE)
