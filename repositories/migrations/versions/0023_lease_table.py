"""The live leases of pipelines of limited names in a narrow table of their own on PostgreSQL
(issue #28 item 4), so that a claim is a HOT update: an UPDATE is heap-only only when no indexed
column changes, and ``ix_pipelines_leased`` (name, lease_owner) WHERE lease_owner IS NOT NULL
(0017) changed with every claim (it sets the owner) and every release (it clears it). W1 wrote
each pipeline row 5 times and 3 were HOT; without the lease in an index of the pipelines table,
4 can be (the end still changes ``status``, a key of the claim order and listing indexes).

- ``pipeline_leases`` holds one row (uuid, name) per leased pipeline of a name entered in
  ``pipeline_limited_names``, and is indexed on ``name``: ``max_running`` counts a name's
  leases there, joined to the pipelines for the status and expiry (``repositories.sql_limits``),
  as it read the index before. A name is entered by its first limited claim, which copies the
  leases stored until then (``repositories.postgresql_leases``). Names without limits get no
  rows: a row per lease would leave a dead tuple per release for vacuum, which is what this
  is for.
- Triggers on pipelines keep it, whoever writes the lease (this prorch's claims, ``claim_one``,
  the limited claim, releases, an older prorch still writing ``lease_owner`` on the row): one
  fires only when the owner goes from NULL to set or back (a lease's renewals and a takeover
  of an expired lease by another owner fire none), on an insert of a leased row, and on the
  delete of a leased row (retention, purge), so no side row outlives its pipeline.
- ``fillfactor`` 40 for the pipelines (was 60, 0017): see ``FILLFACTOR``. New pages only.
- ``ix_pipelines_leased`` is dropped on PostgreSQL. SQLite has no HOT updates and keeps it (its
  claim stays as it was). An older prorch's ``max_running`` count still finds the right
  leases on this schema, by the name's claim index instead (it reads the name's pending rows).

Revision ID: 0023
"""

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None
additive = True  # a table kept by triggers and an index dropped: an older prorch counts the same leases

OWNED = sa.text("lease_owner IS NOT NULL")
FILLFACTOR = 40
"""Room in each new page of pipelines for a version of every row: a claim or a round of group
commit updates many rows of one page in one transaction, whose old versions cannot be pruned
before it commits (W1, N=1,000: 72% of the pipelines' updates HOT at 60, 77% at 45, 80%, all
but the ends, at 40 and 35)."""

POSTGRESQL = (
    "CREATE TABLE pipeline_leases (pipeline_uuid varchar(36) NOT NULL, name varchar(200) NOT NULL, "
    "CONSTRAINT pipeline_leases_pkey PRIMARY KEY (pipeline_uuid))",
    "CREATE INDEX ix_pipeline_leases_name ON pipeline_leases (name)",
    "CREATE TABLE pipeline_limited_names (name varchar(200) NOT NULL, ready boolean NOT NULL DEFAULT false, "
    "CONSTRAINT pipeline_limited_names_pkey PRIMARY KEY (name))",
    # VOLATILE (the default): each look-up sees the names entered up to that moment
    "CREATE FUNCTION prorch_pipeline_leases() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF TG_OP = 'DELETE' OR NEW.lease_owner IS NULL THEN "
    "DELETE FROM pipeline_leases WHERE pipeline_uuid = OLD.uuid; "
    "ELSIF EXISTS (SELECT FROM pipeline_limited_names WHERE name = NEW.name) THEN "
    "INSERT INTO pipeline_leases (pipeline_uuid, name) VALUES (NEW.uuid, NEW.name) "
    "ON CONFLICT (pipeline_uuid) DO NOTHING; END IF; "
    "RETURN NULL; END $$",
    "CREATE TRIGGER pipeline_leases_on_insert AFTER INSERT ON pipelines FOR EACH ROW "
    "WHEN (NEW.lease_owner IS NOT NULL) EXECUTE FUNCTION prorch_pipeline_leases()",
    "CREATE TRIGGER pipeline_leases_on_update AFTER UPDATE OF lease_owner ON pipelines FOR EACH ROW "
    "WHEN ((OLD.lease_owner IS NULL) <> (NEW.lease_owner IS NULL)) EXECUTE FUNCTION prorch_pipeline_leases()",
    "CREATE TRIGGER pipeline_leases_on_delete AFTER DELETE ON pipelines FOR EACH ROW "
    "WHEN (OLD.lease_owner IS NOT NULL) EXECUTE FUNCTION prorch_pipeline_leases()",
)
TRIGGERS = ("pipeline_leases_on_insert", "pipeline_leases_on_update", "pipeline_leases_on_delete")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in POSTGRESQL:
        op.execute(statement)
    op.drop_index("ix_pipelines_leased", table_name="pipelines")
    op.execute(f"ALTER TABLE pipelines SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON pipelines")
    op.execute("DROP FUNCTION IF EXISTS prorch_pipeline_leases()")
    op.execute("DROP TABLE pipeline_leases")
    op.execute("DROP TABLE pipeline_limited_names")
    op.execute("ALTER TABLE pipelines SET (fillfactor = 60)")  # 0017's
    op.create_index("ix_pipelines_leased", "pipelines", ["name", "lease_owner"], postgresql_where=OWNED)
