"""Messages sent to pipelines, and an explicit order for events of one transition.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None
additive = True  # only adds tables, columns and indexes: older prorch versions keep working

Json = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("pipeline_events") as batch:
        batch.add_column(sa.Column("seq", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "pipeline_messages",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("pipeline_uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("payload", Json),
        sa.Column("sent_at", Timestamp, nullable=False),
        sa.Column("consumed_at", Timestamp),
    )
    op.create_index("ix_pipeline_messages_pipeline_uuid", "pipeline_messages", ["pipeline_uuid"])


def downgrade() -> None:
    op.drop_table("pipeline_messages")
    with op.batch_alter_table("pipeline_events") as batch:
        batch.drop_column("seq")
