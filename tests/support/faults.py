"""A backend wrapper that makes a share of repository calls fail, before or after the call takes
effect (the second is the nasty case: the write happened but the caller was told it failed)."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prorch import IRepository


class InjectedFault(OSError):
    pass


class FaultyBackend:
    """Fails a share (``rate``) of the calls at random, and the calls ``plan`` names, in order.
    With ``transactions`` False it offers none (a user's repository without them)."""

    def __init__(self, inner: Any, rate: float, seed: int = 7, *, transactions: bool = True) -> None:
        self.inner = inner
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults = 0
        self.enabled = True
        self.thread_safe = getattr(inner, "thread_safe", False)
        self.planned: list[tuple[str, bool]] = []
        self.calls: dict[str, int] = {}  # repository calls made, by method
        self._depth = threading.local()
        if transactions and hasattr(inner, "transaction"):
            self.transaction = self._transaction

    def plan(self, what: str, *, after: bool = False) -> None:
        """Fail the next call of ``what`` (a repository method, of one model's repository as
        "PIPELINE.compare_and_set", or "commit": a transaction's end), before it takes effect, or
        ``after`` (stored, but its answer lost)."""
        with self.lock:
            self.planned.append((what, after))

    def _planned(self, what: str, model: str = "") -> bool | None:
        """Whether this call of ``what`` (on ``model``'s repository) fails after (True), before
        (False) or not (None)."""
        with self.lock:
            if self.planned and self.planned[0][0] in (what, f"{model}.{what}"):
                return self.planned.pop(0)[1]
        return None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """The inner transaction; the outermost one's commit may be planned to fail after it stored."""
        depth = getattr(self._depth, "value", 0)
        self._depth.value = depth + 1
        try:
            with self.inner.transaction():
                yield
        finally:
            self._depth.value = depth
        if depth == 0 and self._planned("commit") is not None:
            self._count()
            raise InjectedFault("injected fault after commit (stored; its answer lost)")

    def __call__(self, model: str) -> FaultyRepository:
        return FaultyRepository(model, self.inner(model), self)

    def call(self, what: str, func: Any, *args: Any, model: str = "") -> Any:
        planned = self._planned(what, model)
        with self.lock:
            roll = self.rng.random() if self.enabled else 1.0
            self.calls[what] = self.calls.get(what, 0) + 1
        before = roll < self.rate / 2 if planned is None else not planned
        if before:
            self._count()
            raise InjectedFault(f"injected fault before {what}")
        result = func(*args)
        if roll < self.rate or planned:
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

    def _call(self, what: str, func: Any, *args: Any) -> Any:
        return self.backend.call(what, func, *args, model=self.model)

    def get(self, uuid: str) -> Any:
        return self._call("get", self.inner.get, uuid)

    def save(self, data: dict[str, Any]) -> Any:
        return self._call("save", self.inner.save, data)

    def update(self, uuid: str, data: dict[str, Any]) -> Any:
        return self._call("update", self.inner.update, uuid, data)

    def search(self, filter: list[Any]) -> Any:  # noqa: A002
        return self._call("search", self.inner.search, filter)

    def compare_and_set(self, uuid: str, expected_revision: int, data: dict[str, Any]) -> Any:
        return self._call("compare_and_set", self.inner.compare_and_set, uuid, expected_revision, data)

    def search_due(self, now: datetime, limit: int) -> Any:
        return self._call("search_due", self.inner.search_due, now, limit)

    def claim_due(self, now: datetime, owner: str, until: datetime, limit: int) -> Any:
        return self._call("claim_due", self.inner.claim_due, now, owner, until, limit)

    def claim_one(self, uuid: str, now: datetime, owner: str, until: datetime) -> Any:
        return self._call("claim_one", self.inner.claim_one, uuid, now, owner, until)

    def renew_lease(self, uuid: str, owner: str, until: datetime) -> Any:
        return self._call("renew_lease", self.inner.renew_lease, uuid, owner, until)
