"""The SQL backend through SQLAlchemy 2 Core, shared by its dialects: ``repositories.sqlite``
(the embedded default) and ``repositories.postgresql`` (several workers on several machines)
override what differs, as DBOS's ``_sys_db_sqlite.py`` and ``_sys_db_postgres.py`` do; any other
SQLAlchemy URL runs on this generic code.

Every capability the engine uses is here: an atomic claim with a lease, compare-and-set on the
``revision`` column, a transaction around one transition, and a due query served by an index.
``SQLBackend(url)`` gives the dialect's backend for the URL.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, ClassVar, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Select,
    and_,
    bindparam,
    create_engine,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
)

from prorch.model.due import CLAIM_ORDER, TERMINAL_VALUES, Runnable, row_claim_order
from prorch.model.exceptions import (
    ConfigurationError,
    DuplicateRecordError,
    RepositoryError,
    StoreUnreachableError,
)
from prorch.model.jsonvalue import dumps
from prorch.model.limit_rules import ClaimLimit
from prorch.model.records import JSONDict, Metadata, format_timestamp, to_utc
from prorch.model.secrets import error_summary, redact_url
from prorch.model.status import Status
from prorch.storage.commits import call
from prorch.storage.composed import MODELS, RepositoryBackend
from prorch.storage.repository import IRepository, PipelineQuery, PipelineStats
from repositories import sql_listing, sql_workers
from repositories.migrate import MIGRATIONS, upgrade
from repositories.schema import TABLES, schedule_ticks
from repositories.schemes import SUPPORTED_SCHEMES
from repositories.sql_limits import LimitedClaim

__all__ = ["DIALECTS", "MIGRATIONS", "SQLBackend", "SQLRepository", "dialect_class", "upgrade"]

logger = logging.getLogger("prorch.repositories.sql")
T = TypeVar("T")

DIALECTS = {
    "sqlite": "repositories.sqlite:SQLiteBackend",
    "postgresql": "repositories.postgresql:PostgreSQLBackend",
    "postgres": "repositories.postgresql:PostgreSQLBackend",  # postgres://, as Heroku and libpq write it
}
"""The backend class of each dialect, found by name when a URL names it (as SQLAlchemy finds its
dialects): this module needs no import of its subclasses."""


class DatabaseRefusedError(RepositoryError):
    """The database refused a statement (a constraint, a value it cannot hold), or the file is
    not a database; as opposed to being unreachable."""


class SQLBackend(RepositoryBackend):
    """A backend over one SQLAlchemy engine; ``backend(model)`` gives that model's repository.

    Writes in ``with backend.transaction():`` commit together; outside one, each call is its own
    transaction. ``SQLBackend(url)`` returns the subclass of the URL's dialect (``DIALECTS``).
    """

    thread_safe = True
    repository_class: ClassVar[type[SQLRepository]]
    reads_in_transaction: ClassVar[bool] = True
    """False where a read is one autocommit statement: each of prorch's reads is one statement,
    which sees a consistent snapshot on its own (SQLite's WAL, PostgreSQL's READ COMMITTED)."""
    unreachable_errors: ClassVar[tuple[type[BaseException], ...]] = (OperationalError, InterfaceError)
    unreachable_error: ClassVar[type[RepositoryError]] = StoreUnreachableError
    """What ``unreachable_errors`` become: a server that is down or a connection that was lost
    may be back later (a worker waits for it)."""
    duplicate_errors: ClassVar[tuple[type[BaseException], ...]] = (IntegrityError,)
    refused_errors: ClassVar[tuple[type[BaseException], ...]] = (DBAPIError,)

    def __new__(cls, url: str, **_options: Any) -> SQLBackend:
        if cls is SQLBackend:
            cls = dialect_class(url)
        return super().__new__(cls)

    def __init__(self, url: str, *, migrate: bool = True, **engine_options: Any) -> None:
        self.url = url
        self.engine = self._create_engine(_parse(url), engine_options)
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
            for model in MODELS[1:]:
                call("delete records", self(model).delete_by, "pipeline_uuid", gone)
            return len(gone)

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

    # --- workers (repositories.sql_workers) ---------------------------------------------------

    def upsert_worker(self, row: JSONDict) -> None:
        sql_workers.upsert_worker(self, row)

    def delete_worker(self, worker_id: str) -> None:
        sql_workers.delete_worker(self, worker_id)

    def workers(self) -> list[JSONDict]:
        return sql_workers.worker_rows(self)

    # --- what a dialect overrides ------------------------------------------------------------

    def _create_engine(self, url: URL, options: dict[str, Any]) -> Engine:
        options.setdefault("hide_parameters", True)  # bound values (user data, tokens) never reach a message
        options.setdefault("json_serializer", dumps)  # orjson: several JSON columns per transition
        options.setdefault("pool_pre_ping", True)  # a server restart leaves dead pooled connections
        return _engine(url, self.url, options)

    def _unusable(self, exc: BaseException) -> RepositoryError:
        """The error for a store whose schema cannot be read or created (its server cannot be
        reached: ``unreachable_error``)."""
        kind = self.unreachable_error if isinstance(exc, self.unreachable_errors) else RepositoryError
        return kind(f"cannot open {self!r}: {error_summary(exc)}")

    def lock_name(self, connection: Connection, name: str) -> None:
        """Serialise the claims of one limited pipeline name until the transaction ends. SQLite
        needs nothing: a write transaction holds the database's only write lock."""

    def lock_schema(self, connection: Connection) -> None:
        """Serialize schema upgrades of workers starting together (the migration's transaction
        does on most databases)."""

    def _writer(self, write: bool) -> contextlib.AbstractContextManager[Any]:
        """What a writer of this process holds around its transaction (nothing here)."""
        return contextlib.nullcontext()

    def _configure(self, connection: Connection, *, write: bool) -> Connection:
        if write:
            return connection.execution_options(prorch_write=True)
        if not self.reads_in_transaction:  # one statement, no BEGIN/COMMIT round trips
            return connection.execution_options(isolation_level="AUTOCOMMIT")
        return connection

    def _begin(self, connection: Connection) -> Any:
        """Begin the transaction of ``transaction()`` on ``connection``; returns its handle."""
        return connection.begin()

    def _end(self, connection: Connection, handle: Any, *, commit: bool) -> None:
        """Commit (or roll back) what ``_begin`` began."""
        if commit:
            handle.commit()
        else:
            handle.rollback()

    # --- transactions and connections ---------------------------------------------------------

    def current_connection(self) -> Connection | None:
        """The connection of this thread's open ``transaction()``, if any."""
        connection: Connection | None = getattr(self._local, "connection", None)
        return connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All repository writes in the block commit together (nested blocks join the outer)."""
        if self.current_connection() is not None:
            yield
            return
        with self._errors(), self._writer(True), self._checkout(write=True) as connection:
            self._local.connection = connection
            try:
                handle = self._begin(connection)
                try:
                    yield
                except BaseException:
                    self._end(connection, handle, commit=False)
                    raise
                self._end(connection, handle, commit=True)
            finally:
                self._local.connection = None

    @contextlib.contextmanager
    def connect(self, *, write: bool) -> Iterator[Connection]:
        """The open transaction's connection, or a new short transaction around the block."""
        current = getattr(self._local, "connection", None)  # current_connection(), inlined: the hot path
        if current is not None:
            yield current
            return
        with self._errors(), self._writer(write), self._checkout(write=write) as connection:
            if not write and not self.reads_in_transaction:
                yield connection
                return
            with connection.begin():
                yield connection

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Keep this thread's connections checked out for the block (a pass, or one pipeline's
        advance) instead of a pool round trip per transition; they go back at the end."""
        if getattr(self._local, "pins", None) is not None:
            yield
            return
        self._local.pins = {}
        try:
            yield
        finally:
            pins, self._local.pins = self._local.pins, None
            for connection in pins.values():
                connection.close()

    @contextlib.contextmanager
    def _checkout(self, *, write: bool) -> Iterator[Connection]:
        """A connection configured for writes or reads: the thread's pinned one inside
        ``pinned()``, else one from the pool."""
        pins = getattr(self._local, "pins", None)
        if pins is not None:
            connection = pins.get(write)
            if connection is None or connection.closed or connection.invalidated:
                if connection is not None:
                    connection.close()
                connection = pins[write] = self._configure(self.engine.connect(), write=write)
            try:
                yield connection
            except BaseException:
                if not _reset(connection):  # its next user gets a fresh one
                    connection.close()
                    del pins[write]
                raise
            return
        with self.engine.connect() as connection:
            try:
                yield self._configure(connection, write=write)
            except BaseException:
                _reset(connection)
                raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Driver errors become RepositoryError, naming the store, with the first line of the
        driver's message only: the rest quotes rows and parameters, which may hold secrets.
        The driver's exception is not chained, so no traceback carries it either."""
        try:
            yield
        except self.unreachable_errors as exc:  # down, locked, lost
            raise self.unreachable_error(f"{self!r}: {error_summary(exc)}") from None
        except self.duplicate_errors as exc:  # a uuid inserted twice, at the same time
            raise DuplicateRecordError(f"{self!r}: {error_summary(exc)}") from None
        except self.refused_errors as exc:  # the database refused a statement or is not one
            raise DatabaseRefusedError(f"{self!r}: {error_summary(exc)}") from None


def _reset(connection: Connection) -> bool:
    """After a failed block: roll back what it left open on ``connection``; True if the
    connection can serve again. One that cannot roll back (its server connection was killed,
    or the driver was left mid-pipeline) is invalidated, so that it is closed rather than
    handed out again, and its pool opens a fresh one: left as it was, its next ``begin()``
    failed with SQLAlchemy's "already initialized a Transaction" error."""
    if connection.invalidated:
        return False
    try:
        if connection.in_transaction():
            connection.rollback()
    except Exception:
        connection.invalidate()
        return False
    return True


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


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - a malformed port raises here, not deep inside the driver
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(f"malformed repository URL {redact_url(url)!r}: {error_summary(exc)}") from None
    return parsed


def _engine(parsed: URL, url: str, options: dict[str, Any]) -> Engine:
    """``create_engine``, with clear errors for an unknown scheme and a missing driver."""
    shown = redact_url(url)
    try:
        return create_engine(parsed, **options)
    except NoSuchModuleError as exc:
        raise ConfigurationError(
            f"unsupported repository URL scheme {parsed.drivername!r} in {shown!r}; supported: "
            f"{', '.join(SUPPORTED_SCHEMES)}"
        ) from exc
    except ImportError as exc:
        extra = "postgresql" if parsed.get_backend_name() in ("postgresql", "postgres") else None
        hint = f"pip install 'prorch[{extra}]'" if extra else "install the SQLAlchemy driver it names"
        raise ConfigurationError(f"no driver for repository URL {shown!r} ({exc}): {hint}") from exc


# --- the repository ---------------------------------------------------------------------------------


SEARCH_CHUNK = 500
"""Values per query of ``search_many``: well under any database's limit of parameters."""


class SQLRepository(IRepository):
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
            connection.execute(self._insert, [self._full_row(row) for row in rows])

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

    def _due_query(self, runnable: Runnable | None = None) -> Select[Any]:
        """Due pipeline uuids, by the (status, next_run_at, priority) index; bound: _now, _limit.
        With ``runnable``, only pipelines of those (name, version) pairs."""
        c = self.table.c
        now = bindparam("_now", type_=c.next_run_at.type)
        query = (
            select(c.uuid)
            .where(
                c.status == Status.PENDING.value,
                c.next_run_at <= now,
                (c.lease_expires_at.is_(None)) | (c.lease_expires_at <= now),
            )
            .order_by(*(c[field].desc() if descending else c[field].asc() for field, descending in CLAIM_ORDER))
            .limit(bindparam("_limit", type_=Integer()))
        )
        return query if runnable is None else query.where(self._of_classes(runnable))

    def _of_classes(self, runnable: Runnable) -> ColumnElement[bool]:
        """``(name = a AND version IN (1, 2)) OR (name = b AND ...)``, one term per name: a
        plain boolean every database plans well, on the due index or on (status, name, version).
        The values are bound into the statement, built once: a worker's classes do not change."""
        c = self.table.c
        versions: dict[str, list[int]] = {}
        for name, version in sorted(runnable):
            versions.setdefault(name, []).append(version)
        if not versions:
            return false()
        return or_(*(and_(c.name == name, c.version.in_(found)) for name, found in versions.items()))

    def _statement(self, kind: str, runnable: Runnable | None, build: Callable[[], T]) -> T:
        """A claim statement for these classes, built once (a few kept: a worker has one set)."""
        key = (kind, runnable)
        found = self._claims.get(key)
        if found is None:
            if len(self._claims) >= 16:
                self._claims.clear()
            found = self._claims[key] = build()
        return cast(T, found)

    def search_due(self, now: datetime, limit: int) -> list[JSONDict]:
        query = self._searches.get("_due")
        if query is None:
            due = self._due_query().subquery()
            query = self._searches["_due"] = select(self.table).where(self.table.c.uuid.in_(select(due.c.uuid)))
        with self.backend.connect(write=False) as connection:
            rows = connection.execute(query, {"_now": now, "_limit": limit}).mappings().all()
        return self._by_priority([self._to_record(row) for row in rows])

    def claim_due(
        self, now: datetime, owner: str, lease_expires_at: datetime, limit: int, runnable: Runnable | None = None
    ) -> list[JSONDict]:
        query = self._statement("claim", runnable, lambda: (
            update(self.table)
            .where(self.table.c.uuid.in_(self.lockable(self._due_query(runnable)).scalar_subquery()))
            .values(self._lease_values())
            .returning(*self.table.columns)
        ))  # fmt: skip
        params = {"_now": now, "_limit": limit, "_owner": owner, "_until": lease_expires_at}
        with self.backend.connect(write=True) as connection:
            rows = connection.execute(query, params).mappings().all()
        return self._by_priority([self._to_record(row) for row in rows])

    def claim_due_limited(
        self,
        now: datetime,
        owner: str,
        lease_expires_at: datetime,
        limit: int,
        limits: dict[str, ClaimLimit],
        runnable: Runnable | None = None,
    ) -> list[JSONDict]:
        """``claim_due`` within the limits of pipeline names (``prorch.model.limit_rules``): the unlimited
        names in one statement, then each limited name in a transaction of its own that holds
        the name's lock while it counts and claims (``sql_limits.LimitedClaim``)."""
        c = self.table.c
        params = {"_now": now, "_owner": owner, "_until": lease_expires_at}
        due = self._due_query(runnable).where(c.name.not_in(bindparam("_limited", expanding=True)))
        others = self._statement("claim_others", runnable, lambda: (
            update(self.table).where(c.uuid.in_(self.lockable(due).scalar_subquery())).values(self._lease_values())
            .returning(*self.table.columns)
        ))  # fmt: skip
        dialect = self.backend.engine.dialect.name
        limited = self._statement("limited", runnable, lambda: LimitedClaim(
            self.table, dialect, self._due_query(runnable), self.lockable, self._lease_values()
        ))  # fmt: skip
        rows: list[Any] = []
        with self.backend.connect(write=True) as connection:
            rows += connection.execute(others, {**params, "_limit": limit, "_limited": sorted(limits)}).mappings().all()
        for name in sorted(limits):
            if len(rows) >= limit:
                break
            with self.backend.connect(write=True) as connection:
                self.backend.lock_name(connection, name)
                rows += limited.claim(connection, name, limits, params, limit - len(rows))
        return self._by_priority([self._to_record(row) for row in rows])

    def lockable(self, due: Select[Any]) -> Select[Any]:
        """The due query as the claim's subquery: where the database can lock rows, it skips
        the ones another worker's claim holds (PostgreSQL); as it is here."""
        return due

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        c = self.table.c
        query = (
            update(self.table)
            .where(
                c.uuid == uuid,
                c.status.not_in(sorted(TERMINAL_VALUES)),
                (c.lease_expires_at.is_(None)) | (c.lease_expires_at <= now) | (c.lease_owner == owner),
            )
            .values(self._lease_values())
            .returning(*self.table.columns)
        )
        with self.backend.connect(write=True) as connection:
            row = connection.execute(query, {"_owner": owner, "_until": lease_expires_at}).mappings().first()
            if row is None:
                current = connection.execute(select(self.table).where(c.uuid == uuid)).mappings().first()
                if current is None or current["status"] not in TERMINAL_VALUES:
                    return None  # missing, or leased by another owner
                row = current
        return self._to_record(row)

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        c = self.table.c
        query = (
            update(self.table).where(c.uuid == uuid, c.lease_owner == owner).values(lease_expires_at=lease_expires_at)
        )
        with self.backend.connect(write=True) as connection:
            return connection.execute(query).rowcount == 1

    def _lease_values(self) -> JSONDict:
        c = self.table.c
        return {
            "lease_owner": bindparam("_owner"),
            "lease_expires_at": bindparam("_until", type_=c.lease_expires_at.type),
            "claims": c.claims + 1,
            "revision": c.revision + 1,
        }

    # --- conversion --------------------------------------------------------------------------

    def _full_row(self, data: JSONDict) -> JSONDict:
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

    @staticmethod
    def _by_priority(records: list[JSONDict]) -> list[JSONDict]:
        return sorted(records, key=row_claim_order)


SQLBackend.repository_class = SQLRepository
