"""Concurrency per key (``concurrency_key`` with ``max_running_per_key``, fair claims): each
pipeline's key, computed at create time and stored as JSON text (the tenant for a class that
declares no key), so that the claim counts and groups by a column instead of reading params;
the pending pipelines get their tenant's now. An index of the keyed rows by (name, status, key,
claim order): a name's keys, and a key's due pipelines in claim order. Partial, so that it does
not weigh on the plain claim's plans (a full index by status and name made SQLite's planner
leave the claim-order walk).

Revision ID: 0020
"""

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None
additive = True  # a nullable column and an index: an older prorch keeps working on this schema

KEYED = sa.text("concurrency_key IS NOT NULL")
PRIORITY_DESCENDING = sa.text("priority DESC")
TENANT_AS_KEY = {  # the JSON text of a scalar tenant, else "null" (prorch.model.limit_rules.key_text)
    "postgresql": (
        "CASE WHEN jsonb_typeof(context::jsonb -> 'tenant') IN ('string', 'number', 'boolean') "
        "THEN (context::jsonb -> 'tenant')::text ELSE 'null' END"
    ),
    "sqlite": (
        "CASE json_type(context, '$.tenant') WHEN 'text' THEN json_quote(json_extract(context, '$.tenant')) "
        "WHEN 'integer' THEN json_extract(context, '$.tenant') WHEN 'real' THEN json_extract(context, '$.tenant') "
        "WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE 'null' END"
    ),
}


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("concurrency_key", sa.String(400)))
    tenant = TENANT_AS_KEY.get(op.get_bind().dialect.name, TENANT_AS_KEY["sqlite"])
    op.execute(f"UPDATE pipelines SET concurrency_key = {tenant} WHERE status = 'pending'")
    op.create_index(
        "ix_pipelines_concurrency_key",
        "pipelines",
        ["name", "status", "concurrency_key", PRIORITY_DESCENDING, "next_run_at"],
        sqlite_where=KEYED,
        postgresql_where=KEYED,
    )


def downgrade() -> None:
    op.drop_index("ix_pipelines_concurrency_key", table_name="pipelines")
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("concurrency_key")
