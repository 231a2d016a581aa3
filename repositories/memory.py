"""``memory://``: every record in a dict, for tests and ``prorch.testing``.

Thread-safe and offers every capability (claim with lease, compare-and-set, transaction, due
query), so the engine's multi-worker paths run on it too; nothing survives the process.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prorch.records import format_timestamp
from prorch.repository import IRepository

JSONDict = dict[str, Any]


class MemoryBackend:
    """A backend: ``backend(model)`` gives the repository of that model; all share one lock."""

    thread_safe = True

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, JSONDict]] = {}
        self.lock = threading.RLock()
        self._undo: list[tuple[str, str, JSONDict | None]] | None = None

    def __call__(self, model: str) -> MemoryRepository:
        return MemoryRepository(model, self)

    def __repr__(self) -> str:
        return "MemoryBackend('memory://')"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes in the block, or none: on an exception the tables are put back."""
        with self.lock:
            if self._undo is not None:  # nested: the outer block decides
                yield
                return
            self._undo = []
            try:
                yield
            except BaseException:
                for model, uuid, previous in reversed(self._undo):
                    table = self.tables[model]
                    if previous is None:
                        table.pop(uuid, None)
                    else:
                        table[uuid] = previous
                raise
            finally:
                self._undo = None

    def _remember(self, model: str, uuid: str) -> None:
        if self._undo is not None:
            self._undo.append((model, uuid, self.tables[model].get(uuid)))


class MemoryRepository(IRepository):
    """One model's table inside a ``MemoryBackend``. Records are copied in and out, so a caller's
    dict never aliases the stored one."""

    def __init__(self, model: str, backend: MemoryBackend) -> None:
        super().__init__(model)
        self.backend = backend
        with backend.lock:
            self.table = backend.tables.setdefault(model, {})

    def get(self, uuid: str) -> JSONDict | None:
        with self.backend.lock:
            found = self.table.get(uuid)
            return copy.deepcopy(found) if found is not None else None

    def save(self, data: JSONDict) -> str:
        uuid = data["uuid"]
        with self.backend.lock:
            if uuid in self.table:
                raise KeyError(f"{self.model} {uuid} already exists")
            self.backend._remember(self.model, uuid)
            self.table[uuid] = copy.deepcopy(data)
        return str(uuid)

    def update(self, uuid: str, data: JSONDict) -> None:
        with self.backend.lock:
            if uuid not in self.table:
                raise KeyError(f"{self.model} {uuid} does not exist")
            self.backend._remember(self.model, uuid)
            self.table[uuid] = {**self.table[uuid], **copy.deepcopy(data)}

    def search(self, filter: list[Any]) -> list[JSONDict]:  # noqa: A002 - the seed's name
        field, value = filter
        with self.backend.lock:
            return [copy.deepcopy(row) for row in self.table.values() if row.get(field) == value]

    # --- capabilities ------------------------------------------------------------------------

    def compare_and_set(self, uuid: str, expected_revision: int, data: JSONDict) -> bool:
        with self.backend.lock:
            current = self.table.get(uuid)
            if current is None or current.get("revision", 0) != expected_revision:
                return False
            self.update(uuid, data)
            return True

    def search_due(self, now: datetime, limit: int) -> list[JSONDict]:
        with self.backend.lock:
            return [copy.deepcopy(row) for row in self._due(format_timestamp(now), limit)]

    def claim_due(self, now: datetime, owner: str, lease_expires_at: datetime, limit: int) -> list[JSONDict]:
        with self.backend.lock:
            return [self._lease(row, owner, lease_expires_at) for row in self._due(format_timestamp(now), limit)]

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        with self.backend.lock:
            row = self.table.get(uuid)
            if row is None:
                return None
            if row.get("status") in ("finished", "failed", "cancelled"):
                return copy.deepcopy(row)
            lease = row.get("lease_expires_at")
            if lease is not None and lease > format_timestamp(now) and row.get("lease_owner") != owner:
                return None
            return self._lease(row, owner, lease_expires_at)

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        with self.backend.lock:
            row = self.table.get(uuid)
            if row is None or row.get("lease_owner") != owner:
                return False
            self.backend._remember(self.model, uuid)
            row["lease_expires_at"] = format_timestamp(lease_expires_at)
            return True

    def _due(self, now: str, limit: int) -> list[JSONDict]:
        rows = [
            row
            for row in self.table.values()
            if row.get("status") == "pending"
            and (row.get("next_run_at") is None or row["next_run_at"] <= now)
            and (row.get("lease_expires_at") is None or row["lease_expires_at"] <= now)
        ]
        rows.sort(key=lambda row: (-row.get("priority", 0), row.get("next_run_at") or ""))
        return rows[:limit]

    def _lease(self, row: JSONDict, owner: str, lease_expires_at: datetime) -> JSONDict:
        self.backend._remember(self.model, row["uuid"])
        row["lease_owner"] = owner
        row["lease_expires_at"] = format_timestamp(lease_expires_at)
        row["claims"] = row.get("claims", 0) + 1
        row["revision"] = row.get("revision", 0) + 1
        return copy.deepcopy(row)
