"""Tracing: the W3C trace context a pipeline was created in (``prorch.model.trace_context``), so that
its resumes, in any process, join one trace.

Revision ID: 0011
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None
additive = True  # a nullable column: an older prorch keeps working on this schema

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("trace", Json))


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("trace")
