"""Committing writes record by record: the strategy of every backend whose repositories write
one record per call (memory, TinyDB, SQLite's fast path, a user's repository). A backend with a
better way (PostgreSQL's one statement per transition) offers it through ``one_statement``.

A ``Write`` is a value: each changed record comes with the revision it was read with and the
fields to write. Nothing here touches a record; the caller applies a stored write
(``Write.committed``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from prorch.model.exceptions import ConcurrentUpdateError, ProrchError, RepositoryError
from prorch.model.records import JSONDict, MessageRecord, PipelineRecord, Record, StepRecord
from prorch.model.secrets import error_summary
from prorch.storage.backend import Change, Outcome, Write
from prorch.storage.repository import TransitionRows
from prorch.storage.wakeups import makes_work

T = TypeVar("T")
SAVE_CHUNK = 1000
"""Records per ``save_many`` call: a ``create_many`` of 100,000 pipelines does not hold every row at once."""


class Committer:
    """``insert`` and ``commit`` of the backend contract over per-record hooks."""

    has_transactions: bool = True
    partial_update: bool = True

    # --- what a backend provides ---------------------------------------------------------------

    def transaction(self) -> contextlib.AbstractContextManager[None]:  # pragma: no cover - overridden
        return contextlib.nullcontext()

    def write_record(self, record: PipelineRecord | StepRecord, expected: int, data: JSONDict) -> None:
        """Write a changed record by compare-and-set on ``expected``; raise ``conflict`` when refused."""
        raise NotImplementedError

    def update_message(self, message: MessageRecord) -> None:
        raise NotImplementedError

    def save(self, records: Sequence[Record]) -> None:
        """Insert new records in order."""
        raise NotImplementedError

    def one_statement(self, writes: Sequence[Write]) -> list[Outcome] | None:
        """Commit the writes by the backend's own strategy, or None to go record by record."""
        return None

    def work_arrived(self) -> None:
        """Called inside the transaction of writes that make a pipeline due (``makes_work``):
        where a store tells other processes in the transaction itself (PostgreSQL's NOTIFY)."""

    def work_stored(self) -> None:
        """Called once those writes are stored: wake this process's idle workers."""

    # --- the contract --------------------------------------------------------------------------

    def insert(self, records: Sequence[Record]) -> None:
        work = makes_work(records)
        with self.transaction():
            self.save(records)
            if work:
                self.work_arrived()
        if work:
            self.work_stored()

    def commit(self, writes: Sequence[Write]) -> list[Outcome]:
        """Several writes in one transaction (group commit), each all-or-nothing. Each write's
        pipeline goes first, by compare-and-set: a refused one has written nothing and is left
        out. Should anything else fail, or the commit itself, the group is rolled back and each
        write is stored on its own instead: slower, and as exact."""
        found = self.one_statement(writes)
        if found is not None:
            return found
        if not self.has_transactions or len(writes) == 1:
            return [self._try_alone(write) for write in writes]
        outcomes: list[Outcome] = []
        work = makes_work(change.record for write in writes for change in write.changes)
        try:
            with self.transaction():
                for write in writes:
                    try:
                        self._write_unit(write, pipeline_first=True)
                    except _Refused as refused:
                        outcomes.append(refused.error)
                    else:
                        outcomes.append(None)
                if work:
                    self.work_arrived()
        except Exception:  # nothing of the group was stored
            return [self._try_alone(write) for write in writes]
        if work:
            self.work_stored()
        return outcomes

    def commit_alone(self, write: Write) -> None:
        """One write in its own transaction; raises what kept it out."""
        work = makes_work(change.record for change in write.changes)
        with self.transaction():
            self._write_unit(write)
            if work:
                self.work_arrived()
        if work:
            self.work_stored()

    def _try_alone(self, write: Write) -> Outcome:
        try:
            self.commit_alone(write)
        except Exception as exc:
            return exc
        return None

    def _write_unit(self, write: Write, *, pipeline_first: bool = False) -> None:
        """The statements of one write. Steps go first (without a transaction, a crash in
        between leaves them, the source of truth, ahead); inside a group, the pipeline goes
        first, so that a refused compare-and-set is found before anything is written."""
        pipelines = [change for change in write.changes if isinstance(change.record, PipelineRecord)]
        if pipeline_first and pipelines:
            try:
                self._write(pipelines[0])
            except ConcurrentUpdateError as exc:
                raise _Refused(exc) from exc
            pipelines = pipelines[1:]
        for change in write.changes:
            if not isinstance(change.record, PipelineRecord):
                self._write(change)
        for message in write.touched:
            self.update_message(message)
        self.save(write.added)
        for change in pipelines:
            self._write(change)

    def _write(self, change: Change) -> None:
        data = change.fields if self.partial_update else change.whole()
        self.write_record(change.record, change.expected, data)


class _Refused(Exception):
    """A write of a group was refused before any of its statements ran."""

    def __init__(self, error: ConcurrentUpdateError) -> None:
        super().__init__(str(error))
        self.error = error


def transition_rows(write: Write, partial: bool) -> TransitionRows:
    """A write of one pipeline as rows, for a backend that writes a transition in one statement."""
    pipeline: tuple[str, str, int, JSONDict] | None = None
    steps = []
    for change in write.changes:
        record = change.record
        row = (record.MODEL, record.uuid, change.expected, change.fields if partial else change.whole())
        if isinstance(record, PipelineRecord):
            pipeline = row
        else:
            steps.append(row)
    assert pipeline is not None
    return TransitionRows(
        pipeline=pipeline,
        steps=steps,
        updates=[(message.MODEL, message.uuid, message.to_dict()) for message in write.touched],
        added=[(record.MODEL, record.to_dict()) for record in write.added],
    )


def one_pipeline(write: Write) -> bool:
    """A write of exactly one pipeline (with its steps): what a one-statement transition is."""
    return sum(isinstance(change.record, PipelineRecord) for change in write.changes) == 1


def conflict_of(write: Write) -> ConcurrentUpdateError:
    change = next(c for c in write.changes if isinstance(c.record, PipelineRecord))
    return conflict(change.record.MODEL, change.record.uuid, change.expected)


def chunks(records: Sequence[Record]) -> Iterator[tuple[str, Sequence[Record]]]:
    """Consecutive records of one model, at most ``SAVE_CHUNK`` at a time (bounded memory)."""
    index = 0
    while index < len(records):
        model = records[index].MODEL
        end = index
        while end < len(records) and model == records[end].MODEL:
            end += 1
        for start in range(index, end, SAVE_CHUNK):
            yield model, records[start : min(end, start + SAVE_CHUNK)]
        index = end


def by_statements(
    committer: Committer, writes: Sequence[Write], write_transitions: Callable[[list[TransitionRows]], list[bool]]
) -> list[Outcome] | None:
    """``commit`` on a store that writes a transition in one statement (``write_transitions``):
    a round's statements in one round trip. None when a write is not one pipeline's. Should
    the round fail, each write is tried on its own."""
    if not all(one_pipeline(write) for write in writes):
        return None
    if len(writes) > 1:
        try:
            return _statements(committer, writes, write_transitions)
        except Exception:
            pass
    return [_statement_alone(committer, write, write_transitions) for write in writes]


def _statement_alone(
    committer: Committer, write: Write, write_transitions: Callable[[list[TransitionRows]], list[bool]]
) -> Outcome:
    try:
        return _statements(committer, [write], write_transitions)[0]
    except Exception as exc:
        return exc


def _statements(
    committer: Committer, writes: Sequence[Write], write_transitions: Callable[[list[TransitionRows]], list[bool]]
) -> list[Outcome]:
    """A refused pipeline wrote nothing (each statement is conditioned on its compare-and-set);
    anything else rolls the whole call back."""
    work = makes_work(change.record for write in writes for change in write.changes)
    with committer.transaction():
        units = [transition_rows(write, committer.partial_update) for write in writes]
        written = call("write transitions", write_transitions, units)
        work = work and any(written)
        if work:
            committer.work_arrived()
    if work:
        committer.work_stored()
    return [None if stored else conflict_of(write) for write, stored in zip(writes, written, strict=True)]


def call(action: str, func: Callable[..., T], *args: Any) -> T:
    """Run one store call, wrapping a driver's exception in RepositoryError."""
    try:
        return func(*args)
    except ProrchError:
        raise
    except Exception as exc:
        raise RepositoryError(f"repository failed to {action}: {type(exc).__name__}: {error_summary(exc)}") from exc


def conflict(model: str, uuid: str, expected: int) -> ConcurrentUpdateError:
    """The error of a refused compare-and-set."""
    return ConcurrentUpdateError(
        f"{model} {uuid} changed since it was read (revision {expected}); "
        "another orchestrator holds it or it was cancelled",
        uuid=uuid,
    )
