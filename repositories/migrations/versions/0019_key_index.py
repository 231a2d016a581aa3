"""Finding pipelines by creation key (issue #30): ``create(key=..., if_running=...)`` and
``debounce`` look a key up by its column, since such a key may name several pipelines over
time (its uuid is no longer derived from it). Only keyed rows are indexed.

Revision ID: 0019
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None
additive = True  # an index only

KEYED = sa.text("key IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_pipelines_key", "pipelines", ["key"], sqlite_where=KEYED, postgresql_where=KEYED)


def downgrade() -> None:
    op.drop_index("ix_pipelines_key", table_name="pipelines")
