"""Shared hook marks: whether the mark of a running hook was stored by a round of group commit,
in which several pipelines' hooks ran before one commit (a crash then cannot be pinned on one).

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None
additive = True  # one new column with a default: an older prorch keeps working on this schema


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("hook_shared", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("hook_shared")
