"""Search attributes (issue #29): a pipeline's ``attributes`` (a JSON object of strings) and a
narrow ``pipeline_attributes`` table, one row per attribute with the pipeline's ``created_at``,
indexed by (name, value, created_at, uuid): a listing filtered by an attribute reads one range
of that index, newest first, as an unfiltered one reads ``ix_pipelines_created``.

Triggers on the pipelines table keep the rows in step with the column: an update that sets
``attributes`` (on every path: SQLAlchemy, SQLite's fast path, PostgreSQL's one-statement
transitions, group commit) rewrites them in its own transaction, and a deleted pipeline takes
its rows along. An update that does not set ``attributes`` (nearly every transition) fires
none. New pipelines' rows: an insert trigger on PostgreSQL; on SQLite, whose inserts an
insert trigger made 2 to 3 times slower even when it did nothing (measured: 48 -> 153 us a
row), the backend writes them with the pipelines (``SQLiteRepository.save_many``).

Step logs (issue #29): a step's ``logs`` (JSON: what its hooks logged, by attempt), nullable.

A later migration that recreates the pipelines table on SQLite (``batch_alter_table`` with
``recreate="always"``) drops these triggers and must create them again (``SQLITE_TRIGGERS``).

Revision ID: 0021
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None
additive = True  # columns with defaults and a table kept by triggers: an older prorch keeps working

Json = sa.JSON().with_variant(JSONB(), "postgresql")

_ROWS = (
    "INSERT INTO pipeline_attributes (pipeline_uuid, name, value, created_at) "
    "SELECT NEW.uuid, key, value, NEW.created_at FROM {each}"
)

SQLITE_TRIGGERS = (
    "CREATE TRIGGER pipeline_attributes_on_update AFTER UPDATE OF attributes ON pipelines "
    "WHEN OLD.attributes IS NOT NEW.attributes "
    "BEGIN DELETE FROM pipeline_attributes WHERE pipeline_uuid = OLD.uuid; "
    f"{_ROWS.format(each='json_each(NEW.attributes)')}; END",
    "CREATE TRIGGER pipeline_attributes_on_delete AFTER DELETE ON pipelines "
    "BEGIN DELETE FROM pipeline_attributes WHERE pipeline_uuid = OLD.uuid; END",
)

POSTGRESQL_TRIGGERS = (
    "CREATE FUNCTION prorch_pipeline_attributes() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF TG_OP <> 'INSERT' THEN DELETE FROM pipeline_attributes WHERE pipeline_uuid = OLD.uuid; END IF; "
    f"IF TG_OP <> 'DELETE' THEN {_ROWS.format(each='jsonb_each_text(NEW.attributes)')}; END IF; "
    "RETURN NULL; END $$",
    "CREATE TRIGGER pipeline_attributes_on_insert AFTER INSERT ON pipelines FOR EACH ROW "
    "WHEN (NEW.attributes <> '{}'::jsonb) EXECUTE FUNCTION prorch_pipeline_attributes()",
    "CREATE TRIGGER pipeline_attributes_on_update AFTER UPDATE OF attributes ON pipelines FOR EACH ROW "
    "WHEN (OLD.attributes IS DISTINCT FROM NEW.attributes) EXECUTE FUNCTION prorch_pipeline_attributes()",
    "CREATE TRIGGER pipeline_attributes_on_delete AFTER DELETE ON pipelines FOR EACH ROW "
    "WHEN (OLD.attributes <> '{}'::jsonb) EXECUTE FUNCTION prorch_pipeline_attributes()",
)

TRIGGERS = ("pipeline_attributes_on_insert", "pipeline_attributes_on_update", "pipeline_attributes_on_delete")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    # a plain string default: with a SQL expression as default, SQLite's batch would copy the
    # table to add the column, and the copy would lose the DESC of the claim indexes (0016)
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("attributes", Json, nullable=False, server_default="{}"))
    op.create_table(
        "pipeline_attributes",
        sa.Column("pipeline_uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.String(200), nullable=False),
        sa.Column("created_at", Timestamp),
        sa.PrimaryKeyConstraint("pipeline_uuid", "name", name="pipeline_attributes_pkey"),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    # newest first, as listings read: PostgreSQL walks an index in ORDER BY created_at DESC NULLS
    # LAST only if it is built so (else it sorts every match: 28 ms instead of 6 for a page of 50
    # among 50,000 matches); SQLite's backward walk already gives that order
    newest: list[str | sa.TextClause] = ["created_at", "pipeline_uuid"]
    if postgresql:
        newest = [sa.text("created_at DESC NULLS LAST"), sa.text("pipeline_uuid DESC")]
    op.create_index("ix_pipeline_attributes_value", "pipeline_attributes", ["name", "value", *newest])
    with op.batch_alter_table("pipeline_steps") as batch:
        batch.add_column(sa.Column("logs", Json))
    for statement in POSTGRESQL_TRIGGERS if postgresql else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (" ON pipelines" if postgresql else ""))
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS prorch_pipeline_attributes()")
    op.drop_index("ix_pipeline_attributes_value", table_name="pipeline_attributes")
    op.drop_table("pipeline_attributes")
    with op.batch_alter_table("pipeline_steps") as batch:
        batch.drop_column("logs")
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("attributes")
