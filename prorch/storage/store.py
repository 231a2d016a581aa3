"""The engine's typed view of a backend: records in and out, validated, each call's failure one
``RepositoryError``. What a store can do and how it commits is the backend's business
(``prorch.storage``); this facade only loads and saves records."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from prorch.model.clock import Clock
from prorch.model.due import ClaimRequest, Runnable
from prorch.model.exceptions import ConfigurationError, PipelineNotFoundError, ProrchError
from prorch.model.limit_rules import ClaimLimit
from prorch.model.pauses import Pause, Paused
from prorch.model.records import (
    EventRecord,
    JSONDict,
    MessageRecord,
    PipelineRecord,
    Record,
    StepRecord,
    StreamRecord,
    snapshot,
)
from prorch.model.status import Status
from prorch.model.workers import WorkerRow
from prorch.storage import listing
from prorch.storage.backend import Backend, BatchRenewal, Lease, Outcome, RenewalsPending, Snapshots, Write
from prorch.storage.commits import SAVE_CHUNK, call
from prorch.storage.composed import RepositoryBackend
from prorch.storage.listing import PipelinePage
from prorch.storage.loading import load, steps_by_pipeline
from prorch.storage.repository import IRepository, PipelineQuery, PipelineStats, VersionGroup
from prorch.storage.seed_adapter import TICKS_UUID
from prorch.storage.server_clock import ServerClock
from prorch.storage.urls import backend_of, backends_package, resolve_backend

__all__ = [
    "MESSAGE_PAGE",
    "SAVE_CHUNK",
    "TICKS_UUID",
    "Snapshots",
    "Store",
    "Write",
    "backends_package",
    "resolve_backend",
    "store_for",
]

logger = logging.getLogger("prorch.storage.store")
RecordT = TypeVar("RecordT", bound=Record)
MESSAGE_PAGE = 500
"""Unread messages per read of ``unread_messages``: a hook draining a long queue reads it by pages."""
STREAM_PAGE = 500
"""Stream entries per read: a reader far behind catches up page by page."""
_warned_backends: set[int] = set()
_stores: weakref.WeakKeyDictionary[Any, Store] = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def store_for(repository: object) -> Store:
    """The ``Store`` of a repository (URL, backend or class), made once per backend:
    ``Pipeline.create`` runs on every web request."""
    backend = resolve_backend(repository)
    try:
        found = _stores.get(backend)
    except TypeError:  # not weak-referenceable: make one each time
        return Store(backend)
    if found is None:
        with _stores_lock:
            found = _stores.get(backend)
            if found is None:
                found = _stores[backend] = Store(backend)
    return found


class Store:
    """One backend, typed: what the engine, the API and the features call."""

    def __init__(self, repository: object) -> None:
        self.backend = resolve_backend(repository)
        self.engine: Backend = backend_of(self.backend)
        self.thread_safe = self.engine.thread_safe
        self.has_transaction = self.engine.has_transactions
        self.guards_concurrency = self.engine.guards_concurrency
        self.can_claim = self.engine.can_claim
        self.partial_update = self.engine.partial_update
        # optional on a backend of the user's (``RepositoryBackend.commits_at_once``): 1 without it
        self.commits_at_once: int = max(1, int(getattr(self.engine, "commits_at_once", 1)))
        self._clock = ServerClock(self.engine, self.backend)

    def repository(self, model: str) -> IRepository:
        """The repository of one model (tests look at it)."""
        if isinstance(self.engine, RepositoryBackend):
            return self.engine.table(model)  # type: ignore[return-value]
        return self.backend(model)

    pipelines = property(lambda self: self.repository(PipelineRecord.MODEL))
    steps = property(lambda self: self.repository(StepRecord.MODEL))
    events = property(lambda self: self.repository(EventRecord.MODEL))
    messages = property(lambda self: self.repository(MessageRecord.MODEL))

    def clock(self, clock: Clock | None = None) -> Clock:
        """The clock given; else the store's server clock where it has one (``ServerClock``)."""
        return self._clock.clock(clock)

    def warn_if_unguarded(self) -> None:
        """Say once per backend that a second orchestrator could run the same pipeline."""
        if self.guards_concurrency or id(self.backend) in _warned_backends:
            return
        _warned_backends.add(id(self.backend))
        logger.warning(
            "repository %s has no atomic claim / compare-and-set: run a single orchestrator "
            "process on it (prorch cannot guard against a second one)",
            getattr(self.backend, "__name__", type(self.backend).__name__),
        )

    # --- reading -------------------------------------------------------------------------------

    def get_pipeline(self, uuid: str) -> PipelineRecord | None:
        data = call("get a pipeline", self.engine.get, PipelineRecord.MODEL, uuid)
        return load(PipelineRecord, data) if data else None

    def get_pipelines(self, uuids: Sequence[str]) -> dict[str, PipelineRecord]:
        """``get_pipeline`` of several uuids (a keyed ``create_many``), by uuid, the ones stored:
        in one query per chunk of uuids where the store can, else uuid by uuid."""
        rows = None
        if len(uuids) > 1:
            rows = call("search pipeline records", self.engine.search_many, PipelineRecord.MODEL, "uuid", list(uuids))
        if rows is None:
            found = ((uuid, self.get_pipeline(uuid)) for uuid in uuids)
            return {uuid: record for uuid, record in found if record is not None}
        return {record.uuid: record for record in (load(PipelineRecord, row) for row in rows)}

    def _search(self, record_type: type[RecordT], field: str, value: object) -> list[RecordT]:
        rows = call(f"search {record_type.MODEL.lower()} records", self.engine.search, record_type.MODEL, field, value)
        return [load(record_type, row) for row in rows or []]

    def pipelines_with_status(self, status: Status) -> list[PipelineRecord]:
        return self._search(PipelineRecord, "status", status.value)

    def all_pipelines(self) -> list[PipelineRecord]:
        return [record for status in Status for record in self.pipelines_with_status(status)]

    def children_of(self, uuid: str) -> list[PipelineRecord]:
        """The pipelines started by ``uuid``'s hooks, oldest first."""
        return sorted(self._search(PipelineRecord, "parent_uuid", uuid), key=listing.newest_first)

    def pipelines_with_key(self, key: str) -> list[PipelineRecord]:
        """Every stored pipeline created with ``key`` (one, or with ``if_running`` and
        ``debounce``, one per time the key was free), oldest first."""
        return sorted(self._search(PipelineRecord, "key", key), key=listing.newest_first)

    def pipelines_with_keys(self, keys: Sequence[str]) -> dict[str, list[PipelineRecord]]:
        """``pipelines_with_key`` of several keys (a keyed ``create_many``), in one query where
        the store can, else key by key."""
        rows = None
        if len(keys) > 1:
            rows = call("search pipeline records", self.engine.search_many, PipelineRecord.MODEL, "key", list(keys))
        if rows is None:
            return {key: self.pipelines_with_key(key) for key in keys}
        found: dict[str, list[PipelineRecord]] = {key: [] for key in keys}
        for record in (load(PipelineRecord, row) for row in rows):
            if record.key is not None:
                found.setdefault(record.key, []).append(record)
        return found

    def steps_of(self, pipeline_uuid: str) -> list[StepRecord]:
        return self._search(StepRecord, "pipeline_uuid", pipeline_uuid)

    def steps_of_many(self, pipeline_uuids: Sequence[str]) -> dict[str, list[StepRecord]]:
        """The steps of several pipelines in one query where the store can. A pipeline left out
        (or with an invalid step) is read on its own by ``steps_of``, which reports the error."""
        if len(pipeline_uuids) < 2:
            return {}
        try:
            rows = self.engine.search_many(StepRecord.MODEL, "pipeline_uuid", list(pipeline_uuids))
        except Exception as exc:
            logger.debug("reading the steps of %d pipelines at once failed (%s); one by one", len(pipeline_uuids), exc)
            return {}
        if rows is None:
            return {}
        return steps_by_pipeline(rows, pipeline_uuids)

    def events_of(self, pipeline_uuid: str) -> list[EventRecord]:
        events = self._search(EventRecord, "pipeline_uuid", pipeline_uuid)
        return sorted(events, key=lambda event: (event.seq, event.at))

    def messages_of(self, pipeline_uuid: str) -> list[MessageRecord]:
        messages = self._search(MessageRecord, "pipeline_uuid", pipeline_uuid)
        return sorted(messages, key=lambda message: message.sent_at)

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None = None, limit: int = MESSAGE_PAGE
    ) -> list[MessageRecord]:
        """Up to ``limit`` unread messages ``name`` of a pipeline, oldest first, after ``after``."""
        rows = call("read unread messages", self.engine.unread_messages, pipeline_uuid, name, after, limit)
        return [load(MessageRecord, row) for row in rows]

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        return bool(call("look for unread messages", self.engine.has_unread_messages, pipeline_uuid))

    def stream_entries(self, pipeline_uuid: str, after: int = 0, limit: int = STREAM_PAGE) -> list[StreamRecord]:
        """The pipeline's stream entries after cursor ``after``, oldest first, at most ``limit``."""
        rows = call("read a stream", self._streams().stream_entries, pipeline_uuid, after, limit)
        return [load(StreamRecord, row) for row in rows]

    def append_stream(self, entry: StreamRecord, token: str | None) -> None:
        """Store one stream entry at once (``emit(now=True)``) while lease ``token`` holds its
        pipeline (``Backend.while_leased``); else ``LeaseLostError``, storing nothing. Two
        writers of one ``seq`` are refused by the primary key (SQL); elsewhere the store's
        single write lock orders them."""
        self._streams()
        with self.engine.while_leased(entry.pipeline_uuid, token):
            self.insert_all([entry])

    def write_progress(self, step: StepRecord, token: str | None, progress: JSONDict) -> bool | None:
        """Store a running hook's ``progress()`` ahead of its transition, while lease ``token``
        holds the pipeline: True when stored, False when the lease is lost (nothing stored),
        None on a store that keeps progress for the transition (a user's four-method one)."""
        if not getattr(self.engine, "live_progress", False):
            return None
        write = self.engine.write_progress  # type: ignore[attr-defined]
        return bool(call("store a step's progress", write, step.pipeline_uuid, step.uuid, token, progress))

    def last_stream_seq(self, pipeline_uuid: str) -> int:
        """The cursor of the pipeline's last stored stream entry (0: none)."""
        return int(call("read a stream's end", self._streams().last_stream_seq, pipeline_uuid))

    def _streams(self) -> Any:
        if not hasattr(self.engine, "stream_entries"):
            raise ConfigurationError(
                f"{type(self.engine).__name__} stores no streams: implement stream_entries and last_stream_seq "
                "(prorch.storage.backend.Backend), or subclass prorch.storage.composed.RepositoryBackend"
            )
        return self.engine

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        return call("read the last message's time", self.engine.last_sent_at, pipeline_uuid)

    def query_pipelines(self, query: PipelineQuery, after: str | None = None) -> PipelinePage:
        """A page of pipelines, newest first; ``after``: the last uuid of the previous page."""
        query = listing.checked(query)
        if after is not None:
            last = self.get_pipeline(after)
            if last is None:
                raise PipelineNotFoundError(f"--after {after}: no pipeline with that uuid is stored", uuid=after)
            query = dataclasses.replace(query, after=(last.created_at, last.uuid))
        rows, total = call("list pipelines", self.engine.query_pipelines, query)
        records = [load(PipelineRecord, row) for row in rows]
        last_page = len(records) < query.limit
        return PipelinePage(records, None if last_page or not records else records[-1].uuid, total)

    def pipeline_stats(self, now: datetime, ended_since: datetime) -> PipelineStats:
        return call("count pipelines", self.engine.pipeline_stats, now, ended_since)

    def version_groups(self) -> list[VersionGroup]:
        """Pipelines counted by class version, recorded patches and whether they ended."""
        return call("count pipelines by version", self.engine.version_groups)

    def ended_before(self, statuses: list[Status], before: datetime, limit: int) -> list[str]:
        """Uuids of ended pipelines of ``statuses`` last changed before ``before`` and no stored parent."""
        return call("find ended pipelines", self.engine.ended_before, [s.value for s in statuses], before, limit)

    def due(self, now: datetime, limit: int, runnable: Runnable | None = None) -> list[PipelineRecord]:
        rows = call("query due pipelines", self.engine.due, now, limit, runnable)
        return [load(PipelineRecord, row) for row in rows]

    def schedule_ticks(self) -> dict[str, datetime]:
        return call("read the schedules' last ticks", self.engine.schedule_ticks)

    # --- claiming ------------------------------------------------------------------------------

    def claim_due(
        self,
        now: datetime,
        owner: str,
        lease_expires_at: datetime,
        limit: int,
        limits: dict[str, ClaimLimit] | None = None,
        runnable: Runnable | None = None,
    ) -> list[PipelineRecord]:
        """``claim`` spelled out (tests and scripts)."""
        return self.claim(ClaimRequest(now, owner, lease_expires_at, limit, limits or {}, runnable))

    def claim(self, request: ClaimRequest) -> list[PipelineRecord]:
        """Lease due pipelines within their limits, only of the ``runnable`` classes when given."""
        rows = call("claim due pipelines", self.engine.claim, request)
        return [load(PipelineRecord, row) for row in rows]

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> PipelineRecord | None:
        """Lease one pipeline for an in-process run; None when another owner holds it."""
        row = call("claim a pipeline", self.engine.claim_one, uuid, now, owner, lease_expires_at)
        return load(PipelineRecord, row) if row else None

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        return bool(call("renew a lease", self.engine.renew_lease, uuid, owner, lease_expires_at))

    def renew_leases(
        self, leases: Sequence[Lease], lease_expires_at: datetime
    ) -> tuple[set[str], dict[str, ProrchError]]:
        """Renew many leases (pipeline uuid, owner token), each by compare-and-set on its token:
        the uuids renewed, and the leases a store error kept from being renewed, with it (the
        others were lost). In one write where the backend can (``BatchRenewal``, which fails
        as a whole: ``RepositoryError``, but for the leases it could not decide in time:
        ``RenewalsPending`` keeps out those alone); else one ``renew_lease`` each, an error
        keeping out that lease alone."""
        if not leases:
            return set(), {}
        if isinstance(self.engine, BatchRenewal) and self.engine.batch_renewal:
            try:
                return set(call("renew leases", self.engine.renew_leases, list(leases), lease_expires_at)), {}
            except RenewalsPending as pending:
                return set(pending.renewed), dict.fromkeys(pending.pending, pending)
        renewed: set[str] = set()
        failed: dict[str, ProrchError] = {}
        for uuid, owner in leases:
            try:
                if self.renew_lease(uuid, owner, lease_expires_at):
                    renewed.add(uuid)
            except ProrchError as exc:
                failed[uuid] = exc
        return renewed, failed

    # --- writing -------------------------------------------------------------------------------

    def session(self) -> contextlib.AbstractContextManager[None]:
        return self.engine.session()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.engine.transaction()

    def lock_key(self, key: str) -> None:
        """Inside ``transaction()``: creates by ``key`` in other transactions wait for this one."""
        call("lock a creation key", self.engine.lock_key, key)

    def lock_keys(self, keys: Sequence[str]) -> None:
        """``lock_key`` for several keys at once (a keyed ``create_many``)."""
        if keys:
            call("lock creation keys", self.engine.lock_keys, keys)

    def insert_all(self, records: Sequence[Record]) -> None:
        """Store new records (a pipeline with its steps and first event) as one unit."""
        call("save records", self.engine.insert, records)

    def commit(
        self,
        changed: Sequence[PipelineRecord | StepRecord],
        added: Sequence[Record] = (),
        touched: Sequence[MessageRecord] = (),
        snapshots: Snapshots | None = None,
    ) -> None:
        """Write one transition (steps, consumed messages, new records, the pipeline) by
        compare-and-set; only the fields that differ from ``snapshots`` (``tracking``), if given."""
        self.commit_write(Write.of(changed, added, touched, snapshots=snapshots))

    def tracking(self, records: Sequence[Record]) -> Snapshots | None:
        """Snapshots of records just read, so that their next write sends only what changed;
        None on a store that writes whole records."""
        if not self.partial_update:
            return None
        stored: Snapshots = {}
        for record in records:
            stored[record.uuid] = snapshot(record)
        return stored

    def commit_write(self, write: Write) -> None:
        outcome = self.commit_many([write])[0]
        if outcome is not None:
            raise outcome

    def commit_many(self, writes: Sequence[Write]) -> list[Outcome]:
        """Each write all-or-nothing, several in one transaction where the store can; per write,
        None when stored or the error that kept it out. A stored write is applied to its
        records (``Write.committed``); a refused one leaves them as they were."""
        outcomes = call("write transitions", self.engine.commit, writes)
        for write, outcome in zip(writes, outcomes, strict=True):
            if outcome is None:
                write.committed()
        return outcomes

    def advance_schedule(self, name: str, tick: datetime) -> bool:
        """Store ``tick`` as the schedule's last tick unless it or a later one is (False)."""
        return bool(call("store a schedule's last tick", self.engine.advance_schedule, name, tick))

    def deleters(self) -> None:
        """Raise ``ConfigurationError`` now when this store cannot delete (retention)."""
        self.engine.check_deletable()

    def delete_pipelines(self, uuids: list[str], statuses: list[Status], before: datetime) -> int:
        """Delete those of ``uuids`` retention may still take, with their steps, events, messages."""
        values = [status.value for status in statuses]
        return call("delete pipelines", self.engine.delete_pipelines, uuids, values, before)

    # --- waiting (prorch.storage.wakeups) --------------------------------------------------------

    def wait_for_work(self, timeout: float) -> bool:
        """Return as soon as work may have arrived (True) or after ``timeout`` seconds (see
        ``Backend.wait_for_work``)."""
        return bool(self.engine.wait_for_work(timeout))

    def next_due_at(self, now: datetime) -> datetime | None:
        """The earliest ``next_run_at`` after ``now`` of a pending pipeline, or None."""
        return call("find the next due time", self.engine.next_due_at, now)

    # --- pauses --------------------------------------------------------------------------------

    def pauses(self) -> list[Pause]:
        """Every stored pause, oldest first."""
        rows = call("read the pauses", self.engine.pauses)
        return sorted((Pause.from_dict(row) for row in rows), key=lambda p: (p.since is None, p.since, p.scope))

    def rate_starts(self, name: str, since: datetime) -> int:
        """Claims of a rate-limited class after ``since`` (what its ``rate_limit`` counts)."""
        return int(call("count a rate limit's starts", self.engine.rate_starts, name, since))

    def paused(self) -> Paused:
        """The stored pauses by scope (which one holds a pipeline)."""
        return Paused(self.pauses())

    def add_pause(self, pause: Pause) -> bool:
        """Store a pause; False when its scope is paused already."""
        return bool(call("store a pause", self.engine.add_pause, pause.to_dict()))

    def remove_pause(self, scope: str) -> Pause | None:
        """Remove the pause of ``scope`` (waking idle workers); the removed pause, or None."""
        row = call("remove a pause", self.engine.remove_pause, scope)
        return Pause.from_dict(row) if row is not None else None

    # --- workers -------------------------------------------------------------------------------

    def upsert_worker(self, row: WorkerRow) -> None:
        """Store a worker's row (its heartbeat)."""
        call("store a worker's heartbeat", self.engine.upsert_worker, row.to_dict())

    def delete_worker(self, worker_id: str) -> None:
        call("delete a worker's row", self.engine.delete_worker, worker_id)

    def workers(self) -> list[WorkerRow]:
        """Every worker row stored, live or stale, oldest first."""
        rows = call("read the worker rows", self.engine.workers)
        return sorted((WorkerRow.from_dict(row) for row in rows), key=lambda w: (w.started_at, w.id))
