"""Workers (issue #27): one row per running worker, kept by its heartbeat and deleted on a clean
stop (``prorch workers``, the dashboard's Workers page, stranded pipelines).

Revision ID: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None
additive = True  # a new table: an older prorch keeps working on this schema


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("prorch_version", sa.String(64), nullable=False),
        sa.Column("app_version", sa.String(64)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_seconds", sa.Float, nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("in_flight", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
