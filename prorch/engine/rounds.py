"""Storing the runner's transitions: one commit each (``write_each``), or several pipelines'
transitions per commit (``write_in_rounds``, group commit).

A commit costs a sync of the store's log (SQLite's WAL, PostgreSQL's WAL) whatever it holds, so
a worker advancing many pipelines pays most of its time in commits of one small transition each.
In rounds, each active pipeline runs until its next transition, and the round's transitions are
stored in one transaction, each all-or-nothing on its own (``Store.commit_many``). A pipeline's
next hook starts only after its transition committed, so what a hook sees, and what the others
see of it, is always stored. A worker that dies loses at most its round's uncommitted
transitions: their hooks run again (at least once, as after any crash).

A crash in a round cannot be pinned on one pipeline: every pipeline of the round had a hook
marked running. So a round's marks are stored as shared (``hook_shared``), and a shared mark
charges no crash. The pipelines found with a mark (or with ``crashes`` > 0) run ``alone`` in the
next pass, one after another, one commit per transition, each hook marked on its own: a hook
that kills the worker again is charged to its own pipeline, and only that one reaches
quarantine. Their first writes that mark no hook (crash charges) are stored together first, so
that a crash while one of them runs cannot charge another twice."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Collection, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic

from prorch.engine.state import T, Writing
from prorch.engine.transitions import share_hook_mark
from prorch.model.records import PipelineRecord
from prorch.storage.store import Store, Write


def write_each(store: Store, writing: Writing[T], resumed: Exception | None = None) -> T:
    """Drive ``writing`` to its end, storing each transition in a commit of its own. ``resumed``
    is what to resume it with first: None (stored, or not started), or the error of its last
    write."""
    while True:
        try:
            write = writing.send(None) if resumed is None else writing.throw(resumed)
        except StopIteration as done:
            result: T = done.value
            return result
        try:
            store.commit_write(write)
        except Exception as exc:
            resumed = exc
        else:
            resumed = None


@dataclass(slots=True)
class _Ended(Generic[T]):
    value: T


def _resume(writing: Writing[T], resumed: Exception | None) -> Write | _Ended[T]:
    """Run ``writing`` to its next transition (or its end)."""
    try:
        return writing.send(None) if resumed is None else writing.throw(resumed)
    except StopIteration as done:
        return _Ended(done.value)


def write_in_rounds(
    store: Store,
    writings: Sequence[Writing[T]],
    *,
    group: int,
    concurrency: int = 1,
    alone: Collection[int] = (),
) -> list[T]:
    """Drive every one of ``writings`` to its end, storing up to ``group`` transitions per
    commit; returns their results in order. With ``concurrency`` > 1 the pipelines run in a
    thread pool (hooks of several at once) and this thread stores the rounds. The ``alone``
    ones (indexes) run first, one after another, after their first writes are stored together."""
    results: dict[int, T] = {}
    if alone:
        _alone(store, writings, alone, results)
    rest: deque[tuple[int, Exception | None]] = deque(
        (index, None) for index in range(len(writings)) if index not in results
    )
    _rounds(store, writings, rest, results, group=group, concurrency=concurrency)
    return [results[index] for index in range(len(writings))]


def _alone(store: Store, writings: Sequence[Writing[T]], alone: Collection[int], results: dict[int, T]) -> None:
    """Run the ``alone`` pipelines one after another, one commit per transition. Their first
    writes that mark no hook running (crash charges) are stored first, together, so that a
    crash while one of them runs cannot charge the others again; a first write that marks a
    hook running is held until its pipeline's turn."""
    first: dict[int, Write] = {}
    for index in alone:
        step = _resume(writings[index], None)
        if isinstance(step, _Ended):
            results[index] = step.value
        else:
            first[index] = step
    unmarked = [index for index, write in first.items() if not _marks_a_hook(write)]
    stored = dict(zip(unmarked, store.commit_many([first[index] for index in unmarked]), strict=True))
    for index, write in first.items():
        outcome = stored[index] if index in stored else store.commit_many([write])[0]
        results[index] = write_each(store, writings[index], outcome)


def _shared(write: Write) -> Write:
    """The write as part of a round: its hook mark, if any, is shared (that one field of the
    write made again: comparing every field of every record again cost 5% of a transition)."""
    for change in write.changes:
        if isinstance(change.record, PipelineRecord) and share_hook_mark(change.record):
            write = write.refreshed(change.record, "hook_shared")
    return write


def _marks_a_hook(write: Write) -> bool:
    return any(isinstance(c.record, PipelineRecord) and c.record.hook_started_at is not None for c in write.changes)


def _rounds(
    store: Store,
    writings: Sequence[Writing[T]],
    ready: deque[tuple[int, Exception | None]],
    results: dict[int, T],
    *,
    group: int,
    concurrency: int,
) -> None:
    """Resume the ready pipelines (up to ``concurrency`` at once, in a pool when more than one)
    and store their transitions in groups: a group is stored once it holds ``group`` writes,
    or as soon as no pipeline is left ready to run (never waiting on a slow hook)."""
    queue: list[tuple[int, Write]] = []
    running: dict[Future[Write | _Ended[T]], int] = {}

    def took(index: int, step: Write | _Ended[T]) -> None:
        if isinstance(step, _Ended):
            results[index] = step.value
        else:
            queue.append((index, step))

    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="prorch") if concurrency > 1 else None
    try:
        while ready or running or queue:
            while ready and len(running) < concurrency and len(queue) + len(running) < group:
                index, resumed = ready.popleft()
                if pool is None:
                    took(index, _resume(writings[index], resumed))
                else:
                    running[pool.submit(_resume, writings[index], resumed)] = index
            if running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    took(running.pop(future), future.result())
            if queue and (not ready or len(queue) + len(running) >= group):
                stored = store.commit_many([_shared(write) for _, write in queue])
                ready.extend((index, outcome) for (index, _), outcome in zip(queue, stored, strict=True))
                queue.clear()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if queue:  # an engine error ends the pass: keep the hooks' results that are waiting
            with contextlib.suppress(Exception):
                store.commit_many([_shared(write) for _, write in queue])
