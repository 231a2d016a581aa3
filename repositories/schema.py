"""The SQL schema, declared once with SQLAlchemy Core (JSONB on PostgreSQL, JSON elsewhere).

Changing a table here means adding a migration in ``migrations/versions`` and bumping
``SCHEMA_REVISION`` to its id; the migrations, not this module, create and upgrade stores.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from prorch.model.records import Metadata as Models

SCHEMA_REVISION = "0024"
"""The newest migration; a store at this revision needs no upgrade."""
VERSION_TABLE = "prorch_schema_version"
HISTORY_TABLE = "prorch_schema_migrations"
"""Every migration applied and whether it only adds (``additive = True`` in its module)."""

Json = JSON().with_variant(JSONB(), "postgresql")
ENDED = text("status IN ('finished', 'failed', 'cancelled')")
HAS_CONCURRENCY_KEY = text("concurrency_key IS NOT NULL")
LEASED = text("lease_owner IS NOT NULL")
UNREAD = text("consumed_at IS NULL")
KEYED = text("key IS NOT NULL")
Timestamp = DateTime(timezone=True)
ENDED_AT = "ended_at"
"""PostgreSQL only: a stored generated column of pipelines, ``updated_at`` when ended, else NULL
(migration 0017). Not in the table below: only the ended queries (``sql_listing``) name it."""

metadata = MetaData()

pipelines = Table(
    Models.TABLE_NAMES[Models.PIPELINES_MODEL],
    metadata,
    Column("uuid", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("version", Integer, nullable=False, default=1),
    Column("status", String(16), nullable=False),
    Column("params", Json, nullable=False),
    Column("context", Json, nullable=False),
    Column("metadata", Json, nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("created_at", Timestamp),
    Column("updated_at", Timestamp),
    Column("next_run_at", Timestamp),
    Column("lease_owner", String(200)),
    Column("lease_expires_at", Timestamp),
    Column("last_error", Json),
    Column("claims", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("revision", Integer, nullable=False, default=0),
    Column("hook_started_at", Timestamp),
    Column("hook_shared", Boolean, nullable=False, default=False),
    Column("crashes", Integer, nullable=False, default=0),
    Column("key", String(200)),
    Column("parent_uuid", String(36)),
    Column("trace", Json),
    Column("concurrency_key", String(400)),  # JSON text of its concurrency key value (default: its tenant)
    # search attributes; indexed in pipeline_attributes, which triggers keep in step (migration 0021)
    Column("attributes", Json, nullable=False, server_default=text("'{}'")),
    Index("ix_pipelines_due", "status", "next_run_at", "priority"),
    # newest-first listings by keyset, alone or after a status or name filter (prorch list)
    Index("ix_pipelines_created", "created_at", "uuid"),
    Index("ix_pipelines_status_created", "status", "created_at", "uuid"),
    Index("ix_pipelines_name_created", "name", "created_at", "uuid"),
    # the dashboard's counts by status, name and version, read from the index alone
    Index("ix_pipelines_status_name", "status", "name", "version"),
    Index("ix_pipelines_parent", "parent_uuid"),  # a pipeline's children
    # a creation key's pipelines (if_running, debounce, get_by_key): keyed rows only
    Index("ix_pipelines_key", "key", sqlite_where=KEYED, postgresql_where=KEYED),
    # live leases by name, for max_running: only leased rows, so as small as the work in flight;
    # keyed on the owner, which a lease's renewals leave as it is (its expiry is checked on the row).
    # SQLite only: on PostgreSQL the leases are in ``pipeline_leases`` (migration 0023), so that a
    # claim and a release change no index of this table and can be HOT updates
    Index("ix_pipelines_leased", "name", "lease_owner", sqlite_where=LEASED).ddl_if(dialect="sqlite"),
    # ended pipelines only: "ended in the last hour" without indexing every transition. On
    # PostgreSQL it is on ``ended_at`` instead (ENDED_AT, migration 0017), which stays NULL while
    # a pipeline runs, so that its writes can be HOT updates
    Index("ix_pipelines_ended", "updated_at", sqlite_where=ENDED),
    # room on each page for a row's next version: what a HOT update needs besides unchanged keys
    # (40: a claim or a commit round updates many rows of a page in one transaction, migration 0023)
    postgresql_with={"fillfactor": 40},
)
# the claim's walk in claim order (``prorch.model.due.CLAIM_ORDER``), all names, or one name's (a
# limited claim): it reads the rows it takes, not every due row (``repositories.sql_claim``)
Index("ix_pipelines_claim", pipelines.c.status, pipelines.c.priority.desc(), pipelines.c.next_run_at)
Index(
    "ix_pipelines_claim_name",
    pipelines.c.status,
    pipelines.c.name,
    pipelines.c.priority.desc(),
    pipelines.c.next_run_at,
)
# a name's keys with pending pipelines, and a key's due ones in claim order (a fair claim,
# ``repositories.sql_limits``); partial, so that no claim without a key condition plans on it
Index(
    "ix_pipelines_concurrency_key",
    pipelines.c.name,
    pipelines.c.status,
    pipelines.c.concurrency_key,
    pipelines.c.priority.desc(),
    pipelines.c.next_run_at,
    sqlite_where=HAS_CONCURRENCY_KEY,
    postgresql_where=HAS_CONCURRENCY_KEY,
)

steps = Table(
    Models.TABLE_NAMES[Models.STEP_MODEL],
    metadata,
    Column("uuid", String(36), primary_key=True),
    Column("pipeline_uuid", String(36), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("version", Integer, nullable=False, default=1),
    Column("position", Integer),
    Column("status", String(16), nullable=False),
    Column("metadata", Json, nullable=False),
    Column("output", Json),
    Column("attempt", Integer, nullable=False, default=0),
    Column("error", Json),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Column("next_run_at", Timestamp),
    Column("rollback", String(16)),
    Column("rollback_attempt", Integer, nullable=False, default=0),
    Column("revision", Integer, nullable=False, default=0),
    Column("progress", Json),
    Column("logs", Json),  # what its hooks logged, by attempt (prorch.model.step_logs)
    postgresql_with={"fillfactor": 65},
)

events = Table(
    Models.TABLE_NAMES[Models.EVENT_MODEL],
    metadata,
    Column("uuid", String(36), nullable=False),
    Column("pipeline_uuid", String(36), nullable=False),
    Column("step_uuid", String(36)),
    Column("type", String(64), nullable=False),
    Column("at", Timestamp, nullable=False),
    Column("seq", Integer, nullable=False, default=0),
    Column("data", Json, nullable=False),
    # clustered by pipeline, in order: one B-tree insert per event, history reads are one range
    PrimaryKeyConstraint("pipeline_uuid", "seq", "uuid", name="pipeline_events_pkey"),
    sqlite_with_rowid=False,
)

messages = Table(
    Models.TABLE_NAMES[Models.MESSAGE_MODEL],
    metadata,
    Column("uuid", String(36), primary_key=True),
    Column("pipeline_uuid", String(36), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("payload", Json),
    Column("sent_at", Timestamp, nullable=False),
    Column("consumed_at", Timestamp),
    # a pipeline's unread messages of a name, oldest first (receive, child_result): unread rows only
    Index(
        "ix_messages_unread", "pipeline_uuid", "name", "sent_at", "uuid", sqlite_where=UNREAD, postgresql_where=UNREAD
    ),
    Index("ix_messages_sent", "pipeline_uuid", "sent_at"),  # a pipeline's newest message (send)
)

stream = Table(
    Models.TABLE_NAMES[Models.STREAM_MODEL],
    metadata,
    Column("uuid", String(80), nullable=False),  # PIPELINE_UUID:SEQ (the record's id)
    Column("pipeline_uuid", String(36), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("at", Timestamp, nullable=False),
    Column("value", Json),
    # clustered by pipeline, in order: a read after a cursor is one range; a second writer of
    # one seq (a lost lease's) is refused
    PrimaryKeyConstraint("pipeline_uuid", "seq", name="pipeline_stream_pkey"),
    sqlite_with_rowid=False,
)

pipeline_attributes = Table(
    "pipeline_attributes",
    metadata,
    # one row per search attribute of a pipeline, kept in step with its ``attributes`` column by
    # triggers (migration 0021; a new pipeline's rows on SQLite by ``SQLiteRepository.save_many``),
    # in the pipeline's own transaction; a deleted pipeline takes its rows along
    Column("pipeline_uuid", String(36), nullable=False),
    Column("name", String(64), nullable=False),
    Column("value", String(200), nullable=False),
    Column("created_at", Timestamp),  # the pipeline's: a filtered listing is one range, newest first
    PrimaryKeyConstraint("pipeline_uuid", "name", name="pipeline_attributes_pkey"),
    # on PostgreSQL built (created_at DESC NULLS LAST, pipeline_uuid DESC) by migration 0021
    Index("ix_pipeline_attributes_value", "name", "value", "created_at", "pipeline_uuid"),
)

pipeline_leases = Table(
    "pipeline_leases",
    metadata,
    # PostgreSQL only (migration 0023): one row per leased pipeline of a name entered in
    # pipeline_limited_names, kept by triggers on pipelines in the writer's transaction
    # (whichever prorch wrote the lease), and gone with its pipeline; ``max_running`` counts a
    # name's leases here, joined to the pipeline for its status and expiry (``sql_limits``)
    Column("pipeline_uuid", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Index("ix_pipeline_leases_name", "name"),
)

pipeline_limited_names = Table(
    "pipeline_limited_names",
    metadata,
    # PostgreSQL only (migration 0023): the names whose leases go to pipeline_leases, entered by
    # their first limited claim; ``ready`` once the leases stored before were copied there
    # (``repositories.postgresql_leases``)
    Column("name", String(200), primary_key=True),
    Column("ready", Boolean, nullable=False, server_default=text("false")),
    # when a claim that limits the name last said so; not for a day: the name is dropped (0024)
    Column("limited_at", Timestamp, nullable=False, server_default=text("now()")),
)

rate_limit_starts = Table(
    "rate_limit_starts",
    metadata,
    Column("name", String(200), nullable=False),
    Column("started_at", Timestamp, nullable=False),
    Column("pipeline_uuid", String(36), nullable=False),
    # a rate-limited name's claims by time: counted and pruned by one range of the key
    PrimaryKeyConstraint("name", "started_at", "pipeline_uuid", name="rate_limit_starts_pkey"),
)

schedule_ticks = Table(
    "schedule_ticks",
    metadata,
    Column("name", String(200), primary_key=True),  # the pipeline name whose schedule it is
    Column("tick", Timestamp, nullable=False),  # the last tick whose pipeline was created
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(200), primary_key=True),  # the worker's id: its leases' tokens start with it
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("prorch_version", String(64), nullable=False),
    Column("app_version", String(64)),
    Column("started_at", Timestamp, nullable=False),
    Column("heartbeat_at", Timestamp, nullable=False),
    Column("beat_seconds", Float, nullable=False),  # how often it beats: a row older than 3 beats is stale
    Column("concurrency", Integer, nullable=False),
    Column("in_flight", Integer, nullable=False),
)

pauses = Table(
    "pauses",
    metadata,
    # "class:NAME", "class:NAME@VERSION", "tenant:T" or "pipeline:UUID" (prorch.model.pauses): the
    # claim looks up a pipeline's few keys by this primary key, so a pause costs one row
    Column("scope", String(300), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("value", String(200), nullable=False),
    Column("version", Integer),
    Column("since", Timestamp, nullable=False),
    Column("actor", String(1000)),
    Column("reason", String(1000)),
)

schema_history = Table(
    HISTORY_TABLE,
    metadata,
    Column("revision", String(32), primary_key=True),
    Column("additive", Boolean, nullable=False),
)

TABLES: dict[str, Table] = {
    Models.PIPELINES_MODEL: pipelines,
    Models.STEP_MODEL: steps,
    Models.EVENT_MODEL: events,
    Models.MESSAGE_MODEL: messages,
    Models.STREAM_MODEL: stream,
}


def column_kind(column_type: Any) -> str:
    """How a column's values are converted on the raw-driver paths: "json", "time", "bool" or
    "plain" (SQLite's fast path and PostgreSQL's one-statement transitions)."""
    if isinstance(column_type, JSON) or isinstance(getattr(column_type, "impl", None), JSON):
        return "json"
    if isinstance(column_type, DateTime):
        return "time"
    if isinstance(column_type, Boolean):
        return "bool"
    return "plain"


__all__ = [
    "ENDED",
    "HISTORY_TABLE",
    "SCHEMA_REVISION",
    "TABLES",
    "VERSION_TABLE",
    "column_kind",
    "metadata",
    "pauses",
    "pipeline_attributes",
    "pipeline_leases",
    "pipeline_limited_names",
    "schedule_ticks",
    "schema_history",
    "workers",
]
