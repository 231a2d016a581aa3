"""Streams (``self.emit``, ``Orchestrator.stream``): one row per entry of a pipeline's stream,
clustered by (pipeline, seq) as the events are, so that reading a stream after a cursor is one
range of the primary key. Rows are inserted with their hook's transition and deleted with their
pipeline.

Revision ID: 0022
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None
additive = True  # a new table: an older prorch keeps working on this schema

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "pipeline_stream",
        sa.Column("uuid", sa.String(80), nullable=False),
        sa.Column("pipeline_uuid", sa.String(36), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("value", Json),
        sa.PrimaryKeyConstraint("pipeline_uuid", "seq", name="pipeline_stream_pkey"),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("pipeline_stream")
