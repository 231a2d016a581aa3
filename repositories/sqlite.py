"""The SQLite dialect of the SQL backend: the embedded default (``sqlite:///prorch.db``).

One file, WAL, one writer at a time: a write is a ``BEGIN IMMEDIATE`` transaction (two processes
queue on the busy timeout instead of deadlocking), this process's writers take turns on a lock,
and a read is one autocommit statement (WAL gives it a snapshot). The statements run on every
transition take the fast path on the driver's connection (``repositories.sqlite_fastpath``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from prorch.model.due import ClaimRequest
from prorch.model.exceptions import ConfigurationError, CorruptStoreError, RepositoryError
from prorch.model.records import JSONDict, Metadata, Record
from prorch.model.secrets import error_summary, redact_url
from prorch.model.status import Status
from prorch.storage.commits import call, chunks
from prorch.storage.wakeups import Bell, bell_for
from repositories.sql import SEARCH_CHUNK, SQLBackend, SQLRepository
from repositories.sql_claim import FEW_LEVELS, claim_kind
from repositories.sql_connections import SQLConnections
from repositories.sqlite_fastpath import ENCODERS, DriverStatement, SQLiteFastPath, db_json

BUSY_TIMEOUT_SECONDS = 30.0
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_SYNCHRONOUS = "FULL"
"""Durable by default: in WAL mode, FULL syncs the WAL at every commit, so a committed
transition survives a power cut; NORMAL syncs only at checkpoints."""
WAL_AUTOCHECKPOINT_PAGES = 10_000
"""WAL pages between automatic checkpoints (SQLite's default: 1,000). Measured on W1: 1,000 ->
about 960 transitions/s, 4,000 -> 1,200, 10,000 -> 1,280, 20,000 -> 1,440 (medians of 3): each
checkpoint syncs the database file, so fewer of them pay. 10,000 pages bound the WAL file to
about 40 MB between checkpoints; ``?wal_autocheckpoint=N`` in the URL sets another value."""
JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
"""After a checkpoint, the WAL file is truncated back to this size: a burst does not leave a
large file behind."""


class SQLiteBackend(SQLBackend):
    """A SQLite file in WAL mode with ``synchronous=FULL`` (the default): a committed transition
    survives a process kill, an OS crash and a power cut. ``?synchronous=normal`` in the URL is
    faster but may lose the last commits on an OS crash or power cut (a killed process loses
    nothing); ``?wal_autocheckpoint=N`` sets the WAL pages between checkpoints."""

    reads_in_transaction = False
    unreachable_errors = (OperationalError, InterfaceError, sqlite3.OperationalError)
    unreachable_error = RepositoryError  # a file: locked or unreadable, no server to come back
    duplicate_errors = (IntegrityError, sqlite3.IntegrityError)
    refused_errors = (*SQLBackend.refused_errors, sqlite3.Error)

    def __init__(self, url: str, *, migrate: bool = True, **engine_options: Any) -> None:
        self._write_lock = threading.RLock()
        super().__init__(url, migrate=migrate, **engine_options)

    def _create_engine(self, url: URL, options: dict[str, Any]) -> Engine:
        shown = redact_url(self.url)
        query = dict(url.query)
        synchronous = str(query.pop("synchronous", DEFAULT_SYNCHRONOUS)).upper()
        checkpoint = _pages(query.pop("wal_autocheckpoint", str(WAL_AUTOCHECKPOINT_PAGES)), shown)
        url = url.set(query=query)
        if url.host:
            raise ConfigurationError(
                f"malformed SQLite URL {shown!r}: the path goes after three slashes, "
                f"sqlite:///{url.host}{'/' + url.database if url.database else ''} "
                "(relative) or sqlite:////absolute/path.db"
            )
        if synchronous not in SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous={synchronous.lower()} in {shown!r}: use one of {', '.join(SYNCHRONOUS).lower()}"
            )
        if url.database and url.database != ":memory:":
            folder = Path(url.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise ConfigurationError(f"folder {folder} of SQLite file in {shown!r} does not exist")
            _create_private(Path(url.database).expanduser())
        options.setdefault("connect_args", {}).update({"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False})
        # Every checkout ends its own transaction (commit, rollback, or an autocommit read), so
        # the pool's ROLLBACK on return would only cost a round trip per transition.
        options.setdefault("pool_reset_on_return", None)
        options.setdefault("pool_pre_ping", False)  # a file: no server restart to notice
        options.setdefault("json_serializer", db_json)  # what the fast path writes, on SQLAlchemy's path
        engine = super()._create_engine(url, options)
        _configure(engine, synchronous, checkpoint)
        return engine

    # --- waiting (prorch.storage.wakeups) --------------------------------------------------

    @functools.cached_property
    def file(self) -> Path | None:
        """The database file, or None (``:memory:``: no other process can write to it)."""
        database = self.engine.url.database
        return Path(database).expanduser().resolve() if database and database != ":memory:" else None

    def wake_bell(self) -> Bell:
        """One bell per file in this process, whatever URL named it."""
        return bell_for(f"sqlite:{self.file}") if self.file is not None else super().wake_bell()

    def work_elsewhere(self) -> bool:
        """Another process committed (``PRAGMA data_version``, on this thread's own connection,
        changed: no table read) and a pipeline is due now (one row of the due index)."""
        if self.file is None:
            return False
        try:
            look: sqlite3.Connection | None = getattr(self._local, "looks", None)
            if look is None:
                look = self._local.looks = sqlite3.connect(self.file, timeout=BUSY_TIMEOUT_SECONDS)
            (version,) = look.execute("PRAGMA data_version").fetchone()
            if version == getattr(self._local, "data_version", None):
                return False
            self._local.data_version = version
            due = self(Metadata.PIPELINES_MODEL).search_due(datetime.now(timezone.utc), 1)
        except Exception:  # the file is busy or gone: let the pass look, and say what it finds
            return True
        return bool(due)

    def save(self, records: Sequence[Record]) -> None:
        """New records' rows made from their fields (``SQLiteRepository.save_records``); new
        pipelines, whose search attributes add index rows, as every backend saves them."""
        for model, batch in chunks(records):
            if model == Metadata.PIPELINES_MODEL:
                self.save_rows(model, [record.to_dict() for record in batch])
            else:
                call(f"save {model} records", cast(SQLiteRepository, self(model)).save_records, batch)

    def _unusable(self, exc: BaseException) -> RepositoryError:
        return CorruptStoreError(
            f"{redact_url(self.url)} is not a usable SQLite store ({error_summary(exc)}); it was left "
            "untouched: restore it from a backup, or point prorch at another file"
        )

    def _writer(self, write: bool) -> contextlib.AbstractContextManager[Any]:
        """SQLite takes one writer at a time: this process's threads queue here, woken as soon
        as the writer before them commits, instead of polling the file lock with the busy
        timeout's growing sleeps (other processes still meet on that lock)."""
        return self._write_lock if write else contextlib.nullcontext()

    def _begin(self, connection: Connection) -> Any:
        """Everything inside is a fast-path statement on this driver connection, so the
        transaction is driven there too, without SQLAlchemy's bookkeeping per transition."""
        dbapi = driver(connection)
        dbapi.execute("BEGIN IMMEDIATE")
        self._local.driver = dbapi  # the fast path's statements go straight to it (``_write``)
        return dbapi

    def _end(self, connection: Connection, handle: Any, *, commit: bool) -> None:
        try:
            if commit:
                handle.execute("COMMIT")
            elif handle.in_transaction:
                handle.execute("ROLLBACK")
        finally:
            self._local.driver = None
            if connection.in_transaction():  # a statement through SQLAlchemy autobegan: reset
                connection.rollback()  # a no-op for the driver, which is already done


class SQLiteRepository(SQLRepository):
    """One table, its per-transition statements on the driver's connection."""

    by_levels = True

    def __init__(self, model: str, backend: SQLBackend) -> None:
        super().__init__(model, backend)
        self.fast = SQLiteFastPath(self.table)

    def get(self, uuid: str) -> JSONDict | None:
        with self.backend.connect(write=False) as connection:
            found = cursor(connection).execute(self.fast.select + " WHERE uuid = ?", (uuid,)).fetchone()
        return self.fast.record(found) if found is not None else None

    def save_many(self, rows: list[JSONDict]) -> None:
        """Insert the rows; for pipelines, their search attributes' index rows with them (in
        the caller's transaction: see migration 0021 on why no insert trigger does it here)."""
        encoded = [self.fast.row(row) for row in rows]
        labels = []
        if self.model == Metadata.PIPELINES_MODEL:
            labels = [(row["uuid"], name, value, _created(row)) for row in rows for name, value in _labels(row)]
        if not labels:
            self._write(self.fast.insert, encoded, many=True)
            return
        with self.backend.transaction():
            self._write(self.fast.insert, encoded, many=True)
            self._write(ATTRIBUTE_ROWS, labels, many=True)

    def save_records(self, records: Sequence[Record]) -> None:
        """Insert new records of this table (not pipelines: see ``save_many``), as
        ``save_many`` of their ``to_dict`` would, without the dicts."""
        self._write(self.fast.insert, self.fast.rows_of(records), many=True)

    def update(self, uuid: str, data: JSONDict) -> None:
        if not self.fast.covers(data):  # a partial update (a user's call)
            super().update(uuid, data)
            return
        with self.backend.connect(write=True) as connection:
            cursor(connection).execute(self.fast.update, [*self.fast.row(data, with_uuid=False), uuid])

    def search(self, filter: list[Any]) -> list[JSONDict]:  # noqa: A002 - the seed's name
        field, value = filter
        self.check_field(field)
        sql = f'{self.fast.select} WHERE "{field}" = ?{self.fast.order}'
        with self.backend.connect(write=False) as connection:
            return [self.fast.record(row) for row in cursor(connection).execute(sql, (value,)).fetchall()]

    def search_many(self, field: str, values: list[Any]) -> list[JSONDict]:
        self.check_field(field)
        found: list[JSONDict] = []
        with self.backend.connect(write=False) as connection:
            for start in range(0, len(values), SEARCH_CHUNK):
                chunk = values[start : start + SEARCH_CHUNK]
                sql = f'{self.fast.select} WHERE "{field}" IN ({", ".join("?" * len(chunk))})'
                found.extend(self.fast.record(row) for row in cursor(connection).execute(sql, chunk).fetchall())
        return found

    def claim(self, request: ClaimRequest) -> list[JSONDict]:
        """The claim's statement on the driver's connection, as the commit's statements, once
        per pending priority (``by_levels``), in one transaction: SQLAlchemy's statement compiled
        once, its rows read as ``get`` reads them (SQLAlchemy's execution and row processing cost
        a worker more than SQLite's own work on 100 rows). A claim within limits (several
        statements, a lock per name) stays on SQLAlchemy's path."""
        if request.limits:
            return super().claim(request)
        runnable, mark, dialect = request.runnable, request.mark, self.backend.engine.dialect
        values = self._claim_params(request)

        def run(level: dict[str, Any] | None) -> list[Any]:
            if level is None:  # every level in one walk
                walk: DriverStatement = self._statement(claim_kind("driver_claim", mark), runnable, lambda: (
                    DriverStatement(self._claim_query(runnable, mark), dialect, CLAIM_VALUES)
                ))  # fmt: skip
                return _execute_rows(self.backend, walk.sql, walk.parameters({**values, "_limit": request.limit}))
            by_level: DriverStatement = self._statement(claim_kind("driver_claim_level", mark), runnable, lambda: (
                DriverStatement(self._claim_query(runnable, mark, level=True), dialect, LEVEL_CLAIM_VALUES)
            ))  # fmt: skip
            return _execute_rows(self.backend, by_level.sql, by_level.parameters({**values, **level}))

        with self.backend.transaction(), self.backend._errors():
            connection = self.backend.current_connection()
            assert connection is not None, "inside transaction()"
            found = self._walk(connection, run, request.limit)
        return self._by_priority([self.fast.record(row) for row in found])

    def _levels(self, connection: Connection) -> list[int]:
        """The pending priorities, highest first: a skip over ``ix_pipelines_claim``, one probe
        of the index a level (``max(priority)`` below the last one), on the driver."""
        sql = LEVELS.format(table=self.table.name)
        found = cursor(connection).execute(sql, (Status.PENDING.value, Status.PENDING.value, FEW_LEVELS + 1))
        return [level for (level,) in found.fetchall()]

    def compare_and_set(self, uuid: str, expected_revision: int, data: JSONDict) -> bool:
        if self.fast.covers(data):
            sql, params = self.fast.compare_and_set, self.fast.row(data, with_uuid=False)
        else:  # the fields a transition changed
            sql, params = self.fast.changes(data)
        params += (uuid, expected_revision)
        return self._write(sql, params) == 1

    def _write(self, sql: str, params: Any, *, many: bool = False) -> int:
        """Run a write statement and return how many rows it changed: inside the transition's
        transaction, on its connection directly (the hot path: no connect() per statement),
        else in a short transaction of its own."""
        with self.backend._errors():
            handle: sqlite3.Connection | None = getattr(self.backend._local, "driver", None)
            if handle is not None:  # this thread's transaction, begun on the driver (``_begin``)
                return _execute(handle.cursor(), sql, params, many)
            current = self.backend.current_connection()
            if current is not None:
                return _execute(cursor(current), sql, params, many)
            with self.backend.connect(write=True) as connection:
                return _execute(cursor(connection), sql, params, many)


SQLiteBackend.repository_class = SQLiteRepository


ATTRIBUTE_ROWS = "INSERT INTO pipeline_attributes (pipeline_uuid, name, value, created_at) VALUES (?, ?, ?, ?)"


CLAIM_VALUES = ("_now", "_owner", "_until", "_limit")
"""The values a claim statement is given at each run (``SQLClaims._claim_params``)."""
LEVEL_CLAIM_VALUES = (*CLAIM_VALUES, "_priority")
"""Those of a claim of one priority level (``SQLClaims.by_levels``)."""
LEVELS = (
    "WITH RECURSIVE levels(level) AS (SELECT max(priority) FROM {table} WHERE status = ? UNION ALL "
    "SELECT (SELECT max(priority) FROM {table} WHERE status = ? AND priority < levels.level) FROM levels "
    "WHERE levels.level IS NOT NULL) SELECT level FROM levels WHERE level IS NOT NULL LIMIT ?"
)
"""The pending priorities, highest first (``SQLiteRepository._levels``)."""


def _execute_rows(backend: SQLConnections, sql: str, parameters: list[Any]) -> list[Any]:
    """The rows of a statement run in this thread's transaction, on its driver connection."""
    current = backend.current_connection()
    assert current is not None, "run inside backend.transaction()"
    return cursor(current).execute(sql, parameters).fetchall()


def _labels(row: JSONDict) -> list[tuple[str, str]]:
    found = row.get("attributes")
    return list(found.items()) if isinstance(found, dict) else []


def _created(row: JSONDict) -> str | None:
    """The pipeline's ``created_at`` as this dialect stores it (the fast path's format)."""
    return ENCODERS["time"](row.get("created_at"))  # type: ignore[no-any-return]


def driver(connection: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under a SQLAlchemy one (the pysqlite driver's)."""
    return cast(sqlite3.Connection, connection.connection.driver_connection)


def _execute(on: sqlite3.Cursor, sql: str, params: Any, many: bool) -> int:
    return (on.executemany(sql, params) if many else on.execute(sql, params)).rowcount


def cursor(connection: Connection) -> sqlite3.Cursor:
    """A DBAPI cursor on the connection's current transaction (the fast path)."""
    dbapi: Any = connection.connection.driver_connection  # driver(connection), inlined: the hot path
    found: sqlite3.Cursor = dbapi.cursor()
    return found


def _create_private(path: Path) -> None:
    """Create a new store file readable by its owner only (0600): it holds params, outputs and
    errors. An existing file keeps the mode its operator gave it. SQLite gives its -wal and -shm
    files the mode of the database file."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _pages(value: Any, shown: str) -> int:
    """The ``wal_autocheckpoint`` of a URL: a number of pages, 0 for no automatic checkpoint."""
    text = str(value)
    if not text.isdigit():
        raise ConfigurationError(
            f"wal_autocheckpoint={text} in {shown!r}: give a number of WAL pages (0: no automatic checkpoint)"
        )
    return int(text)


def _configure(engine: Engine, synchronous: str, checkpoint: int) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see on_begin)
        statements = dbapi_connection.cursor()
        statements.execute("PRAGMA journal_mode=WAL")
        statements.execute(f"PRAGMA synchronous={synchronous}")
        statements.execute(f"PRAGMA wal_autocheckpoint={checkpoint}")
        statements.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
        statements.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
        statements.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return
        # straight to the driver: this runs once per transition, SQLAlchemy's execute path costs more
        dbapi = driver(connection)
        if dbapi.in_transaction:  # inside a transaction driven on the driver (SQLBackend.transaction)
            return
        dbapi.execute("BEGIN IMMEDIATE" if options.get("prorch_write", False) else "BEGIN")
