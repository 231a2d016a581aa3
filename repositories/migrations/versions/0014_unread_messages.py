"""Messages read by index (issue #25): a pipeline's unread messages of a name, oldest first, in
a partial index of unread rows (``receive``, ``child_result``, whether mail waits), and its
messages by time (the newest, which ``send`` orders a new message after). Before, each of these
read every message the pipeline was ever sent.

Revision ID: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None
additive = True  # indexes only

UNREAD = sa.text("consumed_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_messages_unread",
        "pipeline_messages",
        ["pipeline_uuid", "name", "sent_at", "uuid"],
        sqlite_where=UNREAD,
        postgresql_where=UNREAD,
    )
    op.create_index("ix_messages_sent", "pipeline_messages", ["pipeline_uuid", "sent_at"])


def downgrade() -> None:
    op.drop_index("ix_messages_sent", table_name="pipeline_messages")
    op.drop_index("ix_messages_unread", table_name="pipeline_messages")
