"""The SQL backend's engine and connections: this thread's transaction, the connections a pass
keeps checked out, and the driver's errors as ``RepositoryError``. ``SQLBackend``
(``repositories.sql``) is the backend contract over it; the dialects override what differs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
)

from prorch.model.exceptions import (
    ConfigurationError,
    DuplicateRecordError,
    RepositoryError,
    StoreUnreachableError,
)
from prorch.model.jsonvalue import dumps
from prorch.model.secrets import error_summary, redact_url
from prorch.storage.composed import RepositoryBackend
from repositories.schemes import SUPPORTED_SCHEMES

__all__ = ["DatabaseRefusedError", "SQLConnections", "parse_url"]


class DatabaseRefusedError(RepositoryError):
    """The database refused a statement (a constraint, a value it cannot hold), or the file is
    not a database; as opposed to being unreachable."""


class SQLConnections(RepositoryBackend):
    """One SQLAlchemy engine and this thread's connections to it: writes in ``with
    transaction():`` commit together; outside one, each call is its own transaction."""

    url: str
    engine: Engine
    _local: threading.local
    reads_in_transaction: ClassVar[bool] = True
    """False where a read is one autocommit statement: each of prorch's reads is one statement,
    which sees a consistent snapshot on its own (SQLite's WAL, PostgreSQL's READ COMMITTED)."""
    unreachable_errors: ClassVar[tuple[type[BaseException], ...]] = (OperationalError, InterfaceError)
    unreachable_error: ClassVar[type[RepositoryError]] = StoreUnreachableError
    """What ``unreachable_errors`` become: a server that is down or a connection that was lost
    may be back later (a worker waits for it)."""
    duplicate_errors: ClassVar[tuple[type[BaseException], ...]] = (IntegrityError,)
    refused_errors: ClassVar[tuple[type[BaseException], ...]] = (DBAPIError,)

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
            self._local.notified = False  # work_arrived: once per transaction
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

    def _errors(self) -> DriverErrors:
        """Driver errors become RepositoryError, naming the store, with the first line of the
        driver's message only: the rest quotes rows and parameters, which may hold secrets.
        The driver's exception is not chained, so no traceback carries it either. One guard
        per backend (it holds nothing else): a transition's every statement enters it."""
        guard: DriverErrors | None = self.__dict__.get("_driver_errors")
        if guard is None:
            guard = self.__dict__["_driver_errors"] = DriverErrors(self)
        return guard


class DriverErrors:
    """``SQLConnections._errors()``: a class rather than a ``contextlib.contextmanager``
    generator, which costs several times more to enter and leave, and a transition's every
    statement passes through one."""

    __slots__ = ("backend",)

    def __init__(self, backend: SQLConnections) -> None:
        self.backend = backend

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, traceback: Any) -> None:
        if exc is None:
            return
        backend = self.backend
        if isinstance(exc, backend.unreachable_errors):  # down, locked, lost
            raise backend.unreachable_error(f"{backend!r}: {error_summary(exc)}") from None
        if isinstance(exc, backend.duplicate_errors):  # a uuid inserted twice, at the same time
            raise DuplicateRecordError(f"{backend!r}: {error_summary(exc)}") from None
        if isinstance(exc, backend.refused_errors):  # the database refused a statement or is not one
            raise DatabaseRefusedError(f"{backend!r}: {error_summary(exc)}") from None


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


def parse_url(url: str) -> URL:
    """The URL parsed, or one clear error for a malformed one."""
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
