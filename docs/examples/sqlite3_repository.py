"""A complete repository written against prorch's interfaces, on the standard library's sqlite3.

It stores each record as JSON text, implements the four required methods, and adds each optional
capability. prorch's own test suite runs it through the same contract as the shipped backends.
Use it as a template for your own store (DynamoDB, MongoDB, Redis, an HTTP API...).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prorch import IRepository, Metadata
from prorch.model.records import format_timestamp

TERMINAL = ("finished", "failed", "cancelled")


class Sqlite3Backend:
    """The backend: ``backend(model)`` makes a repository; all share one connection per thread."""

    thread_safe = True  # lets the orchestrator run hooks of several pipelines in threads

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        with self._connection() as db:
            for table in Metadata.TABLE_NAMES.values():
                db.execute(f"CREATE TABLE IF NOT EXISTS {table} (uuid TEXT PRIMARY KEY, data TEXT NOT NULL)")
            # serves the due query without reading waiting pipelines
            db.execute(
                "CREATE INDEX IF NOT EXISTS pipelines_due ON pipelines ("
                "json_extract(data, '$.status'), json_extract(data, '$.next_run_at'))"
            )

    def __call__(self, model: str) -> Sqlite3Repository:
        return Sqlite3Repository(model, self)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
            self._local.depth = 0
        return db  # type: ignore[no-any-return]

    # Capability: a transaction around one transition (prorch.SupportsTransaction).
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        if self._local.depth:  # nested: join the outer transaction
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            self._local.depth = 0


class Sqlite3Repository(IRepository):
    def __init__(self, model: str, backend: Sqlite3Backend) -> None:
        super().__init__(model)
        self.backend = backend
        self.table = Metadata.TABLE_NAMES[model]

    # --- the four required methods -----------------------------------------------------------

    def get(self, uuid: str) -> dict[str, Any] | None:
        row = self.backend._connection().execute(f"SELECT data FROM {self.table} WHERE uuid = ?", (uuid,)).fetchone()
        return json.loads(row[0]) if row else None

    def save(self, data: dict[str, Any]) -> None:
        with self.backend.transaction() as db:
            db.execute(f"INSERT INTO {self.table} (uuid, data) VALUES (?, ?)", (data["uuid"], json.dumps(data)))

    def update(self, uuid: str, data: dict[str, Any]) -> None:
        with self.backend.transaction() as db:
            db.execute(f"UPDATE {self.table} SET data = json_patch(data, ?) WHERE uuid = ?", (json.dumps(data), uuid))

    def search(self, filter: list[Any]) -> list[dict[str, Any]]:  # noqa: A002 - prorch's name
        field, value = filter
        rows = self.backend._connection().execute(
            f"SELECT data FROM {self.table} WHERE json_extract(data, ?) = ?", (f"$.{field}", value)
        )
        return [json.loads(row[0]) for row in rows]

    # --- optional capabilities -----------------------------------------------------------------

    # prorch.SupportsCompareAndSet: refuse a write made from a stale read.
    def compare_and_set(self, uuid: str, expected_revision: int, data: dict[str, Any]) -> bool:
        with self.backend.transaction() as db:
            cursor = db.execute(
                f"UPDATE {self.table} SET data = ? WHERE uuid = ? AND json_extract(data, '$.revision') = ?",
                (json.dumps(data), uuid, expected_revision),
            )
            return cursor.rowcount == 1

    # prorch.SupportsDueQuery: due pipelines through the index, highest priority first.
    def search_due(self, now: datetime, limit: int) -> list[dict[str, Any]]:
        moment = format_timestamp(now)
        rows = self.backend._connection().execute(
            "SELECT data FROM pipelines WHERE json_extract(data, '$.status') = 'pending' "
            "AND json_extract(data, '$.next_run_at') <= ? "
            "AND coalesce(json_extract(data, '$.lease_expires_at'), '') <= ? "
            "ORDER BY json_extract(data, '$.priority') DESC, json_extract(data, '$.next_run_at') LIMIT ?",
            (moment, moment, limit),
        )
        return [json.loads(row[0]) for row in rows]

    # prorch.SupportsClaim: select and lease in one write transaction, only the classes
    # (name, version) the worker has when it says (`runnable`): a worker without a class
    # leaves its pipelines to one that has it.
    def claim_due(
        self, now: datetime, owner: str, lease_expires_at: datetime, limit: int, runnable: Any = None
    ) -> list[dict[str, Any]]:
        with self.backend.transaction():
            due = self.search_due(now, limit if runnable is None else -1)  # LIMIT -1: all of them
            due = [row for row in due if runnable is None or (row["name"], row.get("version", 1)) in runnable]
            return [self._lease(row, owner, lease_expires_at) for row in due[:limit]]

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> dict[str, Any] | None:
        with self.backend.transaction():
            row = self.get(uuid)
            if row is None or row["status"] in TERMINAL:
                return row
            lease = row.get("lease_expires_at")
            if lease and lease > format_timestamp(now) and row.get("lease_owner") != owner:
                return None
            return self._lease(row, owner, lease_expires_at)

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        with self.backend.transaction() as db:
            cursor = db.execute(
                "UPDATE pipelines SET data = json_set(data, '$.lease_expires_at', ?) "
                "WHERE uuid = ? AND json_extract(data, '$.lease_owner') = ?",
                (format_timestamp(lease_expires_at), uuid, owner),
            )
            return cursor.rowcount == 1

    def _lease(self, row: dict[str, Any], owner: str, lease_expires_at: datetime) -> dict[str, Any]:
        row.update(
            lease_owner=owner,
            lease_expires_at=format_timestamp(lease_expires_at),
            claims=row.get("claims", 0) + 1,
            revision=row["revision"] + 1,
        )
        self.update(row["uuid"], row)
        return row
