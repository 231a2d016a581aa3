"""Rate limits: the claims of rate-limited pipeline names within their period
(``rate_limit = "100/minute"``), written and counted in the claim's transaction.

Revision ID: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None
additive = True  # a new table: an older prorch keeps working on this schema


def upgrade() -> None:
    op.create_table(
        "rate_limit_starts",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pipeline_uuid", sa.String(36), nullable=False),
        sa.PrimaryKeyConstraint("name", "started_at", "pipeline_uuid", name="rate_limit_starts_pkey"),
    )


def downgrade() -> None:
    op.drop_table("rate_limit_starts")
