"""SQL backends through SQLAlchemy 2 Core: ``sqlite:///prorch.db`` (the embedded default) and
``postgresql://...`` (several workers on several machines), or any SQLAlchemy URL.

Every capability the engine uses is here: an atomic claim with a lease (PostgreSQL:
``FOR UPDATE SKIP LOCKED``; SQLite: one ``BEGIN IMMEDIATE`` transaction), compare-and-set on the
``revision`` column, a transaction around one transition, and a due query served by an index.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Integer, bindparam, create_engine, event, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)

from prorch.exceptions import (
    ConfigurationError,
    CorruptStoreError,
    DuplicateRecordError,
    RepositoryError,
    SchemaTooNewError,
)
from prorch.records import format_timestamp, to_utc
from prorch.repository import IRepository
from prorch.secrets import error_summary, redact_url
from repositories.schema import HISTORY_TABLE, SCHEMA_REVISION, TABLES, VERSION_TABLE, schema_history
from repositories.sqlite_fastpath import SQLiteFastPath

logger = logging.getLogger("prorch.repositories.sql")
JSONDict = dict[str, Any]

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
TERMINAL = ("finished", "failed", "cancelled")


class DatabaseRefusedError(RepositoryError):
    """The database refused a statement (a constraint, a value it cannot hold), or the file is
    not a database; as opposed to being unreachable."""


class SQLBackend:
    """A backend over one SQLAlchemy engine; ``backend(model)`` gives that model's repository.

    Writes in ``with backend.transaction():`` commit together; outside one, each call is its own
    transaction.
    """

    thread_safe = True

    def __init__(self, url: str, *, migrate: bool = True, **engine_options: Any) -> None:
        self.url = url
        self.engine = _create_engine(url, **engine_options)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.is_postgresql = self.engine.dialect.name == "postgresql"
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._repositories: dict[str, SQLRepository] = {}
        if migrate:
            try:
                upgrade(self)
            except (DatabaseError, DatabaseRefusedError) as exc:
                if not self.is_sqlite:
                    raise RepositoryError(f"cannot open {self!r}: {error_summary(exc)}") from None
                raise CorruptStoreError(
                    f"{redact_url(self.url)} is not a usable SQLite store ({error_summary(exc)}); it was left "
                    "untouched: restore it from a backup, or point prorch at another file"
                ) from exc

    def __call__(self, model: str) -> SQLRepository:
        repository = self._repositories.get(model)
        if repository is None:  # one per model: its statements are built once
            repository = self._repositories[model] = SQLRepository(model, self)
        return repository

    def __repr__(self) -> str:
        return f"SQLBackend({redact_url(self.url)!r})"

    def dispose(self) -> None:
        self.engine.dispose()

    def server_time(self) -> datetime | None:
        """PostgreSQL's clock, which all workers follow (see ``SupportsServerClock``); None on
        SQLite, whose processes share this machine's clock."""
        if not self.is_postgresql:
            return None
        with self._errors(), self.engine.connect() as connection:
            moment = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
        return to_utc(moment)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All repository writes in the block commit together (nested blocks join the outer)."""
        if getattr(self._local, "connection", None) is not None:
            yield
            return
        with self._errors(), self._sqlite_writer(), self._checkout(write=True) as connection:
            if self.is_sqlite:
                # Everything inside is a fast-path statement on this driver connection, so the
                # transaction is driven there too, without SQLAlchemy's bookkeeping per transition.
                dbapi = connection.connection.driver_connection
                assert dbapi is not None
                dbapi.execute("BEGIN IMMEDIATE")
                self._local.connection = connection
                try:
                    yield
                except BaseException:
                    if dbapi.in_transaction:
                        dbapi.execute("ROLLBACK")
                    raise
                else:
                    dbapi.execute("COMMIT")
                finally:
                    self._local.connection = None
                    if connection.in_transaction():  # a statement through SQLAlchemy autobegan: reset
                        connection.rollback()  # a no-op for the driver, which is already done
                return
            with connection.begin():
                self._local.connection = connection
                try:
                    yield
                finally:
                    self._local.connection = None

    @contextlib.contextmanager
    def connect(self, *, write: bool) -> Iterator[Connection]:
        """The open transaction's connection, or a new short transaction (IMMEDIATE for writes
        on SQLite, so two processes queue on the busy timeout instead of deadlocking). A read on
        SQLite is one statement in autocommit: no BEGIN/COMMIT, WAL gives it a snapshot."""
        current = getattr(self._local, "connection", None)
        if current is not None:
            yield current
            return
        with self._errors(), self._sqlite_writer(write), self._checkout(write=write) as connection:
            if not write and self.is_sqlite:
                yield connection
                return
            with connection.begin():
                yield connection

    def _sqlite_writer(self, write: bool = True) -> contextlib.AbstractContextManager[Any]:
        """SQLite takes one writer at a time: this process's threads queue here, woken as soon
        as the writer before them commits, instead of polling the file lock with the busy
        timeout's growing sleeps (other processes still meet on that lock)."""
        return self._write_lock if write and self.is_sqlite else contextlib.nullcontext()

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
        """A connection: IMMEDIATE transactions for writes, autocommit for reads on SQLite;
        the thread's pinned one inside ``pinned()``, else one from the pool."""
        pins = getattr(self._local, "pins", None)
        if pins is not None:
            connection = pins.get(write)
            if connection is None or connection.closed:
                connection = pins[write] = self._configure(self.engine.connect(), write=write)
            try:
                yield connection
            except BaseException:
                if connection.in_transaction():
                    connection.rollback()
                raise
            return
        with self.engine.connect() as connection:
            yield self._configure(connection, write=write)

    def _configure(self, connection: Connection, *, write: bool) -> Connection:
        if write:
            connection.execution_options(prorch_write=True)
        elif self.is_sqlite:
            connection.execution_options(isolation_level="AUTOCOMMIT")
        return connection

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Driver errors become RepositoryError, naming the store, with the first line of the
        driver's message only: the rest quotes rows and parameters, which may hold secrets.
        The driver's exception is not chained, so no traceback carries it either."""
        try:
            yield
        except (OperationalError, InterfaceError, sqlite3.OperationalError) as exc:  # down, locked, lost
            raise RepositoryError(f"{self!r}: {error_summary(exc)}") from None
        except (IntegrityError, sqlite3.IntegrityError) as exc:  # a uuid inserted twice, at the same time
            raise DuplicateRecordError(f"{self!r}: {error_summary(exc)}") from None
        except (DBAPIError, sqlite3.Error) as exc:  # the database refused a statement or is not one
            raise DatabaseRefusedError(f"{self!r}: {error_summary(exc)}") from None


def _create_engine(url: str, **options: Any) -> Engine:
    shown = redact_url(url)
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - a malformed port raises here, not deep inside the driver
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(f"malformed repository URL {shown!r}: {error_summary(exc)}") from None
    query = dict(parsed.query)
    synchronous = str(query.pop("synchronous", "NORMAL")).upper()
    parsed = parsed.set(query=query)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.host:
            raise ConfigurationError(
                f"malformed SQLite URL {shown!r}: the path goes after three slashes, "
                f"sqlite:///{parsed.host}{'/' + parsed.database if parsed.database else ''} "
                "(relative) or sqlite:////absolute/path.db"
            )
        if synchronous not in SQLITE_SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous={synchronous.lower()} in {shown!r}: use one of {', '.join(SQLITE_SYNCHRONOUS).lower()}"
            )
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise ConfigurationError(f"folder {folder} of SQLite file in {shown!r} does not exist")
            _create_private(Path(parsed.database).expanduser())
        options.setdefault("connect_args", {}).update(
            {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False}
        )
        # Every checkout ends its own transaction (commit, rollback, or an autocommit read), so
        # the pool's ROLLBACK on return would only cost a round trip per transition.
        options.setdefault("pool_reset_on_return", None)
    else:
        options.setdefault("pool_pre_ping", True)  # a server restart leaves dead pooled connections
    options.setdefault("hide_parameters", True)  # bound values (user data, tokens) never reach a message
    try:
        engine = create_engine(parsed, **options)
    except NoSuchModuleError as exc:
        from repositories import SUPPORTED_SCHEMES

        raise ConfigurationError(
            f"unsupported repository URL scheme {parsed.drivername!r} in {shown!r}; supported: "
            f"{', '.join(SUPPORTED_SCHEMES)}"
        ) from exc
    except ImportError as exc:
        extra = "postgres" if parsed.get_backend_name() == "postgresql" else None
        hint = f"pip install 'prorch[{extra}]'" if extra else "install the SQLAlchemy driver it names"
        raise ConfigurationError(f"no driver for repository URL {shown!r} ({exc}): {hint}") from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, synchronous)
    return engine


def _create_private(path: Path) -> None:
    """Create a new store file readable by its owner only (0600): it holds params, outputs and
    errors. An existing file keeps the mode its operator gave it. SQLite gives its -wal and -shm
    files the mode of the database file."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see on_begin)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return
        # straight to the driver: this runs once per transition, SQLAlchemy's execute path costs more
        dbapi = connection.connection.driver_connection
        assert dbapi is not None
        if dbapi.in_transaction:  # inside a transaction driven on the driver (SQLBackend.transaction)
            return
        dbapi.execute("BEGIN IMMEDIATE" if options.get("prorch_write", False) else "BEGIN")


def _cursor(connection: Connection) -> Any:
    """A DBAPI cursor on the connection's current transaction (the SQLite fast path)."""
    return connection.connection.driver_connection.cursor()  # type: ignore[union-attr]


# --- schema migrations ----------------------------------------------------------------------------


def stored_revision(connection: Connection) -> str | None:
    """The store's schema revision, or None for an empty store."""
    try:
        with connection.begin_nested():
            return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    except SQLAlchemyError:
        return None


MIGRATIONS = Path(__file__).parent / "migrations"


def known_revisions(migrations: Path = MIGRATIONS) -> frozenset[str]:
    """The revisions this prorch ships (file names ``NNNN_*.py``): no Alembic import needed."""
    return frozenset(path.name[:4] for path in (migrations / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


KNOWN_REVISIONS = known_revisions()


def upgrade(backend: SQLBackend, revision: str = "head", *, migrations: Path = MIGRATIONS) -> None:
    """Create or upgrade the schema with the migrations shipped in the package, under a lock so
    that workers starting together do it once. A store already migrated by a newer prorch is used
    as it is when every migration this one does not know only adds; otherwise it is refused."""
    with backend.connect(write=True) as connection:
        stored = stored_revision(connection)
        if revision == "head" and stored == SCHEMA_REVISION and migrations == MIGRATIONS:
            return  # the common case: no Alembic import at all
        known = KNOWN_REVISIONS if migrations == MIGRATIONS else known_revisions(migrations)
        if stored is not None and stored not in known:
            _accept_newer(backend, connection, stored, known)
            return
        if backend.is_postgresql:
            connection.execute(text("SELECT pg_advisory_xact_lock(7270712)"))  # 'prorch' schema lock
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        config = Config()
        config.set_main_option("script_location", str(migrations))
        config.attributes["connection"] = connection
        logger.info("upgrading schema of %r to %s", backend, revision)
        command.upgrade(config, revision)
        if HISTORY_TABLE in inspect(connection).get_table_names():
            recorded = set(connection.execute(select(schema_history.c.revision)).scalars())
            for script in ScriptDirectory.from_config(config).walk_revisions():
                if script.revision not in recorded:
                    additive = bool(getattr(script.module, "additive", False))
                    connection.execute(schema_history.insert().values(revision=script.revision, additive=additive))


def _accept_newer(backend: SQLBackend, connection: Connection, stored: str, known: frozenset[str]) -> None:
    """Work on a schema from a newer prorch only if all its extra migrations are additive."""
    newest = max(known)
    refused = SchemaTooNewError(
        f"store schema {stored} is newer than this prorch understands ({newest}); upgrade prorch"
    )
    try:
        query = select(schema_history.c.revision, schema_history.c.additive)
        rows = {revision: additive for revision, additive in connection.execute(query)}
    except SQLAlchemyError as exc:  # no history table: nothing says the extra migrations only add
        raise refused from exc
    extra = {revision: additive for revision, additive in rows.items() if revision not in known}
    if stored not in extra or not all(extra.values()):
        raise refused
    logger.info(
        "store schema %s of %r is newer than this prorch (%s); its extra migrations (%s) only add, so it is used as is",
        stored, backend, newest, ", ".join(sorted(extra)),
    )  # fmt: skip


# --- the repository ---------------------------------------------------------------------------------


class SQLRepository(IRepository):
    """One model's table. Timestamps travel as ISO strings in records and as aware datetimes in
    the database."""

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
        self.fast = SQLiteFastPath(self.table) if backend.is_sqlite else None

    # --- the four methods --------------------------------------------------------------------

    def get(self, uuid: str) -> JSONDict | None:
        with self.backend.connect(write=False) as connection:
            if self.fast is not None:
                found = _cursor(connection).execute(self.fast.select + " WHERE uuid = ?", (uuid,)).fetchone()
                return self.fast.record(found) if found is not None else None
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
            if self.fast is not None:
                _cursor(connection).executemany(self.fast.insert, [self.fast.row(row) for row in rows])
            else:
                connection.execute(self._insert, [self._full_row(row) for row in rows])

    def update(self, uuid: str, data: JSONDict) -> None:
        with self.backend.connect(write=True) as connection:
            if self.fast is not None and self.fast.covers(data):
                _cursor(connection).execute(self.fast.update, [*self.fast.row(data, with_uuid=False), uuid])
                return
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
            if field not in self.columns:
                raise ConfigurationError(f"cannot search {self.table.name} by unknown field {field!r}")
            query = select(self.table).where(self.table.c[field] == bindparam("_value"))
            if "seq" in self.columns:
                query = query.order_by(self.table.c.seq, self.table.c.at)
            self._searches[field] = query
        with self.backend.connect(write=False) as connection:
            if self.fast is not None:
                sql = f'{self.fast.select} WHERE "{field}" = ?{self.fast.order}'
                return [self.fast.record(row) for row in _cursor(connection).execute(sql, (value,)).fetchall()]
            rows = connection.execute(query, {"_value": value}).mappings().all()
        return [self._to_record(row) for row in rows]

    # --- capabilities ------------------------------------------------------------------------

    def compare_and_set(self, uuid: str, expected_revision: int, data: JSONDict) -> bool:
        with self.backend.connect(write=True) as connection:
            if self.fast is not None and self.fast.covers(data):
                params = [*self.fast.row(data, with_uuid=False), uuid, expected_revision]
                return bool(_cursor(connection).execute(self.fast.compare_and_set, params).rowcount == 1)
            values = self._to_row(data)
            values.pop("uuid", None)
            if self._cas_all is not None and values.keys() == self.columns - {"uuid"}:
                result = connection.execute(self._cas_all, {**values, "_uuid": uuid, "_expected": expected_revision})
            else:
                c = self.table.c
                query = update(self.table).where(c.uuid == uuid, c.revision == expected_revision).values(values)
                result = connection.execute(query)
            return result.rowcount == 1

    def _due_query(self) -> Any:
        """Due pipeline uuids, by the (status, next_run_at, priority) index; bound: _now, _limit."""
        c = self.table.c
        now = bindparam("_now", type_=c.next_run_at.type)
        return (
            select(c.uuid)
            .where(
                c.status == "pending",
                c.next_run_at <= now,
                (c.lease_expires_at.is_(None)) | (c.lease_expires_at <= now),
            )
            .order_by(c.priority.desc(), c.next_run_at)
            .limit(bindparam("_limit", type_=Integer()))
        )

    def search_due(self, now: datetime, limit: int) -> list[JSONDict]:
        query = self._searches.get("_due")
        if query is None:
            due = self._due_query().subquery()
            query = self._searches["_due"] = select(self.table).where(self.table.c.uuid.in_(select(due.c.uuid)))
        with self.backend.connect(write=False) as connection:
            rows = connection.execute(query, {"_now": now, "_limit": limit}).mappings().all()
        return self._by_priority([self._to_record(row) for row in rows])

    def claim_due(self, now: datetime, owner: str, lease_expires_at: datetime, limit: int) -> list[JSONDict]:
        query = self._searches.get("_claim")
        if query is None:
            due = self._due_query()
            if self.backend.is_postgresql:
                due = due.with_for_update(skip_locked=True)
            query = self._searches["_claim"] = (
                update(self.table)
                .where(self.table.c.uuid.in_(due.scalar_subquery()))
                .values(self._lease_values())
                .returning(*self.table.columns)
            )
        params = {"_now": now, "_limit": limit, "_owner": owner, "_until": lease_expires_at}
        with self.backend.connect(write=True) as connection:
            rows = connection.execute(query, params).mappings().all()
        return self._by_priority([self._to_record(row) for row in rows])

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        c = self.table.c
        query = (
            update(self.table)
            .where(
                c.uuid == uuid,
                c.status.not_in(TERMINAL),
                (c.lease_expires_at.is_(None)) | (c.lease_expires_at <= now) | (c.lease_owner == owner),
            )
            .values(self._lease_values())
            .returning(*self.table.columns)
        )
        with self.backend.connect(write=True) as connection:
            row = connection.execute(query, {"_owner": owner, "_until": lease_expires_at}).mappings().first()
            if row is None:
                current = connection.execute(select(self.table).where(c.uuid == uuid)).mappings().first()
                if current is None or current["status"] not in TERMINAL:
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
        record = dict(row)
        for key in self.timestamps:
            value = record.get(key)
            if isinstance(value, datetime):
                record[key] = format_timestamp(to_utc(value))
        return record

    @staticmethod
    def _by_priority(records: list[JSONDict]) -> list[JSONDict]:
        return sorted(records, key=lambda r: (-r.get("priority", 0), r.get("next_run_at") or ""))
