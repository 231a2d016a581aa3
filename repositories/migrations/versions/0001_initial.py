"""Pipelines, steps and events (prorch 2.0.0.dev0 first schema).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
additive = True  # only adds tables, columns and indexes: older prorch versions keep working

Json = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pipelines",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("params", Json, nullable=False),
        sa.Column("context", Json, nullable=False),
        sa.Column("metadata", Json, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("created_at", Timestamp),
        sa.Column("updated_at", Timestamp),
        sa.Column("next_run_at", Timestamp),
        sa.Column("lease_owner", sa.String(200)),
        sa.Column("lease_expires_at", Timestamp),
        sa.Column("last_error", Json),
        sa.Column("revision", sa.Integer, nullable=False),
    )
    op.create_index("ix_pipelines_due", "pipelines", ["status", "next_run_at", "priority"])
    op.create_index("ix_pipelines_name", "pipelines", ["name"])
    op.create_table(
        "pipeline_steps",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("pipeline_uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metadata", Json, nullable=False),
        sa.Column("output", Json),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("error", Json),
        sa.Column("started_at", Timestamp),
        sa.Column("finished_at", Timestamp),
        sa.Column("next_run_at", Timestamp),
        sa.Column("revision", sa.Integer, nullable=False),
    )
    op.create_index("ix_pipeline_steps_pipeline_uuid", "pipeline_steps", ["pipeline_uuid"])
    op.create_table(
        "pipeline_events",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("pipeline_uuid", sa.String(36), nullable=False),
        sa.Column("step_uuid", sa.String(36)),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("at", Timestamp, nullable=False),
        sa.Column("data", Json, nullable=False),
    )
    op.create_index("ix_pipeline_events_pipeline_uuid", "pipeline_events", ["pipeline_uuid"])


def downgrade() -> None:
    op.drop_table("pipeline_events")
    op.drop_table("pipeline_steps")
    op.drop_table("pipelines")
