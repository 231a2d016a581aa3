"""Progress reported by hooks, and the indexes behind ``prorch list`` and the dashboard.

- ``pipeline_steps.progress``: ``{"done", "total", "note", "at"}`` from ``self.progress()``.
- Newest-first listings by keyset (created_at, uuid), alone or after a status or name filter,
  so that a page of 50 out of 1,000,000 pipelines reads 50 index entries. ``ix_pipelines_name``
  is folded into the (name, created_at, uuid) index.
- Pipelines by (status, name, version), a covering index for the dashboard's counts (a status
  changes a few times in a pipeline's life, so it costs little on writes).
- A partial index of ended pipelines by ``updated_at``, for "ended in the last hour" (the
  dashboard's throughput chart); running pipelines are not in it, so a transition that does
  not end a pipeline never touches it.

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None
additive = True  # a nullable column and indexes: an older prorch keeps working on this schema

Json = sa.JSON().with_variant(JSONB(), "postgresql")
ENDED = sa.text("status IN ('finished', 'failed', 'cancelled')")


def upgrade() -> None:
    with op.batch_alter_table("pipeline_steps") as batch:
        batch.add_column(sa.Column("progress", Json))
    op.create_index("ix_pipelines_created", "pipelines", ["created_at", "uuid"])
    op.create_index("ix_pipelines_status_created", "pipelines", ["status", "created_at", "uuid"])
    op.create_index("ix_pipelines_name_created", "pipelines", ["name", "created_at", "uuid"])
    op.drop_index("ix_pipelines_name", table_name="pipelines")
    op.create_index("ix_pipelines_status_name", "pipelines", ["status", "name", "version"])
    op.create_index("ix_pipelines_ended", "pipelines", ["updated_at"], sqlite_where=ENDED, postgresql_where=ENDED)


def downgrade() -> None:
    op.drop_index("ix_pipelines_ended", table_name="pipelines")
    op.drop_index("ix_pipelines_status_name", table_name="pipelines")
    op.create_index("ix_pipelines_name", "pipelines", ["name"])
    op.drop_index("ix_pipelines_name_created", table_name="pipelines")
    op.drop_index("ix_pipelines_status_created", table_name="pipelines")
    op.drop_index("ix_pipelines_created", table_name="pipelines")
    with op.batch_alter_table("pipeline_steps") as batch:
        batch.drop_column("progress")
