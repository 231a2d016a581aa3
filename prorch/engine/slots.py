"""``Slots``: a continuous driver of the runner's writings, for a worker that refills a hook
slot as soon as one frees.

``write_in_rounds`` drives a fixed list of writings to their ends (one pass). A worker instead
keeps pipelines in progress and takes a new one (``start``) whenever a **hook slot** frees,
while the others go on: a slow hook holds its own slot, never the others'. A slot is held while
a pipeline's hook runs (from its resume to its next transition); once the hook returned, its
transition waits for the group commit without a slot, and the pipeline takes a slot again for
its next hook once that transition is stored (a pipeline between two hooks goes before a new
one). So up to ``concurrency`` hooks run, and up to ``group`` more pipelines wait between two
hooks (their transition waiting for its commit, or stored and waiting for a slot).

Group commit as in a pass: the waiting transitions are stored in one transaction, each
all-or-nothing on its own, with shared hook marks as in rounds (see ``prorch.engine.rounds``),
once ``group`` are waiting, or once nothing more can start (no slot free, or nothing to start
in one: ``step``'s ``more``) and, while hooks are ``quick``, either no hook is running or none
returned within ``window`` seconds; while they are slow, at once. With hook threads, a commit
thread stores the group while the loop goes on: one group at a time while hooks are quick (the
next fills meanwhile), up to the store's ``commits_at_once`` while they are slow (PostgreSQL:
2, whose fsyncs overlap; a returned hook's transition then waits for no other group's). A
pipeline started ``alone`` (a crash suspect) runs only while no other does, one commit per
transition, each hook marked on its own.

Runs: while hooks are quick, a free thread is handed its share of the ready writings at once
(``_Run``), one hand-off for them all; a hook of a run that takes ``window`` or longer makes
the loop take back the rest of the run, so a slow hook holds one slot only."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from prorch.engine.rounds import _Ended, _marks_a_hook, _resume, _shared
from prorch.engine.state import T, Writing
from prorch.storage.store import Store, Write

K = TypeVar("K", bound=Hashable)

LEND_SECONDS = 0.25
"""A pipeline whose transition is being stored lends its hook slot to a spare pipeline only
while hooks are shorter than this (the recent ones, and the running ones so far): it then waits
for a slot about that long at most, never for a slow hook that started after it."""

SERIAL_SECONDS = 0.0005
"""Hooks that all return within this (about the engine's own CPU for a transition) gain nothing
from threads of their own: a free thread then takes every ready writing in one run, as a pass
resumes its pipelines in one thread. Measured on W1 through the worker (SQLite, instant hooks,
concurrency 4): four runs at once cost twice the pass's CPU a transition in GIL hand-offs."""


class Slots(Generic[K, T]):
    """Writings in progress, keyed by ``K``: up to ``concurrency`` running a hook, up to ``group``
    more between two hooks; ``step`` drives them and returns those that ended. With
    ``concurrency`` 1 (a store that is not thread-safe) the writings run in the calling thread.
    A key is in progress once at most. A writing that raises (a bug: an advance catches its
    errors) ends with ``broken(key, error)``; the others go on."""

    def __init__(
        self,
        store: Store,
        *,
        concurrency: int,
        group: int,
        window: float,
        broken: Callable[[K, Exception], T],
        slowest: Callable[[], float] = lambda: float("inf"),
        spare: int = 0,
    ) -> None:
        self.store = store
        self.spare = spare
        self.broken = broken
        self.slowest = slowest
        self.concurrency = concurrency
        self.grouped = group > 1 and store.has_transaction
        self.group = group if self.grouped else 1
        self.window = window
        # a thread per pipeline in progress while hooks are slow: the hook slots', and the spares'
        # (a resume that runs no hook needs no slot, and must not queue behind the hooks)
        threads = concurrency + spare
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="prorch") if concurrency > 1 else None
        self._writings: dict[K, Writing[T]] = {}
        self._alone: set[K] = set()
        self._ready: deque[tuple[K, Exception | None]] = deque()
        self._ending: deque[tuple[K, Exception | None]] = deque()  # ready, and their resume runs no hook
        self._running: dict[Future[None], _Run[K, T]] = {}  # a pool thread's run, by its future
        self._hook_runs = 0  # the runs among them that may run a hook: those in a hook slot
        self._in_runs = 0  # writings handed to the running runs and not taken back yet
        self._done: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()  # the runs (and commits) that ended
        # with hook threads, a group is stored by a commit thread while the next one fills; while
        # hooks are slow, up to ``store.commits_at_once`` groups at once (their fsyncs overlap)
        self.commits = store.commits_at_once if self._pool else 1
        self._committer = ThreadPoolExecutor(self.commits, thread_name_prefix="prorch-commit") if self._pool else None
        # the groups in flight: their keys, and whether each one's write marked a hook
        self._committing: dict[Future[list[Exception | None]], list[tuple[K, bool]]] = {}
        self._queue: list[tuple[K, Write, bool]] = []  # the transitions waiting, each with whether it marks a hook
        self._marking = 0  # of those waiting or in a commit, the ones that mark their next hook
        self._others: set[Future[Any]] = set()  # the caller's work beside the slots (``wake_on``)

    @property
    def active(self) -> int:
        """Pipelines in progress: running a hook, or between two."""
        return len(self._writings)

    @property
    def free(self) -> int:
        """New pipelines that may start now: a hook slot free that no pipeline in progress waits
        for, and room between hooks (none while one runs alone)."""
        if self._alone:
            return 0
        if self._pool is None or self.quick:  # hooks run one after another (in ``step``, or in runs)
            return max(0, min(self.room - self.spare, self._unfilled) - len(self._ready))
        slots = self.concurrency - self._hook_runs - len(self._ready)
        if not self._lending:  # a pipeline whose transition is being stored keeps its slot
            slots -= self._going_on()
        return max(0, min(slots, self.room, self._unfilled))

    @property
    def _lending(self) -> bool:
        """A slot whose hook returned may take a spare while that hook's transition is stored
        (``LEND_SECONDS``): hooks are short, so the pipeline that goes on waits little for a slot."""
        if not self.spare or self.slowest() >= LEND_SECONDS:
            return False
        now = time.monotonic()
        return all(now - run.started < LEND_SECONDS for run in self._running.values() if run.hooks)

    def _going_on(self) -> int:
        """Pipelines whose transition waits for (or is in) its commit and marks their next hook:
        each takes a hook slot again once it is stored (counted as they come and go: ``free``
        is read several times a turn)."""
        return self._marking

    @property
    def room(self) -> int:
        """Pipelines that may still join those in progress: ``concurrency`` running a hook, plus
        ``spare`` (a worker's prefetch) and, while hooks are ``quick``, ``group`` between two
        hooks. Negative while more are in progress (hooks turned slow with a group between two
        hooks): a worker claims nothing until they are fewer."""
        return self.concurrency + self.spare + (self.group if self.quick else 0) - len(self._writings)

    @property
    def _unfilled(self) -> int:
        """Transitions the group waiting for its commit may still take, counting the running
        hooks' (as a pass's rounds do): none once full, until it is stored."""
        return self.group - len(self._queue) - self._in_runs if self.grouped else self.concurrency

    @property
    def quick(self) -> bool:
        """Grouping, and hooks return within ``window``: the recent ones did (``slowest``: the
        hook caller's ``recent_slowest``), and none running has run longer. Then a group fills
        about as fast as pipelines start, and pipelines may wait between two hooks for it; with
        slower hooks (or none seen yet) no more pipelines are in progress than slots."""
        if not self.grouped or self.slowest() >= self.window:
            return False
        now = time.monotonic()
        return all(now - run.started < self.window for run in self._running.values())

    def start(
        self,
        key: K,
        writing: Writing[T],
        *,
        first: Write | None = None,
        resumed: Exception | None = None,
        alone: bool = False,
    ) -> None:
        """Take ``writing`` into progress. ``first``: its next write, already taken from it (to
        store before it is resumed); ``resumed``: what to resume it with first. A key in
        progress already is refused (``ValueError``): its two writings would interleave."""
        if key in self._writings:
            raise ValueError(f"{key!r} holds a slot already; it can take another once its writing ended")
        self._writings[key] = writing
        if alone:
            self._alone.add(key)
        if first is not None:
            self._enqueue(key, first)
        else:
            self._ready.append((key, resumed))

    def wake_on(self, future: Future[Any]) -> None:
        """``step`` returns as soon as ``future`` ends too (the caller's work beside the slots:
        a worker's claim in a thread of its own)."""
        self._others.add(future)
        future.add_done_callback(self._done.put)

    def step(self, timeout: float, *, more: bool = False) -> list[tuple[K, T]]:
        """Resume the writings that are ready (in free hook slots), wait up to ``timeout``
        seconds for a hook to reach its next transition, and store the waiting transitions when
        their group is due; returns the writings that ended, with their results. ``more``: the
        caller has pipelines to start as soon as a slot is free (the group waits for them)."""
        ended: list[tuple[K, T]] = []
        self._launch(ended)
        idle = False  # a wait of ``window`` saw no hook return
        if self._running or self._committing or self._others or self._ending:
            if self._startable(more):
                timeout = 0.0  # a slot is free for the caller's next pipeline: no wait
            elif self._queue:
                timeout = min(timeout, self.window)
            done = self._ended(min(timeout, self._overdue_in()))
            idle = not done
            for future in done:
                if future in self._committing:
                    self._stored(future)
                    continue
                if future in self._others:  # the caller reads its result
                    self._others.discard(future)
                    continue
                future.result()  # a run catches its writings' errors: what is raised here stops the worker
                run = self._running.pop(future)
                self._hook_runs -= run.hooks
                self._collect(run, ended, rest=True)
            self._take_back_overdue(ended)
        if self._queue and len(self._committing) < self._commits_now() and self._group_due(more, idle):
            self._store()
        return ended

    def close(self) -> None:
        """Wait for the hooks still running (the worker stopped), then store what waits."""
        for run in self._running.values():  # its writings not started stay so: only running hooks end
            with run.lock:
                run.todo.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        if self._queue:  # an engine error stops the worker: keep the hooks' results that are waiting
            with contextlib.suppress(Exception):
                self._store()

    def _launch(self, ended: list[tuple[K, T]]) -> None:
        """Resume ready writings: in the calling thread one after another, or in the pool's free
        hook slots; those whose resume runs no hook (``_ending``) in threads of their own."""
        while self._ending and self._unfilled > 0 and self._pool is not None:
            self._submit(_Run([self._with_writing(self._ending.popleft())], hooks=False))
        while self._ready and self._hook_runs < self.concurrency and self._unfilled > 0:
            if self._pool is None:
                key, resumed = self._ready.popleft()
                try:
                    step = _resume(self._writings[key], resumed)
                except Exception as exc:
                    self._end(key, self.broken(key, exc), ended)
                    continue
                self._took(key, step, ended)
                continue
            size = self._run_size()
            self._submit(_Run([self._with_writing(self._ready.popleft()) for _ in range(size)], hooks=True))

    def _with_writing(self, ready: tuple[K, Exception | None]) -> tuple[K, Writing[T], Exception | None]:
        key, resumed = ready
        return key, self._writings[key], resumed

    def _submit(self, run: _Run[K, T]) -> None:
        assert self._pool is not None
        self._in_runs += len(run.todo)
        self._hook_runs += run.hooks
        future = self._pool.submit(_drive, run, self.window)
        self._running[future] = run
        future.add_done_callback(self._done.put)

    def _run_size(self) -> int:
        """How many ready writings the next free thread takes: while hooks are quick, its
        share of those ready (one hand-off for them all, not one per transition), else one."""
        if self._alone or not self.quick:
            return 1
        if self.slowest() < SERIAL_SECONDS:  # no thread would wait on a hook: one takes them all
            return max(1, min(self._unfilled, len(self._ready)))
        threads = self.concurrency - self._hook_runs
        return max(1, min(self._unfilled, -(-len(self._ready) // threads)))

    def _collect(self, run: _Run[K, T], ended: list[tuple[K, T]], *, rest: bool) -> None:
        """Take what ``run`` resumed so far; ``rest``: and the writings it has not started,
        ready again for any free thread."""
        with run.lock:
            took, run.took = run.took, []
            left = list(run.todo) if rest else []
            if rest:
                run.todo.clear()
        self._in_runs -= len(took) + len(left)
        self._ready.extendleft((key, resumed) for key, _, resumed in reversed(left))
        for key, step in took:
            if isinstance(step, Exception):
                self._end(key, self.broken(key, step), ended)
            else:
                self._took(key, step, ended)

    def _overdue_in(self) -> float:
        """Seconds until a run's current hook has taken ``window`` with writings still after
        it in the run (``_take_back_overdue``), or a long while."""
        starts = [run.started for run in self._running.values() if run.todo]
        return max(0.0005, min(starts) + self.window - time.monotonic()) if starts else 3600.0

    def _take_back_overdue(self, ended: list[tuple[K, T]]) -> None:
        """A run whose current hook has taken ``window`` gives back what it has not started
        (and what it resumed so far): a slow hook holds its own slot only, and delays the
        rest of its run by about ``window``, not by itself."""
        now = time.monotonic()
        for run in list(self._running.values()):
            if run.todo and now - run.started >= self.window:
                self._collect(run, ended, rest=True)

    def _ended(self, timeout: float) -> list[Future[Any]]:
        """The runs (and the commit) that ended: waits up to ``timeout`` for the first (a queue the pool's
        threads put each into as it ends: cheaper than ``wait`` on every future)."""
        try:
            done = [self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                return done

    def _startable(self, more: bool) -> bool:
        """Something could start in a free hook slot now."""
        if self._hook_runs >= self.concurrency or self._unfilled <= 0:
            return False
        return bool(self._ready) or (more and self.free > 0)

    def _took(self, key: K, step: Write | _Ended[T], ended: list[tuple[K, T]]) -> None:
        if isinstance(step, _Ended):
            self._end(key, step.value, ended)
        else:
            self._enqueue(key, step)

    def _end(self, key: K, value: T, ended: list[tuple[K, T]]) -> None:
        """``key`` is no longer in progress."""
        del self._writings[key]
        self._alone.discard(key)
        ended.append((key, value))

    def _enqueue(self, key: K, write: Write) -> None:
        marks = _marks_a_hook(write)
        self._marking += marks
        self._queue.append((key, write, marks))

    def _group_due(self, more: bool, idle: bool) -> bool:
        """Store now: not grouping; or nothing more can join the group (it is full, or no slot
        is free for a pipeline to start) and either its running hooks are back, or none returned
        within ``window``, or hooks are slow (then the running ones, returning less than
        ``window`` apart, would hold each returned one's slot until the last of them is back)."""
        if not self.grouped or self._alone:
            return True
        if self._startable(more):
            return False
        return not self._running or idle or not self.quick

    def _store(self) -> None:
        """Store the waiting transitions: together (shared hook marks) when grouped, else each
        in its own commit; each pipeline is then ready to go on."""
        queue, self._queue = self._queue, []
        keys = [(key, marks) for key, _, marks in queue]
        if self.grouped and not self._alone:
            writes = [_shared(write) for _, write, _ in queue]
            if self._committer is not None:  # the loop goes on meanwhile: the next group fills
                committing = self._committer.submit(self._commit_many, writes)
                self._committing[committing] = keys
                committing.add_done_callback(self._done.put)
                return
            stored = self._commit_many(writes)
        else:
            stored = [self._commit_one(write) for _, write, _ in queue]
        self._go_on(keys, stored)

    def _stored(self, committing: Future[list[Exception | None]]) -> None:
        """A group a commit thread stored: each pipeline is ready to go on."""
        self._go_on(self._committing.pop(committing), committing.result())

    def _go_on(self, keys: list[tuple[K, bool]], stored: list[Exception | None]) -> None:
        """Each pipeline whose write was stored (or refused) is ready to go on: in a hook slot
        if that write marked a hook (its resume runs it), else without one (a hook runs only
        after a write that marks it is stored: such a resume ends, or writes again), so that a
        pipeline's end never waits for a slot that a spare pipeline took meanwhile. One that
        runs alone keeps the slot order; while hooks are quick, all go in runs (a free slot is
        near, and a run is one hand-off for many)."""
        apart = self._pool is not None and not self._alone and not self.quick
        for (key, marks), outcome in zip(keys, stored, strict=True):
            self._marking -= marks
            if marks or not apart:
                self._ready.append((key, outcome))
            else:
                self._ending.append((key, outcome))

    def _commits_now(self) -> int:
        """Groups that may be in flight: one while hooks are quick (the next group fills while
        one is stored: fewer, larger commits), up to ``commits`` while they are slow (each
        returned hook's transition is stored at once, and waits for no other group's fsync)."""
        return 1 if self.quick else self.commits

    def _commit_many(self, writes: list[Write]) -> list[Exception | None]:
        try:
            return list(self.store.commit_many(writes))
        except Exception as exc:  # the store is down: each pipeline is told, as of a refused write
            return [exc] * len(writes)

    def _commit_one(self, write: Write) -> Exception | None:
        try:
            self.store.commit_write(write)
        except Exception as exc:
            return exc
        return None


class _Run(Generic[K, T]):
    """Ready writings handed to one pool thread at once (``_drive``): resumed one after another
    until one's hook takes ``window`` or longer; the thread then stops, and the loop takes back
    what was not started (also while that hook still runs: ``Slots._take_back_overdue``)."""

    __slots__ = ("hooks", "lock", "started", "todo", "took")

    def __init__(self, todo: list[tuple[K, Writing[T], Exception | None]], *, hooks: bool = True) -> None:
        self.hooks = hooks  # in a hook slot; else its writings' resumes run no hook
        self.lock = threading.Lock()
        self.todo = deque(todo)
        self.took: list[tuple[K, Write | _Ended[T] | Exception]] = []
        self.started = time.monotonic()  # when the writing resumed now was resumed


def _drive(run: _Run[K, T], window: float) -> None:
    """A pool thread's run: resume its writings in turn, until one took ``window`` or longer."""
    while True:
        with run.lock:
            if not run.todo:
                return
            key, writing, resumed = run.todo.popleft()
            run.started = time.monotonic()
        try:
            step: Write | _Ended[T] | Exception = _resume(writing, resumed)
        except Exception as exc:  # an engine bug: ``broken``, the others go on
            step = exc
        with run.lock:
            run.took.append((key, step))
        if time.monotonic() - run.started >= window:
            return
