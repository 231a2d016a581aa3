"""Schedules: each schedule's last created tick, kept apart from the pipelines, so that a purge
of a tick's pipeline cannot bring the tick back and a long stop is caught up in full.

Revision ID: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None
additive = True  # a new table: an older prorch keeps working on this schema


def upgrade() -> None:
    op.create_table(
        "schedule_ticks",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("tick", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("schedule_ticks")
