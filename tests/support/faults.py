"""A backend wrapper that makes a share of repository calls fail, before or after the call takes
effect (the second is the nasty case: the write happened but the caller was told it failed)."""

from __future__ import annotations

import random
import threading
from datetime import datetime
from typing import Any

from prorch import IRepository


class InjectedFault(OSError):
    pass


class FaultyBackend:
    def __init__(self, inner: Any, rate: float, seed: int = 7) -> None:
        self.inner = inner
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults = 0
        self.enabled = True
        self.thread_safe = getattr(inner, "thread_safe", False)
        if hasattr(inner, "transaction"):
            self.transaction = inner.transaction

    def __call__(self, model: str) -> FaultyRepository:
        return FaultyRepository(model, self.inner(model), self)

    def call(self, what: str, func: Any, *args: Any) -> Any:
        with self.lock:
            roll = self.rng.random() if self.enabled else 1.0
        if roll < self.rate / 2:
            self._count()
            raise InjectedFault(f"injected fault before {what}")
        result = func(*args)
        if roll < self.rate:
            self._count()
            raise InjectedFault(f"injected fault after {what}")
        return result

    def _count(self) -> None:
        with self.lock:
            self.faults += 1


class FaultyRepository(IRepository):
    def __init__(self, model: str, inner: Any, backend: FaultyBackend) -> None:
        super().__init__(model)
        self.inner = inner
        self.backend = backend

    def get(self, uuid: str) -> Any:
        return self.backend.call("get", self.inner.get, uuid)

    def save(self, data: dict[str, Any]) -> Any:
        return self.backend.call("save", self.inner.save, data)

    def update(self, uuid: str, data: dict[str, Any]) -> Any:
        return self.backend.call("update", self.inner.update, uuid, data)

    def search(self, filter: list[Any]) -> Any:  # noqa: A002
        return self.backend.call("search", self.inner.search, filter)

    def compare_and_set(self, uuid: str, expected_revision: int, data: dict[str, Any]) -> Any:
        return self.backend.call("compare_and_set", self.inner.compare_and_set, uuid, expected_revision, data)

    def search_due(self, now: datetime, limit: int) -> Any:
        return self.backend.call("search_due", self.inner.search_due, now, limit)

    def claim_due(self, now: datetime, owner: str, until: datetime, limit: int) -> Any:
        return self.backend.call("claim_due", self.inner.claim_due, now, owner, until, limit)

    def claim_one(self, uuid: str, now: datetime, owner: str, until: datetime) -> Any:
        return self.backend.call("claim_one", self.inner.claim_one, uuid, now, owner, until)

    def renew_lease(self, uuid: str, owner: str, until: datetime) -> Any:
        return self.backend.call("renew_lease", self.inner.renew_lease, uuid, owner, until)
