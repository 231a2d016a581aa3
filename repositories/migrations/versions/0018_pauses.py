"""Pauses (issue #29): one row per paused scope (a class, a class version, a tenant, a pipeline),
which the claim checks by primary key (``prorch.model.pauses``, ``prorch pause``).

Revision ID: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None
additive = True  # a new table: an older prorch keeps working on this schema (and ignores pauses)


def upgrade() -> None:
    op.create_table(
        "pauses",
        sa.Column("scope", sa.String(300), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(1000)),
        sa.Column("reason", sa.String(1000)),
    )


def downgrade() -> None:
    op.drop_table("pauses")
