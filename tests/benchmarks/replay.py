"""The floor under W1: the engine's own statement stream, recorded and replayed with the raw driver.

During W1's run phase every statement the engine sends (claims, reads, writes, BEGIN, COMMIT,
psycopg pipeline blocks, autocommit switches) is recorded at the driver, with its parameters
and the connection it went to. The same statements then run again, in the same order, on a copy
of the store taken before the run, with the raw driver (``sqlite3`` or ``psycopg``) and the same
settings (SQLite's PRAGMAs; the same PostgreSQL server): what the store costs for exactly what
the engine asks of it, with no engine at all. The replay ends with every pipeline finished, as
the run did (checked).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

Event = tuple[Any, ...]  # (connection id, kind, *arguments)
STREAM: list[Event] = []
RECORDING = [False]
_lock = threading.Lock()


def record(connection: object, kind: str, *arguments: Any) -> None:
    if RECORDING[0]:
        with _lock:
            STREAM.append((id(connection), kind, *arguments))


def _copied(parameters: Any) -> Any:
    if isinstance(parameters, dict):
        return dict(parameters)
    return tuple(parameters) if parameters is not None else None


# --- SQLite ------------------------------------------------------------------------------------


class SQLiteCursor(sqlite3.Cursor):
    def execute(self, sql: str, parameters: Any = (), /) -> Any:  # type: ignore[override]
        record(self.connection, "execute", sql, _copied(parameters))
        return super().execute(sql, parameters)

    def executemany(self, sql: str, seq: Any, /) -> Any:  # type: ignore[override]
        rows = [_copied(row) for row in seq]
        record(self.connection, "executemany", sql, rows)
        return super().executemany(sql, rows)


class SQLiteConnection(sqlite3.Connection):
    """A sqlite3 connection that records what it is asked to run (pass as ``factory``)."""

    def cursor(self, factory: Any = SQLiteCursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:  # type: ignore[override]
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, seq: Any, /) -> Any:  # type: ignore[override]
        return self.cursor().executemany(sql, seq)

    def commit(self) -> None:
        record(self, "commit")
        super().commit()

    def rollback(self) -> None:
        record(self, "rollback")
        super().rollback()


def replay_sqlite(path: str, pragmas: list[str]) -> tuple[float, float]:
    """Run the recorded stream on the SQLite file at ``path``: (wall seconds, CPU seconds)."""
    connections: dict[int, sqlite3.Connection] = {}

    def on(key: int) -> sqlite3.Connection:
        if key not in connections:
            connection = connections[key] = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            for pragma in pragmas:
                connection.execute(pragma).fetchall()
        return connections[key]

    for key, *_ in STREAM:  # connected before the clock starts, as the engine's pool was
        on(key)
    cpu, started = time.process_time(), time.perf_counter()
    for key, kind, *arguments in STREAM:
        connection = connections[key]
        if kind == "execute":
            connection.execute(*arguments).fetchall()
        elif kind == "executemany":
            connection.executemany(*arguments)
        elif kind == "commit":
            connection.commit()
        else:
            connection.rollback()
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    for connection in connections.values():
        connection.close()
    return took, cpu


# --- PostgreSQL --------------------------------------------------------------------------------


def recording_psycopg() -> Any:
    """A psycopg Connection class that records what it is asked to run."""
    import psycopg

    class Cursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **options: Any) -> Any:  # type: ignore[override]
            record(self.connection, "execute", query, _copied(params), options)
            return super().execute(query, params, **options)

        def executemany(self, query: Any, params_seq: Any, **options: Any) -> None:  # type: ignore[override]
            rows = [_copied(row) for row in params_seq]
            record(self.connection, "executemany", query, rows, options)
            super().executemany(query, rows, **options)

    class Connection(psycopg.Connection[Any]):
        def commit(self) -> None:
            record(self, "commit")
            super().commit()

        def rollback(self) -> None:
            record(self, "rollback")
            super().rollback()

        def _set_autocommit(self, value: bool) -> None:
            record(self, "autocommit", value)
            super()._set_autocommit(value)

        def _set_isolation_level(self, value: Any) -> None:
            record(self, "isolation_level", value)
            super()._set_isolation_level(value)

        @contextlib.contextmanager
        def pipeline(self) -> Iterator[Any]:
            record(self, "pipeline")
            with super().pipeline() as pipeline:
                yield pipeline
            record(self, "end_pipeline")

    return Connection, Cursor


def replay_postgresql(url: str) -> tuple[float, float]:
    """Run the recorded stream on the PostgreSQL database at ``url``: (wall seconds, CPU seconds)."""
    import psycopg

    connections: dict[int, Any] = {}
    pipelines: dict[int, tuple[contextlib.ExitStack, list[Any]]] = {}
    for key, *_ in STREAM:
        if key not in connections:
            connections[key] = psycopg.connect(url)
    cpu, started = time.process_time(), time.perf_counter()
    for key, kind, *arguments in STREAM:
        connection = connections[key]
        if kind == "execute":
            query, params, options = arguments
            cursor = connection.execute(query, params, **options)
            if key in pipelines:
                pipelines[key][1].append(cursor)  # fetched after the block, as the engine does
            elif cursor.description is not None:
                cursor.fetchall()
        elif kind == "executemany":
            query, rows, options = arguments
            connection.cursor().executemany(query, rows, **options)
        elif kind == "commit":
            connection.commit()
        elif kind == "rollback":
            connection.rollback()
        elif kind == "autocommit":
            connection.autocommit = arguments[0]
        elif kind == "isolation_level":
            connection.isolation_level = arguments[0]
        elif kind == "pipeline":
            stack = contextlib.ExitStack()
            stack.enter_context(connection.pipeline())
            pipelines[key] = (stack, [])
        else:  # end_pipeline
            stack, cursors = pipelines.pop(key)
            stack.close()
            for cursor in cursors:
                if cursor.description is not None:
                    cursor.fetchall()
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    for connection in connections.values():
        connection.close()
    return took, cpu
