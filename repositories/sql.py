"""The SQL backend through SQLAlchemy 2 Core, shared by its dialects: ``repositories.sqlite``
(the embedded default) and ``repositories.postgresql`` (several workers on several machines)
override what differs, as DBOS's ``_sys_db_sqlite.py`` and ``_sys_db_postgres.py`` do; any other
SQLAlchemy URL runs on this generic code.

Every capability the engine uses is here: an atomic claim with a lease, compare-and-set on the
``revision`` column, a transaction around one transition, and a due query served by an index.
``SQLBackend(url)`` gives the dialect's backend for the URL. Its connections and errors are
``repositories.sql_connections``; its claim, ``repositories.sql_claim``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Integer, bindparam, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError

from prorch.model.due import Runnable
from prorch.model.exceptions import ConfigurationError
from prorch.model.records import JSONDict, Metadata, format_timestamp, to_utc
from prorch.model.secrets import redact_url
from prorch.model.status import Status
from prorch.storage.commits import call
from prorch.storage.composed import OWNED
from prorch.storage.repository import IRepository, PipelineQuery, PipelineStats, VersionGroup
from prorch.storage.wakeups import Bell, bell_for
from repositories import sql_listing, sql_pauses, sql_workers
from repositories.migrate import MIGRATIONS, upgrade
from repositories.schema import TABLES, schedule_ticks, stream
from repositories.sql_claim import SQLClaims
from repositories.sql_connections import DatabaseRefusedError, SQLConnections, parse_url

__all__ = [
    "DIALECTS",
    "MIGRATIONS",
    "SEARCH_CHUNK",
    "DatabaseRefusedError",
    "SQLBackend",
    "SQLRepository",
    "dialect_class",
    "upgrade",
]

logger = logging.getLogger("prorch.repositories.sql")

DIALECTS = {
    "sqlite": "repositories.sqlite:SQLiteBackend",
    "postgresql": "repositories.postgresql:PostgreSQLBackend",
    "postgres": "repositories.postgresql:PostgreSQLBackend",  # postgres://, as Heroku and libpq write it
}
"""The backend class of each dialect, found by name when a URL names it (as SQLAlchemy finds its
dialects): this module needs no import of its subclasses."""


class SQLBackend(SQLConnections):
    """A backend over one SQLAlchemy engine; ``backend(model)`` gives that model's repository.

    Writes in ``with backend.transaction():`` commit together; outside one, each call is its own
    transaction. ``SQLBackend(url)`` returns the subclass of the URL's dialect (``DIALECTS``).
    """

    thread_safe = True
    repository_class: ClassVar[type[SQLRepository]]

    def __new__(cls, url: str, **_options: Any) -> SQLBackend:
        if cls is SQLBackend:
            cls = dialect_class(url)
        return super().__new__(cls)

    def __init__(self, url: str, *, migrate: bool = True, **engine_options: Any) -> None:
        self.url = url
        self.engine = self._create_engine(parse_url(url), engine_options)
        self._local = threading.local()
        self._repositories: dict[str, SQLRepository] = {}
        if migrate:
            try:
                upgrade(self)
            except (DatabaseError, DatabaseRefusedError) as exc:
                raise self._unusable(exc) from exc

    def __call__(self, model: str) -> SQLRepository:
        repository = self._repositories.get(model)
        if repository is None:  # one per model: its statements are built once
            repository = self._repositories[model] = self.repository_class(model, self)
        return repository

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r})"

    def dispose(self) -> None:
        self.engine.dispose()

    # --- waiting (prorch.storage.wakeups) --------------------------------------------------

    def wake_bell(self) -> Bell:
        """One bell per database URL in this process."""
        return bell_for(f"sql:{self.url}")

    def next_due_at(self, now: datetime) -> datetime | None:
        """By the due index: the first ``next_run_at`` after ``now`` of a pending pipeline no
        live lease holds (a held one's holder wakes for it)."""
        c = TABLES[Metadata.PIPELINES_MODEL].c
        unleased = or_(c.lease_expires_at.is_(None), c.lease_expires_at <= now)
        query = select(func.min(c.next_run_at)).where(c.status == Status.PENDING.value, c.next_run_at > now, unleased)
        with self._errors(), self.connect(write=False) as connection:
            found: datetime | None = connection.execute(query).scalar()
        return to_utc(found) if found is not None else None

    def server_time(self) -> datetime | None:
        """The database server's clock, where workers on several machines share it (see
        ``SupportsServerClock``); None here."""
        return None

    # --- the backend contract: what the tables' indexes answer ---------------------------------

    def query_pipelines(self, query: PipelineQuery) -> tuple[list[JSONDict], int | None]:
        return self(Metadata.PIPELINES_MODEL).query_pipelines(query)

    def pipeline_stats(self, now: datetime, ended_since: datetime) -> PipelineStats:
        return self(Metadata.PIPELINES_MODEL).pipeline_stats(now, ended_since)

    def ended_before(self, statuses: list[str], before: datetime, limit: int) -> list[str]:
        return self(Metadata.PIPELINES_MODEL).ended_before(statuses, before, limit)

    def version_groups(self) -> list[VersionGroup]:
        return self(Metadata.PIPELINES_MODEL).version_groups()

    def save_rows(self, model: str, rows: list[JSONDict]) -> None:
        call(f"save {model} records", self(model).save_many, rows)

    def session(self) -> contextlib.AbstractContextManager[None]:
        return self.pinned()

    def delete_pipelines(self, uuids: list[str], statuses: list[str], before: datetime) -> int:
        """The pipelines go first, checked and locked by one statement (``delete_ended``), so
        that a purge takes their locks in the order the workers do (pipeline, then steps) and
        skips those another transaction holds: no deadlock with a worker or a second purge."""
        with self.transaction():
            gone = call("delete pipelines", self(Metadata.PIPELINES_MODEL).delete_ended, uuids, statuses, before)
            for model in OWNED:
                call("delete records", self(model).delete_by, "pipeline_uuid", gone)
            return len(gone)

    def held_lease(self, pipeline_uuid: str) -> JSONDict | None:
        """``SELECT ... FOR SHARE`` where the database locks rows (PostgreSQL): a claim of the
        pipeline waits (or skips it) until the transaction ends, and one that changed it first
        is seen. SQLite has no row locks: its write transaction already holds the only one."""
        c = TABLES[Metadata.PIPELINES_MODEL].c
        query = select(c.lease_owner).where(c.uuid == pipeline_uuid).with_for_update(read=True)
        with self._errors(), self.connect(write=True) as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row is not None else None

    # --- schedules (SupportsScheduleTicks) --------------------------------------------------

    def schedule_ticks(self) -> dict[str, datetime]:
        """Every schedule's last created tick."""
        with self.connect(write=False) as connection:
            rows = connection.execute(select(schedule_ticks.c.name, schedule_ticks.c.tick)).all()
        return {str(name): to_utc(tick) for name, tick in rows}

    def advance_schedule(self, name: str, tick: datetime) -> bool:
        """Move the schedule's last tick forward to ``tick``. The update comes first: on
        PostgreSQL it locks the row, so a second worker waits for the first's transaction and
        then finds the tick stored; two first ticks of a name at once meet on the primary key
        (``DuplicateRecordError`` for the second)."""
        c = schedule_ticks.c
        with self._errors(), self.connect(write=True) as connection:
            moved = connection.execute(update(schedule_ticks).where(c.name == name, c.tick < tick).values(tick=tick))
            if moved.rowcount:
                return True
            if connection.execute(select(c.tick).where(c.name == name)).first() is not None:
                return False
            connection.execute(insert(schedule_ticks).values(name=name, tick=tick))
            return True

    # --- streams: a range of the primary key (pipeline_uuid, seq) --------------------------------

    def stream_entries(self, pipeline_uuid: str, after: int, limit: int) -> list[JSONDict]:
        c = stream.c
        query = select(stream).where(c.pipeline_uuid == pipeline_uuid, c.seq > after).order_by(c.seq).limit(limit)
        with self._errors(), self.connect(write=False) as connection:
            rows = connection.execute(query).mappings().all()
        return [{**row, "at": format_timestamp(to_utc(row["at"]))} for row in rows]

    def last_stream_seq(self, pipeline_uuid: str) -> int:
        query = select(func.max(stream.c.seq)).where(stream.c.pipeline_uuid == pipeline_uuid)
        with self._errors(), self.connect(write=False) as connection:
            return int(connection.execute(query).scalar() or 0)

    # --- pauses (repositories.sql_pauses) ------------------------------------------------------

    def pauses(self) -> list[JSONDict]:
        return sql_pauses.pause_rows(self)

    def rate_starts(self, name: str, since: datetime) -> int:
        return sql_pauses.rate_starts(self, name, since)

    def add_pause(self, row: JSONDict) -> bool:
        return sql_pauses.insert_pause(self, row)

    def drop_pause(self, scope: str) -> JSONDict | None:
        return sql_pauses.delete_pause(self, scope)

    # --- workers (repositories.sql_workers) ---------------------------------------------------

    def upsert_worker(self, row: JSONDict) -> None:
        sql_workers.upsert_worker(self, row)

    def delete_worker(self, worker_id: str) -> None:
        sql_workers.delete_worker(self, worker_id)

    def workers(self) -> list[JSONDict]:
        return sql_workers.worker_rows(self)


def dialect_class(url: str) -> type[SQLBackend]:
    """The backend class for the URL's dialect: one of ``DIALECTS``, else the generic one (a
    malformed URL too: its constructor then says what is wrong)."""
    try:
        name = make_url(url).get_backend_name()
    except (ArgumentError, ValueError, TypeError):
        return SQLBackend
    if name not in DIALECTS:
        return SQLBackend
    module, _, attribute = DIALECTS[name].partition(":")
    found: type[SQLBackend] = getattr(importlib.import_module(module), attribute)
    return found


# --- the repository ---------------------------------------------------------------------------------


SEARCH_CHUNK = 500
"""Values per query of ``search_many``: well under any database's limit of parameters."""


class SQLRepository(SQLClaims, IRepository):
    """One model's table. Timestamps travel as ISO strings in records and as aware datetimes in
    the database."""

    partial_update = True  # update and compare_and_set keep the fields not given

    def __init__(self, model: str, backend: SQLBackend) -> None:
        super().__init__(model)
        if model not in TABLES:
            raise ConfigurationError(f"unknown model {model!r}; expected one of {', '.join(TABLES)}")
        self.backend = backend
        self.table = TABLES[model]
        self.columns = {column.name for column in self.table.columns}
        self.timestamps = {c.name for c in self.table.columns if c.type.python_type is datetime}
        # Statements built once with bind parameters: building them per call (values() with a
        # dict) costs more than running them.
        c = self.table.c
        values: dict[str, Any] = {name: bindparam(name) for name in self.columns - {"uuid"}}
        self._defaults = {column.name: getattr(column.default, "arg", None) for column in self.table.columns}
        self._insert = self.table.insert()
        self._get = select(self.table).where(c.uuid == bindparam("_uuid"))
        self._update_all = update(self.table).where(c.uuid == bindparam("_uuid")).values(values)
        self._cas_all = (
            update(self.table).where(c.uuid == bindparam("_uuid"), c.revision == bindparam("_expected")).values(values)
            if "revision" in self.columns
            else None
        )
        self._searches: dict[str, Any] = {}
        self._claims: dict[tuple[str, Runnable | None], Any] = {}  # claim statements by the classes claimed

    # --- the four methods --------------------------------------------------------------------

    def get(self, uuid: str) -> JSONDict | None:
        with self.backend.connect(write=False) as connection:
            row = connection.execute(self._get, {"_uuid": uuid}).mappings().first()
        return self._to_record(row) if row is not None else None

    def save(self, data: JSONDict) -> str:
        self.save_many([data])
        return str(data["uuid"])

    def save_many(self, rows: list[JSONDict]) -> None:
        """Insert several new records in one round trip (optional; the engine uses it for the
        events of one transition). A uuid stored already raises ``DuplicateRecordError``, inside
        a transaction too."""
        with self.backend._errors(), self.backend.connect(write=True) as connection:
            connection.execute(self._insert, [self.full_row(row) for row in rows])

    def update(self, uuid: str, data: JSONDict) -> None:
        with self.backend.connect(write=True) as connection:
            values = self._to_row(data)
            values.pop("uuid", None)
            if values.keys() == self.columns - {"uuid"}:
                connection.execute(self._update_all, {**values, "_uuid": uuid})
            else:  # a partial update (a user's call): build the statement for these columns
                connection.execute(update(self.table).where(self.table.c.uuid == uuid).values(values))

    def search(self, filter: list[Any]) -> list[JSONDict]:  # noqa: A002 - the seed's name
        field, value = filter
        query = self._searches.get(field)
        if query is None:
            self.check_field(field)
            query = select(self.table).where(self.table.c[field] == bindparam("_value"))
            if "seq" in self.columns:
                query = query.order_by(self.table.c.seq, self.table.c.at)
            self._searches[field] = query
        with self.backend.connect(write=False) as connection:
            rows = connection.execute(query, {"_value": value}).mappings().all()
        return [self._to_record(row) for row in rows]

    def search_many(self, field: str, values: list[Any]) -> list[JSONDict]:
        """``search`` for several values at once, in chunks of ``SEARCH_CHUNK`` values."""
        key = f"{field}[]"
        query = self._searches.get(key)
        if query is None:
            self.check_field(field)
            query = self._searches[key] = select(self.table).where(
                self.table.c[field].in_(bindparam("_values", expanding=True))
            )
        found: list[JSONDict] = []
        with self.backend.connect(write=False) as connection:
            for start in range(0, len(values), SEARCH_CHUNK):
                rows = connection.execute(query, {"_values": values[start : start + SEARCH_CHUNK]}).mappings().all()
                found.extend(self._to_record(row) for row in rows)
        return found

    def check_field(self, field: str) -> None:
        if field not in self.columns:
            raise ConfigurationError(f"cannot search {self.table.name} by unknown field {field!r}")

    # --- capabilities ------------------------------------------------------------------------

    def compare_and_set(self, uuid: str, expected_revision: int, data: JSONDict) -> bool:
        with self.backend.connect(write=True) as connection:
            values = self._to_row(data)
            values.pop("uuid", None)
            if self._cas_all is not None and values.keys() == self.columns - {"uuid"}:
                result = connection.execute(self._cas_all, {**values, "_uuid": uuid, "_expected": expected_revision})
            else:
                c = self.table.c
                query = update(self.table).where(c.uuid == uuid, c.revision == expected_revision).values(values)
                result = connection.execute(query)
            return result.rowcount == 1

    def query_pipelines(self, query: PipelineQuery) -> tuple[list[JSONDict], int | None]:
        """A page of pipelines for ``prorch list`` and the dashboard (``SupportsPipelineQuery``)."""
        if self.model != Metadata.PIPELINES_MODEL:
            raise ConfigurationError(f"query_pipelines works on pipelines, not on {self.table.name}")
        page, count = sql_listing.listing(self.table, query, self.backend.engine.dialect.name)
        with self.backend.connect(write=False) as connection:
            rows = connection.execute(page).mappings().all()
            total = connection.execute(count).scalar_one() if count is not None else None
        return [self._to_record(row) for row in rows], total

    def delete_by(self, field: str, values: list[Any]) -> int:
        """Delete the records whose ``field`` is one of ``values``, ``SEARCH_CHUNK`` at a time."""
        self.check_field(field)
        deleted = 0
        query = delete(self.table).where(self.table.c[field].in_(bindparam("_values", expanding=True)))
        with self.backend._errors(), self.backend.connect(write=True) as connection:
            for start in range(0, len(values), SEARCH_CHUNK):
                deleted += connection.execute(query, {"_values": values[start : start + SEARCH_CHUNK]}).rowcount
        return deleted

    def ended_before(self, statuses: list[str], before: datetime, limit: int) -> list[str]:
        """Ended pipelines by age, from the partial index of ended pipelines."""
        query = sql_listing.ended_before(self.table, self.backend.engine.dialect.name)
        with self.backend.connect(write=False) as connection:
            rows = connection.execute(query, {"statuses": statuses, "before": before, "limit": limit})
            return [str(uuid) for (uuid,) in rows]

    def delete_ended(self, uuids: list[str], statuses: list[str], before: datetime) -> list[str]:
        """Delete those of ``uuids`` that retention may still take, checked in the statement
        that deletes them (``SupportsPurge``): a pipeline retried since the purge found it is
        left. Where rows can be locked, ones another transaction holds are skipped."""
        query = self._searches.get("_purge")
        if query is None:
            c = self.table.c
            before_at = bindparam("_before", type_=c.updated_at.type)
            statuses_in: Any = bindparam("_statuses", expanding=True)
            chosen = select(c.uuid).where(
                c.uuid.in_(bindparam("_uuids", expanding=True)),
                *sql_listing.purgeable(self.table, statuses_in, before_at),
            )
            query = self._searches["_purge"] = (
                delete(self.table).where(c.uuid.in_(self.lockable(chosen).scalar_subquery())).returning(c.uuid)
            )
        deleted: list[str] = []
        with self.backend._errors(), self.backend.connect(write=True) as connection:
            for start in range(0, len(uuids), SEARCH_CHUNK):
                params = {"_uuids": uuids[start : start + SEARCH_CHUNK], "_statuses": statuses, "_before": before}
                deleted += [str(uuid) for (uuid,) in connection.execute(query, params)]
        return deleted

    def pipeline_stats(self, now: datetime, ended_since: datetime) -> PipelineStats:
        """The dashboard overview's counts (``SupportsPipelineStats``)."""
        with self.backend.connect(write=False) as connection:
            return sql_listing.stats(self.table, connection, now, ended_since)

    def version_groups(self) -> list[VersionGroup]:
        """Pipelines by class version and recorded patches (``SupportsVersionGroups``): one GROUP BY."""
        with self.backend._errors(), self.backend.connect(write=False) as connection:
            return sql_listing.version_groups(self.table, connection)

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[JSONDict]:
        """A pipeline's unread messages of a name, by the partial index of unread messages
        (``SupportsMessageQuery``); a range of it, from ``after``."""
        key = "_unread_after" if after is not None else "_unread"
        query = self._searches.get(key)
        if query is None:
            c = self.table.c
            query = select(self.table).where(
                c.pipeline_uuid == bindparam("_pipeline"), c.name == bindparam("_name"), c.consumed_at.is_(None)
            )
            if after is not None:
                sent = bindparam("_sent", type_=c.sent_at.type)
                query = query.where(tuple_(c.sent_at, c.uuid) > tuple_(sent, bindparam("_uuid")))
            query = self._searches[key] = query.order_by(c.sent_at, c.uuid).limit(bindparam("_limit", type_=Integer()))
        params: dict[str, Any] = {"_pipeline": pipeline_uuid, "_name": name, "_limit": limit}
        if after is not None:
            params["_sent"], params["_uuid"] = after
        with self.backend.connect(write=False) as connection:
            rows = connection.execute(query, params).mappings().all()
        return [self._to_record(row) for row in rows]

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        c = self.table.c
        query = select(c.uuid).where(c.pipeline_uuid == pipeline_uuid, c.consumed_at.is_(None)).limit(1)
        with self.backend.connect(write=False) as connection:
            return connection.execute(query).first() is not None

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        c = self.table.c
        query = select(func.max(c.sent_at)).where(c.pipeline_uuid == pipeline_uuid)
        with self.backend.connect(write=False) as connection:
            found: datetime | None = connection.execute(query).scalar()
        return to_utc(found) if found is not None else None

    # --- conversion --------------------------------------------------------------------------

    def full_row(self, data: JSONDict) -> JSONDict:
        """Every column, missing ones as None: one cached INSERT serves every record."""
        row = self._to_row(data)
        return {name: row.get(name, self._defaults[name]) for name in self.columns}

    def _to_row(self, data: JSONDict) -> JSONDict:
        row = {key: value for key, value in data.items() if key in self.columns}
        for key in self.timestamps & row.keys():
            if isinstance(row[key], str):
                row[key] = datetime.fromisoformat(row[key])
        return row

    def _to_record(self, row: Any) -> JSONDict:
        # plain str keys: SQLAlchemy names a column that is a reserved word ("key") with a str
        # subclass, which msgspec does not take as a field name
        record = {str(key): value for key, value in row.items()}
        for key in self.timestamps:
            value = record.get(key)
            if isinstance(value, datetime):
                record[key] = format_timestamp(to_utc(value))
        return record


SQLBackend.repository_class = SQLRepository
