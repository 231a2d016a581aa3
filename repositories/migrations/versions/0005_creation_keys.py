"""Creation keys: the key a pipeline was created with (``create(key=...)``), kept for display and
search. Uniqueness needs no index of its own: the pipeline's uuid is derived from its key.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
additive = True  # one new nullable column: an older prorch keeps working on this schema


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("key", sa.String(200)))


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("key")
