"""The backend contract: what the engine asks of a store, one method per verb (claim, commit,
read, query, delete, wait), as Oban's ``Engine`` behaviour and huey's ``BaseStorage``.

Records travel as JSON-compatible dicts (rows); ``prorch.storage.store.Store`` turns them into typed
records. Each shipped backend implements this contract (``repositories``: memory, SQLite,
PostgreSQL, TinyDB, on ``prorch.storage.composed.RepositoryBackend``) and picks its own commit
strategy inside. A user's four-method ``IRepository`` is wrapped once in
``prorch.storage.seed_adapter.SeedAdapter``, which holds the fallbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from prorch.model.due import ClaimRequest, Runnable
from prorch.model.exceptions import RepositoryError
from prorch.model.records import (
    JSONDict,
    MessageRecord,
    PipelineRecord,
    Record,
    Snapshot,
    StepRecord,
    changes,
    changes_again,
    snapshot,
)
from prorch.storage.repository import PipelineQuery, PipelineStats, VersionGroup

Snapshots = dict[str, Snapshot]
"""What the store holds of the records one writer has read, by uuid: a write sends only the
fields that differ. The writer keeps it (``Run.stored``); a committed write updates it."""


@dataclass(frozen=True, slots=True)
class Change:
    """One changed record of a write, stored by compare-and-set on ``expected``."""

    record: PipelineRecord | StepRecord
    expected: int
    """The revision the record was read with: the write is refused unless the store holds it."""
    fields: JSONDict
    """What to write, ``revision`` (``expected + 1``) included: the fields that changed, or every
    field when ``partial`` is False."""
    partial: bool
    stored: Snapshot | None
    """What the store holds of the record once this is committed (None: not tracked)."""

    def whole(self) -> JSONDict:
        """Every field, for a store that cannot write some of them only."""
        if not self.partial:
            return self.fields
        data = self.record.to_dict()
        data["revision"] = self.expected + 1
        return data


@dataclass(frozen=True, slots=True)
class Write:
    """One transition to store: the changed pipeline and steps (each by compare-and-set on the
    revision it was read with), the new records (events) and the consumed messages. A value:
    building it touches no record, and neither does a backend's ``commit``; ``committed``
    applies it once stored (new revisions, and the writer's snapshots)."""

    changes: tuple[Change, ...]
    added: tuple[Record, ...] = ()
    touched: tuple[MessageRecord, ...] = ()
    token: str | None = None
    """The lease token of the writer (None: no lease): the compare-and-set on the pipeline's
    revision is what refuses a lost lease's write; the token says whose write it was."""
    snapshots: Snapshots | None = None

    @classmethod
    def of(
        cls,
        changed: Sequence[PipelineRecord | StepRecord],
        added: Sequence[Record] = (),
        touched: Sequence[MessageRecord] = (),
        *,
        snapshots: Snapshots | None = None,
        token: str | None = None,
    ) -> Write:
        """The write of ``changed`` as they are now: the fields that differ from ``snapshots``
        (every field of a record it does not hold, or with no snapshots). One loop, no helper:
        this runs on every transition."""
        made = []
        for record in changed:
            expected = record.revision
            stored = snapshots.get(record.uuid) if snapshots is not None else None
            if stored is not None:
                fields, after = changes(record, stored, expected + 1)
                made.append(Change(record, expected, fields, True, after))
                continue
            data = record.to_dict()
            data["revision"] = expected + 1
            whole = snapshot(record, expected + 1) if snapshots is not None else None
            made.append(Change(record, expected, data, False, whole))
        return cls(tuple(made), tuple(added), tuple(touched), token, snapshots)

    @property
    def changed(self) -> list[PipelineRecord | StepRecord]:
        return [change.record for change in self.changes]

    def again(self) -> Write:
        """The write rebuilt from its records as they are now (changed since it was built)."""
        return Write.of(self.changed, self.added, self.touched, snapshots=self.snapshots, token=self.token)

    def refreshed(self, record: PipelineRecord | StepRecord, name: str) -> Write:
        """The write once the plain field ``name`` of ``record`` (one of its changed records)
        was set again: ``again()``'s result, with that one field looked at."""
        made = []
        for change in self.changes:
            if change.record is record:
                stored = self.snapshots.get(record.uuid) if change.partial and self.snapshots is not None else None
                fields, after = changes_again(record, name, stored, change.fields, change.stored)
                change = Change(record, change.expected, fields, change.partial, after)
            made.append(change)
        return Write(tuple(made), self.added, self.touched, self.token, self.snapshots)

    def committed(self) -> None:
        """The write was stored: its records now hold their new revisions, and the writer's
        snapshots what was written."""
        for change in self.changes:
            change.record.revision = change.expected + 1
            if self.snapshots is not None and change.stored is not None:
                self.snapshots[change.record.uuid] = change.stored


Outcome = Exception | None
"""Per write of a ``commit``: None when it was stored, else the error that kept it out."""


@runtime_checkable
class Backend(Protocol):
    """A store at the engine's verbs. Raise any exception on a storage failure (the facade wraps
    it in ``RepositoryError``); ``ConcurrentUpdateError`` and ``DuplicateRecordError`` pass as they are.
    Optional: ``commits_at_once`` (an int, 1 without it; see ``RepositoryBackend``)."""

    thread_safe: bool
    """True when several threads may call it at once (a pass then runs hooks in a pool)."""
    can_claim: bool
    """True when ``claim`` leases what it returns (leases can then be renewed)."""
    guards_concurrency: bool
    """True when claims are atomic and writes compare-and-set: several workers may share it."""
    has_transactions: bool
    """True when ``transaction()`` makes the writes of its block all-or-nothing."""
    partial_update: bool
    """True when a changed record may be written as its changed fields only (plus ``revision``)."""

    # --- reading -------------------------------------------------------------------------------

    def get(self, model: str, uuid: str) -> JSONDict | None:
        """The record of ``model`` whose uuid matches, or None."""
        ...

    def search(self, model: str, field: str, value: object) -> list[JSONDict]:
        """The records of ``model`` whose ``field`` equals ``value`` (events by ``seq``)."""
        ...

    def search_many(self, model: str, field: str, values: list[object]) -> list[JSONDict] | None:
        """``search`` for several values in one query; None where the store cannot (the caller
        then searches one value at a time)."""
        ...

    def due(self, now: datetime, limit: int, runnable: Runnable | None) -> list[JSONDict]:
        """Pending pipelines with ``next_run_at`` null or <= now and no live lease, of the
        ``runnable`` (name, version) classes when given, in claim order; at most ``limit``."""
        ...

    def query_pipelines(self, query: PipelineQuery) -> tuple[list[JSONDict], int | None]:
        """A page of pipelines, newest first, and the total when ``query.count``."""
        ...

    def pipeline_stats(self, now: datetime, ended_since: datetime) -> PipelineStats:
        """The dashboard overview's counts."""
        ...

    def version_groups(self) -> list[VersionGroup]:
        """Pipelines counted by (name, version, recorded patches, ended or not), with the oldest
        ``created_at`` of each group (``prorch versions``)."""
        ...

    def ended_before(self, statuses: list[str], before: datetime, limit: int) -> list[str]:
        """Up to ``limit`` uuids of pipelines with one of ``statuses``, ``updated_at`` before
        ``before`` and no stored parent (retention)."""
        ...

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[JSONDict]:
        """Up to ``limit`` unread messages ``name`` of the pipeline, oldest first by (sent_at,
        uuid), after ``after`` when given."""
        ...

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        """Whether a message of any name waits unread for the pipeline."""
        ...

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        """The newest ``sent_at`` of the pipeline's messages (or later, never earlier)."""
        ...

    def schedule_ticks(self) -> dict[str, datetime]:
        """Every schedule's last created tick, by schedule name."""
        ...

    def server_time(self) -> datetime | None:
        """The server's clock that every worker follows, or None (an embedded store)."""
        ...

    # --- claiming ------------------------------------------------------------------------------

    def claim(self, request: ClaimRequest) -> list[JSONDict]:
        """Lease up to ``request.limit`` due pipelines (as ``due``, of ``request.runnable``) within
        ``request.limits`` (``prorch.model.limit_rules``: counted and stored atomically with the
        claim), setting ``lease_owner``, ``lease_expires_at``, ``claims + 1`` and ``revision + 1``;
        return them as now stored."""
        ...

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        """Lease one pipeline whatever its ``next_run_at`` unless another owner holds a live
        lease (None then, or when missing); an ended pipeline is returned unleased."""
        ...

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        """Move the lease's expiry if ``owner`` still holds it; False when it was lost. (A
        worker's keeper renews all its leases at once, by ``BatchRenewal`` where the backend
        has it.)"""
        ...

    # --- writing -------------------------------------------------------------------------------

    def insert(self, records: Sequence[Record]) -> None:
        """Store new records (a pipeline, its steps, its first event) all-or-nothing where the
        store has transactions; a uuid stored already raises ``DuplicateRecordError``."""
        ...

    def commit(self, writes: Sequence[Write]) -> list[Outcome]:
        """Store each write all-or-nothing (several in one transaction where the store can: group
        commit) and return each one's outcome. A refused compare-and-set is that write's
        ``ConcurrentUpdateError`` and stores nothing of it; the other writes go on. Touch no
        record: the caller applies each stored write (``Write.committed``)."""
        ...

    def advance_schedule(self, name: str, tick: datetime) -> bool:
        """Store ``tick`` as the schedule's last tick unless it or a later one is stored (False:
        another worker created it). Atomic inside ``transaction()``."""
        ...

    def delete_pipelines(self, uuids: list[str], statuses: list[str], before: datetime) -> int:
        """Delete those of ``uuids`` that retention may still take (checked again: ended with one
        of ``statuses``, ``updated_at`` before ``before``, no stored parent) with their steps,
        events and messages; how many pipelines went."""
        ...

    def check_deletable(self) -> None:
        """Raise ``ConfigurationError`` naming what is missing when this store cannot delete."""
        ...

    def transaction(self) -> AbstractContextManager[None]:
        """The block's writes commit together (nested blocks join the outer one); a plain block
        where the store has no transactions."""
        ...

    def session(self) -> AbstractContextManager[None]:
        """Hold this thread's connections for a block of work, where the store has any."""
        ...

    def lock_key(self, key: str) -> None:
        """Inside ``transaction()``: other transactions locking ``key`` wait until this one ends,
        so that a create by key (look up, then insert or update) runs one at a time per key in
        every process. Nothing to do where a transaction already holds the store's only write
        lock (SQLite, TinyDB, memory); an advisory lock on the key's bucket on PostgreSQL (a
        bounded number: a batch of any size holds at most ``KEY_LOCK_BUCKETS``)."""
        ...

    def lock_keys(self, keys: Sequence[str]) -> None:
        """``lock_key`` for each of ``keys``, in one order every caller shares (two batches
        with keys in common cannot deadlock), in one statement where the store needs any."""
        ...

    def while_leased(self, pipeline_uuid: str, token: str | None) -> AbstractContextManager[None]:
        """A transaction whose block runs only while lease ``token`` holds the pipeline (None:
        while the pipeline is stored, whoever leases it), else ``LeaseLostError`` and nothing
        runs; no claim or purge changes the pipeline before the block commits (a shared row
        lock, or the store's only write lock). What a hook stores ahead of its transition
        (``emit(now=True)``, live ``progress()``) is written in it, and a rerun's records."""
        ...

    # --- waiting -------------------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> bool:
        """Return as soon as work may have arrived (True), or after ``timeout`` seconds (False,
        unless work turned up in the last check). A spurious True costs one empty pass; a
        missed wake-up costs at most the caller's poll interval, which stays the safety net.
        PostgreSQL listens for a NOTIFY; SQLite and TinyDB wake at once on a write of this
        process and check for other processes' writes once per call; memory wakes on its
        writes; a user's repository sleeps (``prorch.storage.wakeups``)."""
        ...

    def next_due_at(self, now: datetime) -> datetime | None:
        """The earliest ``next_run_at`` after ``now`` of a pending pipeline that no live lease
        holds (a timer: a ``wait``, a retry's backoff), or None: an idle worker waits until
        then at most."""
        ...

    def rate_starts(self, name: str, since: datetime) -> int:
        """How many claims of the rate-limited class ``name`` the store holds after ``since``
        (what its ``rate_limit`` counted; 0 where the store keeps none)."""
        ...

    # --- streams (prorch.model.streams) ---------------------------------------------------------

    def stream_entries(self, pipeline_uuid: str, after: int, limit: int) -> list[JSONDict]:
        """The pipeline's stream entries (``StreamRecord`` rows) whose ``seq`` is above
        ``after``, in ``seq`` order, at most ``limit``. Entries are inserted as ``added``
        records of a transition's ``Write``, all or nothing with it."""
        ...

    def last_stream_seq(self, pipeline_uuid: str) -> int:
        """The ``seq`` of the pipeline's last stored stream entry; 0 when it has none."""
        ...

    # --- pauses (prorch.model.pauses) ----------------------------------------------------------

    def pauses(self) -> list[JSONDict]:
        """Every stored pause (``Pause.to_dict`` rows), in no particular order. ``claim`` and
        ``due`` leave out the pipelines any of them holds (``Paused.holds_row``)."""
        ...

    def add_pause(self, row: JSONDict) -> bool:
        """Store a pause row unless a pause of its ``scope`` is stored already (False then)."""
        ...

    def remove_pause(self, scope: str) -> JSONDict | None:
        """Remove the pause of ``scope`` and return its row (None: none was stored); its work is
        due again at once, so idle workers are woken as by a create."""
        ...

    # --- workers -------------------------------------------------------------------------------

    def upsert_worker(self, row: JSONDict) -> None:
        """Store a worker's row (``prorch.model.workers.WorkerRow.to_dict``: times as ISO text),
        replacing the stored row of its ``id``: its heartbeat."""
        ...

    def delete_worker(self, worker_id: str) -> None:
        """Remove a worker's row (its clean stop); a missing one is no error."""
        ...

    def workers(self) -> list[JSONDict]:
        """Every stored worker row, live or stale, in no particular order."""
        ...


Lease = tuple[str, str]
"""A lease as its holder knows it: (pipeline uuid, owner token)."""


@runtime_checkable
class BatchRenewal(Protocol):
    """Optional, beside ``Backend``: renewing many leases in one write. A worker's lease keeper
    renews every lease it holds each third of the lease length; one write per lease (one whole
    rewrite of a TinyDB file, one fsync of a SQL transaction) falls behind under load. Every
    shipped backend has it (``RepositoryBackend``); a backend without it (``batch_renewal``
    False, or no such method) gets one ``renew_lease`` per lease."""

    batch_renewal: bool
    """True when ``renew_leases`` renews its batch in one write."""

    def renew_leases(self, leases: Sequence[Lease], lease_expires_at: datetime) -> set[str]:
        """Move the expiry of each lease whose owner token still holds its pipeline (a
        compare-and-set on the token, as ``renew_lease``), in one statement, transaction or
        write of the store; the uuids of those renewed (the others were lost, or are not
        stored). On a failure it raises: the keeper counts none of them renewed, and tries
        again at its next turn. Leases it could neither renew nor find lost in time (their
        rows held by another transaction past a lock timeout) it reports by raising
        ``RenewalsPending``, with the uuids it did renew."""
        ...


class RenewalsPending(RepositoryError):
    """``renew_leases`` renewed ``renewed`` but could not decide ``pending`` in time (their rows
    held by other transactions): those are neither renewed nor lost, and the keeper tries them
    again at its next turn."""

    def __init__(self, message: str, renewed: set[str], pending: set[str]) -> None:
        super().__init__(message)
        self.renewed = renewed
        self.pending = pending
