"""A limited name leaves ``pipeline_limited_names`` once no claim has limited it for a day
(PostgreSQL; issue #28): 0023 entered a name at its first limited claim and kept it for ever,
so after a deploy that removed a class's limit its leases were still copied into
``pipeline_leases`` by the triggers at every claim and release (a row and a dead tuple each),
which is what the side table was made to avoid for unlimited names.

- ``pipeline_limited_names.limited_at``: when a claim that limits the name last said so (each
  worker's claims refresh the names they limit every few minutes,
  ``repositories.postgresql_leases.keep_limited_names``). A name not refreshed for
  ``LIMITED_NAME_KEPT`` is dropped with its lease rows by any worker's claim; a worker that
  still limits it re-enters it (and counts from the pipelines until then). Rows entered before
  this migration take its time: an older prorch, which counts from the table without looking
  whether its name is still there, has a day to be replaced (docs/operations.md).

Revision ID: 0024
"""

from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None
additive = True  # a column with a default: an older prorch's entry of a name still works


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # now() is stable: the rows already there take the migration's time, without a rewrite
    op.execute("ALTER TABLE pipeline_limited_names ADD COLUMN limited_at timestamptz NOT NULL DEFAULT now()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE pipeline_limited_names DROP COLUMN limited_at")
