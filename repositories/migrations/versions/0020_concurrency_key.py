"""Concurrency per key (``concurrency_key`` with ``max_running_per_key``, fair claims): each
pipeline's key value, computed at create time and stored, so that the claim counts and groups
by a column instead of reading params; an index of the keyed pipelines only, by (name, key,
status): a key's pipelines, without weighing on the plain claim's plans (a full index by status
and name made SQLite's planner leave the claim-order walk) nor on pipelines without a key.

Revision ID: 0020
"""

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0016"
branch_labels = None
depends_on = None
additive = True  # a nullable column and an index: an older prorch keeps working on this schema

KEYED = sa.text("concurrency_key IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("concurrency_key", sa.String(400)))
    op.create_index(
        "ix_pipelines_concurrency_key",
        "pipelines",
        ["name", "concurrency_key", "status"],
        sqlite_where=KEYED,
        postgresql_where=KEYED,
    )


def downgrade() -> None:
    op.drop_index("ix_pipelines_concurrency_key", table_name="pipelines")
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("concurrency_key")
