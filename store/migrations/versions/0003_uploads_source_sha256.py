"""uploads: source_sha256 (the body as sent; a converted .pth differs from the stored file), indexed
with owner so that an owner's earlier upload of the same bytes is found without a scan; tensors (a
weights file's names and shapes, checked against the model at submit)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 04:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("tensors", sa.JSON(), nullable=True))
    # every upload so far was stored as sent
    op.execute("UPDATE uploads SET source_sha256 = sha256")
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.alter_column("source_sha256", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_index("ix_uploads_owner_source_sha256", ["owner", "source_sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.drop_index("ix_uploads_owner_source_sha256")
        batch_op.drop_column("tensors")
        batch_op.drop_column("source_sha256")
