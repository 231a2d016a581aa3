"""Child pipelines: a pipeline started from another's hook (``self.start_child``) records its
parent, so that the parent is woken when it ends, its result can be read, and cancelling the
parent cancels it.

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None
additive = True  # a nullable column and its index: an older prorch keeps working on this schema


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("parent_uuid", sa.String(36)))
    op.create_index("ix_pipelines_parent", "pipelines", ["parent_uuid"])


def downgrade() -> None:
    op.drop_index("ix_pipelines_parent", table_name="pipelines")
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("parent_uuid")
