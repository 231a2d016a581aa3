"""Concurrency limits (``max_running``): the pipelines holding a lease, by name, in a partial
index. A claim of a limited name counts its live leases from it; only leased rows are in it (a
lease is cleared when released), so it stays as small as the work in flight.

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None
additive = True  # an index only

LEASED = sa.text("lease_expires_at IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_pipelines_leased", "pipelines", ["name", "lease_expires_at"], sqlite_where=LEASED, postgresql_where=LEASED
    )


def downgrade() -> None:
    op.drop_index("ix_pipelines_leased", table_name="pipelines")
