"""PostgreSQL's wake-ups: LISTEN/NOTIFY on one channel per store.

A transaction whose writes make a pipeline due sends one ``pg_notify`` on the store's channel,
so it is delivered on commit only (``PostgreSQLBackend.work_arrived``). Each thread that waits
for work holds its own LISTEN connection (``Listener``), out of the pool, and reconnects when it
is lost; while it is down, or when a notification is missed, the worker's poll interval finds
the work. The channel is named after the store's schema, so that two prorch stores on one
database do not wake each other (stores in two databases never do: NOTIFY stays in its
database)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from prorch.model.secrets import error_summary

if TYPE_CHECKING:
    from sqlalchemy import Engine

logger = logging.getLogger("prorch.repositories.postgresql_wakeups")

CHANNEL_PREFIX = "prorch_"
RETRY_SECONDS = 1.0
"""Between attempts to listen again while the server refuses."""
MAX_CHANNEL_BYTES = 63
"""PostgreSQL's longest identifier (NAMEDATALEN - 1)."""


def channel_name(schema: str | None) -> str:
    """The channel of the store in ``schema``: ``prorch_<schema>``, or a digest of the schema's
    name where that would be too long for PostgreSQL."""
    name = f"{CHANNEL_PREFIX}{schema or ''}"
    if len(name.encode()) <= MAX_CHANNEL_BYTES:
        return name
    return CHANNEL_PREFIX + hashlib.sha256((schema or "").encode()).hexdigest()[:32]


class Listener:
    """One waiting thread's LISTEN connection (psycopg 3, autocommit, out of the engine's pool)."""

    def __init__(self, engine: Engine, counter: Any) -> None:
        self.engine = engine
        self.counter = counter  # the backend: ``notifications`` counts what arrived
        self.connection: Any = None
        self.channel: str | None = None
        self.down_since: float | None = None
        self.retry_at = 0.0

    def wait(self, timeout: float) -> bool:
        """True on a notification (or on (re)connecting: one may have been missed), False after
        ``timeout``. Never raises: a lost connection is closed, logged and opened again (at
        most every ``RETRY_SECONDS`` while the server refuses; the poll finds work meanwhile)."""
        if self.connection is None:
            if time.monotonic() < self.retry_at:
                time.sleep(max(0.0, min(timeout, self.retry_at - time.monotonic())))
                return False
            return self._listen(timeout)
        try:
            found = list(self.connection.notifies(timeout=max(0.0, timeout), stop_after=1))
            if found:  # the rest already queued: one pass serves them all
                found += list(self.connection.notifies(timeout=0.0))
        except Exception as exc:
            self._lost(exc)
            return True
        self.counter.notifications += len(found)
        return bool(found)

    def _listen(self, timeout: float) -> bool:
        from psycopg import sql

        connection: Any = None
        try:
            pooled = self.engine.raw_connection()
            connection = pooled.driver_connection
            pooled.detach()  # held by this thread for good: the pool forgets it
            connection.rollback()
            connection.autocommit = True
            schema = connection.execute("SELECT current_schema()").fetchone()[0]
            self.channel = channel_name(schema)
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except Exception as exc:
            if connection is not None:
                connection.close()
            if self.down_since is None:
                self.down_since = time.monotonic()
                logger.warning(
                    "cannot listen for new work (%s); looking for it every poll meanwhile", error_summary(exc)
                )
            self.retry_at = time.monotonic() + RETRY_SECONDS
            return False
        self.connection = connection
        if self.down_since is not None:
            logger.info("listening for new work again, after %.1fs", time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def _lost(self, exc: Exception) -> None:
        self.close()
        self.down_since = time.monotonic()
        logger.warning("lost the connection that listens for new work (%s); reconnecting", error_summary(exc))

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # a broken connection may refuse even that
                connection.close()

    def __del__(self) -> None:  # its thread ended: close the connection with it
        self.close()


class Listeners:
    """The LISTEN connection of each waiting thread of one backend."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: weakref.WeakSet[Listener] = weakref.WeakSet()  # a dead thread's goes with it
        self._lock = threading.Lock()

    def of_this_thread(self, engine: Engine, counter: Any) -> Listener:
        found: Listener | None = getattr(self._local, "listener", None)
        if found is None:
            found = self._local.listener = Listener(engine, counter)
            with self._lock:
                self._all.add(found)
        return found

    def close(self) -> None:
        """Close every thread's connection (``dispose``); a thread waiting again reconnects."""
        with self._lock:
            listeners, self._all = list(self._all), weakref.WeakSet()
        for listener in listeners:
            listener.close()
