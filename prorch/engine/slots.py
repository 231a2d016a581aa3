"""``Slots``: a continuous driver of the runner's writings, for a worker that refills a slot as
soon as one frees.

``write_in_rounds`` drives a fixed list of writings to their ends (one pass). A worker instead
keeps up to ``concurrency`` pipelines in progress, and takes a new one (``start``) whenever one
ends, while the others go on: a slow hook holds its own slot, never the others'. A slot is held
from a pipeline's start to the end of its advance, through its hooks and the commits of its
transitions; it is free again once its last transition is stored.

Group commit stays: a transition waits for the others finishing within ``window`` seconds (or
until ``group`` are waiting, or no hook is left running), and they are stored in one
transaction, each all-or-nothing on its own, with shared hook marks as in rounds (see
``prorch.engine.rounds``). A pipeline started ``alone`` (a crash suspect) runs only while no
other does, one commit per transition, each hook marked on its own."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

from prorch.engine.rounds import _Ended, _resume, _shared
from prorch.engine.state import T, Writing
from prorch.storage.store import Store, Write

K = TypeVar("K", bound=Hashable)


class Slots(Generic[K, T]):
    """Up to ``concurrency`` writings in progress, keyed by ``K``; ``step`` drives them and
    returns those that ended. With ``concurrency`` 1 (a store that is not thread-safe) the
    writings run in the calling thread. A key holds one slot at most. A writing that raises
    (a bug: an advance catches its errors) ends with ``broken(key, error)``; the others go on."""

    def __init__(
        self, store: Store, *, concurrency: int, group: int, window: float, broken: Callable[[K, Exception], T]
    ) -> None:
        self.store = store
        self.broken = broken
        self.concurrency = concurrency
        self.grouped = group > 1 and store.has_transaction
        self.group = group if self.grouped else 1
        self.window = window
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="prorch") if concurrency > 1 else None
        self._writings: dict[K, Writing[T]] = {}
        self._alone: set[K] = set()
        self._ready: deque[tuple[K, Exception | None]] = deque()
        self._running: dict[Future[Write | _Ended[T]], K] = {}
        self._queue: list[tuple[K, Write]] = []
        self._queued_since = 0.0

    @property
    def active(self) -> int:
        """Pipelines in progress: each holds a slot."""
        return len(self._writings)

    @property
    def free(self) -> int:
        """Slots free to start a pipeline in (none while one runs alone)."""
        return 0 if self._alone else self.concurrency - len(self._writings)

    def start(
        self,
        key: K,
        writing: Writing[T],
        *,
        first: Write | None = None,
        resumed: Exception | None = None,
        alone: bool = False,
    ) -> None:
        """Take ``writing`` into a free slot. ``first``: its next write, already taken from it
        (to store before it is resumed); ``resumed``: what to resume it with first. A key that
        holds a slot already is refused (``ValueError``): its two writings would interleave."""
        if key in self._writings:
            raise ValueError(f"{key!r} holds a slot already; it can take another once its writing ended")
        self._writings[key] = writing
        if alone:
            self._alone.add(key)
        if first is not None:
            self._enqueue(key, first)
        else:
            self._ready.append((key, resumed))

    def step(self, timeout: float) -> list[tuple[K, T]]:
        """Resume the writings that are ready, wait up to ``timeout`` seconds for one to reach
        its next transition, and store the waiting transitions when their group is due; returns
        the writings that ended, with their results."""
        ended: list[tuple[K, T]] = []
        self._launch(ended)
        if self._running:
            if self._queue:
                timeout = max(0.0, min(timeout, self._queued_since + self.window - time.monotonic()))
            done, _ = wait(list(self._running), timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                key = self._running.pop(future)
                try:
                    step = future.result()
                except Exception as exc:
                    self._end(key, self.broken(key, exc), ended)
                    continue
                self._took(key, step, ended)
        if self._queue and self._group_due():
            self._store()
        return ended

    def close(self) -> None:
        """Wait for the hooks still running (the worker stopped), then store what waits."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._queue:  # an engine error stops the worker: keep the hooks' results that are waiting
            with contextlib.suppress(Exception):
                self._store()

    def _launch(self, ended: list[tuple[K, T]]) -> None:
        while self._ready:
            key, resumed = self._ready.popleft()
            if self._pool is None:
                try:
                    step = _resume(self._writings[key], resumed)
                except Exception as exc:
                    self._end(key, self.broken(key, exc), ended)
                    continue
                self._took(key, step, ended)
            else:
                self._running[self._pool.submit(_resume, self._writings[key], resumed)] = key

    def _took(self, key: K, step: Write | _Ended[T], ended: list[tuple[K, T]]) -> None:
        if isinstance(step, _Ended):
            self._end(key, step.value, ended)
        else:
            self._enqueue(key, step)

    def _end(self, key: K, value: T, ended: list[tuple[K, T]]) -> None:
        """The slot of ``key`` is free again."""
        del self._writings[key]
        self._alone.discard(key)
        ended.append((key, value))

    def _enqueue(self, key: K, write: Write) -> None:
        if not self._queue:
            self._queued_since = time.monotonic()
        self._queue.append((key, write))

    def _group_due(self) -> bool:
        return (
            not self.grouped
            or bool(self._alone)
            or not self._running
            or len(self._queue) >= self.group
            or time.monotonic() >= self._queued_since + self.window
        )

    def _store(self) -> None:
        """Store the waiting transitions: together (shared hook marks) when grouped, else each
        in its own commit; each pipeline is then ready to go on."""
        queue, self._queue = self._queue, []
        if self.grouped and not self._alone:
            try:
                stored: list[Exception | None] = list(self.store.commit_many([_shared(write) for _, write in queue]))
            except Exception as exc:  # the store is down: each pipeline is told, as of a refused write
                stored = [exc] * len(queue)
        else:
            stored = [self._commit_one(write) for _, write in queue]
        self._ready.extend((key, outcome) for (key, _), outcome in zip(queue, stored, strict=True))

    def _commit_one(self, write: Write) -> Exception | None:
        try:
            self.store.commit_write(write)
        except Exception as exc:
            return exc
        return None
