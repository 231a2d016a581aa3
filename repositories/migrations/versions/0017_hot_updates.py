"""HOT-friendly pipeline rows (issue #28): on PostgreSQL an UPDATE is heap-only (HOT: no index
touched, its old version pruned from the page without a vacuum) only when no indexed column
changes value and the page has room. A pipeline's claim, hook mark and transitions change
``updated_at`` and the lease on every write, and two indexes had them as keys:

- ``ix_pipelines_leased`` (live leases by name, for ``max_running``) was keyed and filtered on
  ``lease_expires_at``, which every write extends. It is now on ``(name, lease_owner)`` for
  leased rows only: the owner is set by the claim and cleared by the release and stays the same
  in between, so a lease's renewals leave the index alone. The count still reads only the
  leased rows of the name and checks their expiry on the row.
- ``ix_pipelines_ended`` ("ended in the last hour", retention) was keyed on ``updated_at``. On
  PostgreSQL it is now on ``ended_at``, a stored generated column that is ``updated_at`` for an
  ended pipeline and NULL for a live one: it stays NULL while a pipeline runs, so its writes can
  be HOT. The column is PostgreSQL's alone (SQLite has no HOT updates and keeps its index on
  ``updated_at``) and is not in ``repositories.schema``'s table: nothing reads or writes it but
  the ended queries of ``repositories.sql_listing``. Adding it rewrites the table once.
- Pipelines and steps get ``fillfactor`` on PostgreSQL, so that pages keep room for the new
  version of a row (new pages only: existing ones fill as they are vacuumed).

Revision ID: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None
additive = True  # indexes, a generated column and storage settings: an older prorch works on it

ENDED = sa.text("status IN ('finished', 'failed', 'cancelled')")
LEASED = sa.text("lease_expires_at IS NOT NULL")
OWNED = sa.text("lease_owner IS NOT NULL")
ENDED_AT = "CASE WHEN status IN ('finished', 'failed', 'cancelled') THEN updated_at END"
FILLFACTOR = {"pipelines": 60, "pipeline_steps": 65}


def upgrade() -> None:
    op.drop_index("ix_pipelines_leased", table_name="pipelines")
    op.create_index(
        "ix_pipelines_leased", "pipelines", ["name", "lease_owner"], sqlite_where=OWNED, postgresql_where=OWNED
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE pipelines ADD COLUMN ended_at timestamptz GENERATED ALWAYS AS ({ENDED_AT}) STORED")
    op.drop_index("ix_pipelines_ended", table_name="pipelines")
    op.execute("CREATE INDEX ix_pipelines_ended ON pipelines (ended_at) WHERE ended_at IS NOT NULL")
    for table, fillfactor in FILLFACTOR.items():
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactor})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in FILLFACTOR:
            op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
        op.drop_index("ix_pipelines_ended", table_name="pipelines")
        op.execute("ALTER TABLE pipelines DROP COLUMN ended_at")
        op.create_index("ix_pipelines_ended", "pipelines", ["updated_at"], postgresql_where=ENDED)
    op.drop_index("ix_pipelines_leased", table_name="pipelines")
    op.create_index(
        "ix_pipelines_leased", "pipelines", ["name", "lease_expires_at"], sqlite_where=LEASED, postgresql_where=LEASED
    )
