"""Durability: crash counting, cancel requests, and rollback progress.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None
additive = True  # only adds tables, columns and indexes: older prorch versions keep working


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("claims", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()))
    with op.batch_alter_table("pipeline_steps") as batch:
        batch.add_column(sa.Column("rollback", sa.String(16)))
        batch.add_column(sa.Column("rollback_attempt", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("pipeline_steps") as batch:
        batch.drop_column("rollback_attempt")
        batch.drop_column("rollback")
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("cancel_requested")
        batch.drop_column("claims")
