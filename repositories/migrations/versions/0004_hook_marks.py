"""Crash accounting by hook: when a hook started (cleared when its result is recorded) and how many
workers died in a row while one of the pipeline's hooks was running. Also the table that records,
for every migration applied, whether it only adds: an older prorch reads it to know whether it
can work on a schema newer than it understands.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None
additive = True  # new nullable/defaulted columns only: an older prorch keeps working on this schema


def upgrade() -> None:
    op.create_table(
        "prorch_schema_migrations",
        sa.Column("revision", sa.String(32), primary_key=True),
        sa.Column("additive", sa.Boolean, nullable=False),
    )
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("hook_started_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("crashes", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("crashes")
        batch.drop_column("hook_started_at")
    op.drop_table("prorch_schema_migrations")
