"""The PostgreSQL dialect of the SQL backend (``postgresql://...``): several workers on several
machines. Claims skip the rows another worker's claim has locked (``FOR UPDATE SKIP LOCKED``),
workers follow the server's clock, and schema upgrades take an advisory lock."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, false, select, text, true, tuple_, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from prorch.model.due import ClaimRequest
from prorch.model.exceptions import ConcurrentUpdateError, DuplicateRecordError, ProrchError, RepositoryError
from prorch.model.records import JSONDict, Record, to_utc
from prorch.model.secrets import error_summary
from prorch.storage.backend import Outcome, RenewalsPending, Write
from prorch.storage.commits import by_statements
from prorch.storage.repository import TransitionRows
from prorch.storage.wakeups import makes_work
from repositories import postgresql_leases
from repositories.postgresql_leases import limited_name_ready
from repositories.postgresql_transitions import TransitionStatements
from repositories.postgresql_wakeups import Listeners, channel_name
from repositories.schema import TABLES
from repositories.sql import DatabaseRefusedError, SQLBackend, SQLRepository

NOTIFY = text("SELECT pg_notify(:channel, '')")
KEY_LOCK_SPACE = 7270713
"""The first half of a creation key's advisory lock (the two-int form, apart from the others)."""
KEY_LOCK_BUCKETS = 1024
"""Creation keys share this many advisory locks (a power of two): a keyed ``create_many`` of any
size holds at most this many, where one lock per key ran PostgreSQL's shared lock table out
(about 64 x (max_connections + workers) entries) at some 12,000 keys. Two keys of one bucket
only take turns; a batch of thousands of keys holds nearly every bucket."""


def key_bucket(key: str) -> str:
    """SQL for the bucket of the text ``key`` (an expression): its 64-bit hash's low bits."""
    return f"CAST(hashtextextended({key}, 0) & {KEY_LOCK_BUCKETS - 1} AS integer)"


KEY_LOCK = text(f"SELECT pg_advisory_xact_lock({KEY_LOCK_SPACE}, {key_bucket('CAST(:key AS text)')})")
KEY_LOCKS = text(
    f"SELECT count(pg_advisory_xact_lock({KEY_LOCK_SPACE}, bucket)) FROM (SELECT DISTINCT {key_bucket('k')} "
    "AS bucket FROM unnest(CAST(:keys AS text[])) AS k ORDER BY bucket) AS ordered"
)
"""``lock_key`` for many keys in one statement, each bucket once, in bucket order (every caller's)."""
ENTRY_RETRY_FIRST = 30.0
ENTRY_RETRY_MOST = 900.0
"""Seconds before a limited name whose entry for ``pipeline_leases`` timed out is tried again
(doubling from the first to the most): while a long transaction writes the pipelines table (a
large import, a session left idle in its transaction), every try makes its claim wait
``postgresql_leases.ENTRY_WAIT`` for it, and claims come every few milliseconds. Meanwhile the
name's leases are counted from the pipelines, which is as right."""
ONE_STATEMENT_RECORDS = 100
"""At most this many new records go in ``insert``'s one statement (a few parameters each, far
below PostgreSQL's 65,535); a larger batch goes table by table in one transaction."""
SCHEMA_LOCK = 7270712
"""The advisory lock key of schema upgrades ('prorch')."""
BUSY_WAIT_SHARE = 1 / 6
"""The share of a lease the keeper's turn waits, in all, for lease rows other transactions hold
(half the third of a lease between turns): a group commit holds its rows for milliseconds; a
session left idle in its transaction may hold one for ever."""
BUSY_WAIT_LEAST = 0.05
"""Seconds such a wait lasts at least (a lease already at its end by the server's clock)."""
LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', :timeout, true)")
"""``SET LOCAL lock_timeout`` with a bound value."""
LOCK_TIMEOUT_MOST = 2**31 - 1
"""PostgreSQL's largest ``lock_timeout``, in milliseconds."""


CONNECTION_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,  # seconds to open a connection, per host
    "keepalives": 1,  # an idle connection (a LISTEN, a query the server is running) is probed ...
    "keepalives_idle": 30,  # ... after 30 s of silence,
    "keepalives_interval": 10,  # then every 10 s,
    "keepalives_count": 3,  # and given up after 3 unanswered probes: about a minute
    "tcp_user_timeout": 30_000,  # ms a statement sent may go unacknowledged before the connection is given up
}
"""libpq's connection parameters prorch gives psycopg unless the URL's query (``?keepalives_idle=60``),
the engine's ``connect_args`` or, for ``connect_timeout``, ``PGCONNECT_TIMEOUT`` sets them:
without them a network partition hangs each query, and the worker with it, until the kernel's
TCP timeout (15 minutes and more), and an idle connection (the ``LISTEN``) is never found dead."""


def connection_defaults(url: URL, given: dict[str, Any]) -> dict[str, Any]:
    """``CONNECTION_DEFAULTS`` under what the URL and ``given`` (``connect_args``) set."""
    chosen = {key: value for key, value in CONNECTION_DEFAULTS.items() if key not in url.query}
    if "PGCONNECT_TIMEOUT" in os.environ:  # libpq's own, read only when no parameter is given
        chosen.pop("connect_timeout", None)
    return {**chosen, **given}


class PostgreSQLBackend(SQLBackend):
    """A PostgreSQL database through psycopg 3 (``pip install 'prorch[postgresql]'``). Reads
    run in autocommit: one round trip each instead of three (BEGIN, the read, COMMIT)."""

    reads_in_transaction = False
    commits_at_once = 2  # the server flushes concurrent commits' WAL together: two overlap their fsyncs
    _channel: str | None = None

    def _create_engine(self, url: URL, options: dict[str, Any]) -> Engine:
        backend, plus, driver = url.drivername.partition("+")
        if backend == "postgres":  # SQLAlchemy knows the dialect as postgresql only
            url = url.set(drivername=f"postgresql{plus}{driver}")
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        if url.drivername == "postgresql+psycopg":
            options["connect_args"] = connection_defaults(url, options.get("connect_args", {}))
        return super()._create_engine(url, options)

    # --- waking idle workers (repositories.postgresql_wakeups) -------------------------------

    notifications = 0
    """NOTIFYs received by this process's waiting threads (tests and metrics read it)."""

    @functools.cached_property
    def _listeners(self) -> Listeners:
        return Listeners()

    def work_arrived(self) -> None:
        """One NOTIFY per transaction, in it: delivered on commit only, and not at all on a
        rollback."""
        connection = self.current_connection()
        if connection is None or getattr(self._local, "notified", False):
            return
        self._local.notified = True
        with self._errors():
            connection.execute(NOTIFY, {"channel": self._notify_channel(connection)})

    def work_stored(self) -> None:
        """Nothing more: this process's waiting threads get the NOTIFY too."""

    def insert(self, records: Sequence[Record]) -> None:
        """A few new records outside a caller's transaction (a ``create()``) go in one statement
        with their NOTIFY, in autocommit: one round trip (``TransitionStatements.inserts``).
        Inside a transaction (keyed creates take their locks first) or for a large batch, the
        records go table by table in the caller's or a new transaction."""
        if self.current_connection() is not None or not records or len(records) > ONE_STATEMENT_RECORDS:
            super().insert(records)
            return
        added = [(record.MODEL, self(record.MODEL).full_row(record.to_dict())) for record in records]
        with self._errors(), self._checkout(write=False) as connection:  # autocommit: the statement is the transaction
            channel = self._notify_channel(connection) if makes_work(records) else None
            sql, params = self._statements.inserts(added, channel)
            driver: Any = connection.connection.driver_connection
            try:
                driver.execute(sql, params)
            except Exception as exc:
                raise self._insert_error(connection, exc) from None

    def _notify_channel(self, connection: Connection) -> str:
        if self._channel is None:
            self._channel = channel_name(connection.execute(text("SELECT current_schema()")).scalar())
        return self._channel

    def _insert_error(self, connection: Connection, exc: Exception) -> RepositoryError:
        """A uuid stored already is ``DuplicateRecordError`` as on the table-by-table path; a
        lost connection is invalidated (SQLAlchemy never saw the driver's error)."""
        import psycopg

        if isinstance(exc, psycopg.errors.UniqueViolation):
            return DuplicateRecordError(f"{self!r}: {error_summary(exc)}")
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            connection.invalidate()
        return self._driver_error(exc)

    def wait_for_work(self, timeout: float) -> bool:
        return self._listeners.of_this_thread(self.engine, self).wait(timeout)

    def dispose(self) -> None:
        self._listeners.close()
        super().dispose()

    def server_time(self) -> datetime | None:
        """PostgreSQL's clock, which all workers follow (see ``SupportsServerClock``)."""
        with self._errors(), self.engine.connect() as connection:
            moment = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
        return to_utc(moment)

    def lock_name(self, connection: Connection, name: str) -> None:
        """A transaction-scoped advisory lock per pipeline name: two workers counting and
        claiming the same limited name take turns (``max_running``)."""
        connection.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": postgresql_leases.limit_lock_key(name)}
        )

    def lock_key(self, key: str) -> None:
        """A transaction-scoped advisory lock on the creation key's bucket (``KEY_LOCK_BUCKETS``):
        two processes creating with one key take turns between the look-up and the insert or update."""
        connection = self.current_connection()
        if connection is not None:
            connection.execute(KEY_LOCK, {"key": f"prorch:key:{key}"})

    def lock_keys(self, keys: Sequence[str]) -> None:
        connection = self.current_connection()
        if connection is not None:
            connection.execute(KEY_LOCKS, {"keys": [f"prorch:key:{key}" for key in keys]})

    def lock_schema(self, connection: Connection) -> None:
        connection.execute(text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"))

    @functools.cached_property
    def _statements(self) -> TransitionStatements:
        return TransitionStatements(TABLES)

    def one_statement(self, writes: Sequence[Write]) -> list[Outcome] | None:
        """This backend's commit strategy: one statement per transition (``write_transitions``)."""
        return by_statements(self, writes, self.write_transitions)

    def write_transitions(self, units: list[TransitionRows]) -> list[bool]:
        """One statement per transition, a round's statements in one round trip (see
        ``postgresql_transitions``), inside the caller's ``transaction()``."""
        connection = self.current_connection()
        if connection is None:
            raise ProrchError("write_transitions runs inside transaction()")
        with self._errors():
            try:
                outcomes = self._statements.run(connection.connection.driver_connection, units)
            except Exception as exc:
                # the driver's own error, which SQLAlchemy never saw: a killed server connection,
                # or one left mid-pipeline, would be handed out again as if it were sound
                connection.invalidate()
                raise self._driver_error(exc) from None
        for unit, (written, steps_written) in zip(units, outcomes, strict=True):
            if written and not steps_written:
                raise ConcurrentUpdateError(
                    f"a step of pipeline {unit.pipeline[1]} changed since it was read; another orchestrator "
                    "holds it or it was cancelled",
                    uuid=unit.pipeline[1],
                )
        return [written for written, _ in outcomes]

    def _driver_error(self, exc: Exception) -> RepositoryError:
        """A psycopg error as ``_errors`` words SQLAlchemy's: unreachable (the server or the
        connection went away), else refused."""
        import psycopg

        lost = isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
        return (self.unreachable_error if lost else DatabaseRefusedError)(f"{self!r}: {error_summary(exc)}")


class PostgreSQLRepository(SQLRepository):
    _ready_names: frozenset[str] = frozenset()

    def __init__(self, model: str, backend: SQLBackend) -> None:
        super().__init__(model, backend)
        # a name whose entry timed out -> (time.monotonic() before which it is not tried again, that pause)
        self._entry_pauses: dict[str, tuple[float, float]] = {}
        self._names_kept_at: float | None = None  # time.monotonic() of the last keep_limited_names

    def claim(self, request: ClaimRequest) -> list[JSONDict]:
        """The SQL claim; first, every ``KEEP_EVERY`` seconds, the names this worker limits are
        refreshed in ``pipeline_limited_names`` and the stale ones dropped (``keep_limited_names``)."""
        self._keep_limited_names(request)
        return super().claim(request)

    def _keep_limited_names(self, request: ClaimRequest) -> None:
        kept_at, now = self._names_kept_at, time.monotonic()
        if kept_at is not None and now - kept_at < postgresql_leases.KEEP_EVERY:
            return
        if self.backend.current_connection() is not None:
            return  # in a caller's transaction: at a later claim, on a connection of its own
        self._names_kept_at = now
        with self.backend._errors():  # the store down: the worker's outage, as for the claim itself
            dropped = postgresql_leases.keep_limited_names(self.backend.engine, list(request.limits))
        self._ready_names -= set(dropped)

    def lockable(self, due: Select[Any]) -> Select[Any]:
        return due.with_for_update(skip_locked=True)

    def renew_chunk(
        self, connection: Connection, leases: Sequence[tuple[str, str]], lease_expires_at: datetime
    ) -> tuple[set[str], list[tuple[str, str]]]:
        """One statement that waits for no row: it renews the leases whose token still holds a
        row no other transaction holds, and returns apart those still ours whose row one does
        (a group commit of transitions, writing several pipelines in turn): waiting for such a
        row while holding the others could deadlock with that transaction as it goes on to
        write one of them. A lost lease is neither: told in this one round trip."""
        c = self.table.c
        ours = tuple_(c.uuid, c.lease_owner).in_(leases)
        free = select(c.uuid).where(ours).with_for_update(skip_locked=True).cte("free")
        done = (
            update(self.table)
            .where(c.uuid.in_(select(free.c.uuid)))
            .values(lease_expires_at=lease_expires_at)
            .returning(c.uuid)
            .cte("done")
        )
        held = select(c.uuid, false()).where(ours, c.uuid.not_in(select(free.c.uuid)))
        owners = dict(leases)
        rows = connection.execute(select(done.c.uuid, true()).union_all(held)).all()
        busy = [(uuid, owners[uuid]) for uuid, renewed in rows if not renewed]
        return {uuid for uuid, renewed in rows if renewed}, busy

    def renew_busy(self, busy: Sequence[tuple[str, str]], lease_expires_at: datetime) -> set[str]:
        """Each lease whose row another transaction held during the batch, alone, waiting for
        the rows ``BUSY_WAIT_SHARE`` of the lease at most in all (``lock_timeout``): a session
        left idle in its transaction holding one must not hang the keeper's thread, and so
        every other lease of the worker. One still held then is pending (``RenewalsPending``):
        neither renewed nor lost, tried again at the keeper's next turn."""
        budget = self._busy_budget(lease_expires_at)
        deadline = time.monotonic() + budget
        renewed: set[str] = set()
        pending: set[str] = set()
        for uuid, owner in busy:
            left = deadline - time.monotonic()
            outcome = self._renew_within(uuid, owner, lease_expires_at, left) if left > 0 else None
            if outcome is None:
                pending.add(uuid)
            elif outcome:
                renewed.add(uuid)
        if pending:
            raise RenewalsPending(
                f"another transaction held its row for longer than the {budget:.2f}s a renewal waits (a session "
                "idle in its transaction?); tried again at the next turn", renewed, pending,
            )  # fmt: skip
        return renewed

    def _busy_budget(self, lease_expires_at: datetime) -> float:
        """``BUSY_WAIT_SHARE`` of what is left of the lease being written, by the server's clock
        (which the keeper follows), at least ``BUSY_WAIT_LEAST``."""
        now = self.backend.server_time()
        left = (lease_expires_at - now).total_seconds() if now is not None else 0.0
        return max(BUSY_WAIT_LEAST, left * BUSY_WAIT_SHARE)

    def _renew_within(self, uuid: str, owner: str, lease_expires_at: datetime, seconds: float) -> bool | None:
        """``renew_lease``, waiting at most ``seconds`` for the row; None when that ran out."""
        import psycopg

        c = self.table.c
        renew = (
            update(self.table).where(c.uuid == uuid, c.lease_owner == owner).values(lease_expires_at=lease_expires_at)
        )
        timeout = f"{min(LOCK_TIMEOUT_MOST, max(1, round(seconds * 1000)))}ms"  # 0 would wait forever
        backend = self.backend
        with backend._errors(), backend._checkout(write=True) as connection:
            try:
                with connection.begin():
                    connection.execute(LOCK_TIMEOUT, {"timeout": timeout})
                    return connection.execute(renew).rowcount == 1
            except OperationalError as exc:
                if isinstance(exc.orig, psycopg.errors.LockNotAvailable):
                    return None
                raise

    def leases_in_table(self, connection: Connection, name: str) -> bool:
        """From ``pipeline_leases`` once the name is ready there (``postgresql_leases``) and still
        is (a name no claim limited for a day is dropped): its first limited claim enters it;
        until then (a writer in flight at the entry ran past ``ENTRY_WAIT``, or the claim runs
        inside a caller's transaction, whose own writes the entry would wait for), from the
        pipelines, by the name's claim index. An entry that timed out is tried again only after
        ``ENTRY_RETRY_FIRST`` seconds, doubling up to ``ENTRY_RETRY_MOST``: each try makes its
        claim wait for the writers in flight."""
        if name in self._ready_names:
            if postgresql_leases.still_ready(connection, name):
                return True
            self._ready_names -= {name}  # dropped by keep_limited_names (no claim limited it for a day)
        if self.backend.current_connection() is not None:
            return False
        pauses, now = self._entry_pauses, time.monotonic()
        not_before, pause = pauses.get(name, (0.0, 0.0))
        if now < not_before:
            return False
        if limited_name_ready(connection.engine, name):
            self._ready_names |= {name}
            pauses.pop(name, None)
            return True
        pause = min(ENTRY_RETRY_MOST, max(ENTRY_RETRY_FIRST, 2 * pause))
        pauses[name] = (time.monotonic() + pause, pause)
        return False


PostgreSQLBackend.repository_class = PostgreSQLRepository
