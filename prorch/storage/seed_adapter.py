"""A user's repository (the seed's four methods: ``prorch.storage.repository.IRepository``) as a
``Backend``: wrapped once, here, with today's fallbacks (due query, claims and limits in
Python, listing and counting in Python, unread messages from all of a pipeline's mail,
schedules' ticks as records of the message model, a purge that checks each pipeline).

The optional ``Supports*`` protocols of prorch 2 are still used where such a repository has
them, for one deprecation cycle, with a warning once per class that says what to do instead
(subclass ``prorch.storage.composed.RepositoryBackend``, or implement ``Backend``). This module
is the only place that asks a repository what it can do."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import time
import uuid as uuid_module
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from prorch.model.due import ClaimRequest, Runnable, claim_order, is_due, is_leased
from prorch.model.exceptions import ConfigurationError
from prorch.model.keys import KEY_NAMESPACE
from prorch.model.limit_rules import StartLog, Tally, fair_order, within_limits
from prorch.model.records import (
    JSONDict,
    MessageRecord,
    PipelineRecord,
    Record,
    StepRecord,
    StreamRecord,
    format_timestamp,
    to_utc,
)
from prorch.storage.backend import Outcome, Write
from prorch.storage.commits import by_statements, call, conflict
from prorch.storage.composed import MODELS, RepositoryBackend
from prorch.storage.repository import (
    IRepository,
    PipelineQuery,
    PipelineStats,
    RepositoryFactory,
    SupportsClaim,
    SupportsCompareAndSet,
    SupportsDelete,
    SupportsDueQuery,
    SupportsEndedQuery,
    SupportsLimitedClaim,
    SupportsMessageQuery,
    SupportsPartialUpdate,
    SupportsPinning,
    SupportsPipelineQuery,
    SupportsPipelineStats,
    SupportsPurge,
    SupportsSaveMany,
    SupportsScheduleTicks,
    SupportsSearchMany,
    SupportsServerClock,
    SupportsTransaction,
    SupportsTransitionStatements,
    SupportsVersionGroups,
    VersionGroup,
    is_thread_safe,
)

logger = logging.getLogger("prorch.storage.seed_adapter")
TICKS_UUID = str(uuid_module.uuid5(KEY_NAMESPACE, "prorch:schedule-ticks"))
WORKERS_UUID = str(uuid_module.uuid5(KEY_NAMESPACE, "prorch:workers"))
"""The pipeline uuid no pipeline has that the fallback's worker rows (message records) are addressed to."""
"""The pipeline uuid (of no pipeline) that the fallback's records of schedules' last ticks carry."""
PAUSES_UUID = str(uuid_module.uuid5(KEY_NAMESPACE, "prorch:pauses"))
"""The pipeline uuid (of no pipeline) that the fallback's pause rows (message records) carry."""
STREAM_MESSAGE = "prorch.stream"
"""The name of the message records that hold a pipeline's stream entries in the fallback: read
already (never received), addressed to the pipeline (deleted with it), the entry as payload."""
CAPABILITIES = (
    SupportsClaim, SupportsLimitedClaim, SupportsDueQuery, SupportsCompareAndSet, SupportsPartialUpdate,
    SupportsSearchMany, SupportsSaveMany, SupportsMessageQuery, SupportsPipelineQuery, SupportsPipelineStats,
    SupportsEndedQuery, SupportsPurge, SupportsDelete, SupportsVersionGroups,
)  # fmt: skip
BACKEND_CAPABILITIES = (
    SupportsTransaction, SupportsPinning, SupportsServerClock, SupportsScheduleTicks, SupportsTransitionStatements,
)  # fmt: skip


def _streams_as_messages(write: Write) -> Write:
    """``write`` with its stream entries as message records (``STREAM_MESSAGE``): a four-method
    repository has no stream model, and gets them with the transition all the same."""
    if not any(isinstance(record, StreamRecord) for record in write.added):
        return write
    added = tuple(_as_message(record) if isinstance(record, StreamRecord) else record for record in write.added)
    return dataclasses.replace(write, added=added)


def _as_message(entry: StreamRecord) -> MessageRecord:
    uuid = str(uuid_module.uuid5(KEY_NAMESPACE, f"prorch:stream:{entry.uuid}"))
    return MessageRecord(
        uuid=uuid, pipeline_uuid=entry.pipeline_uuid, name=STREAM_MESSAGE, payload=entry.to_dict(),
        sent_at=entry.at, consumed_at=entry.at,
    )  # fmt: skip


class _Rows(Protocol):
    """What the worker rows need of their adapter."""

    def repository(self, model: str) -> IRepository: ...
    def get(self, model: str, uuid: str) -> JSONDict | None: ...
    def search(self, model: str, field: str, value: object) -> list[JSONDict]: ...


class _WorkerRowsAsMessages:
    """Worker rows kept as message records of ``WORKERS_UUID`` in a four-method repository,
    which has no table of its own for them."""

    def upsert_worker(self: _Rows, row: JSONDict) -> None:
        """A worker row as a message record of ``WORKERS_UUID`` (read already, so never unread)."""
        uuid = _worker_uuid(str(row["id"]))
        at = datetime.fromisoformat(str(row["heartbeat_at"]))
        record = MessageRecord(uuid=uuid, pipeline_uuid=WORKERS_UUID, name=str(row["id"]), payload=row,
                               sent_at=at, consumed_at=at).to_dict()  # fmt: skip
        messages = self.repository(MessageRecord.MODEL)
        if self.get(MessageRecord.MODEL, uuid) is None:
            messages.save(record)
        else:
            messages.update(uuid, record)

    def delete_worker(self: _Rows, worker_id: str) -> None:
        """Deleted where the repository can delete (``SupportsDelete``); else emptied, which
        ``workers`` skips."""
        uuid = _worker_uuid(worker_id)
        messages = self.repository(MessageRecord.MODEL)
        if isinstance(messages, SupportsDelete):
            messages.delete_by("uuid", [uuid])
        elif (found := self.get(MessageRecord.MODEL, uuid)) is not None:
            messages.update(uuid, {**found, "payload": None})

    def workers(self: _Rows) -> list[JSONDict]:
        rows = self.search(MessageRecord.MODEL, "pipeline_uuid", WORKERS_UUID)
        return [row["payload"] for row in rows if isinstance(row.get("payload"), dict)]


class SeedAdapter(_WorkerRowsAsMessages, RepositoryBackend):
    """``Backend`` over a ``model -> IRepository`` factory."""

    owned = MODELS[1:]  # stream entries are message records here
    live_progress = False  # a step's progress is stored with its transition only: its rows are the user's

    def __init__(self, factory: RepositoryFactory) -> None:
        self.factory = factory
        self.__dict__["_by_model"] = {model: call(f"open the {model} repository", factory, model) for model in MODELS}
        self._find_repository_capabilities()
        self._find_backend_capabilities(factory)
        self.thread_safe = is_thread_safe(factory)
        self.has_transactions = self.transactions is not None
        self.can_claim = self.claims is not None
        self.guards_concurrency = self.claims is not None and self.compare_and_set is not None
        self.partial_update = all(
            isinstance(r, SupportsPartialUpdate) and r.partial_update for r in map(self.repository, MODELS[:2])
        )
        self._starts = StartLog()  # rate limits without claims (one process): kept here
        _warn_deprecated(factory, [self.repository(m) for m in MODELS])

    def _find_repository_capabilities(self) -> None:
        """What the repositories can do beyond the four methods (``None``: a fallback here)."""
        pipelines, messages = self.repository(PipelineRecord.MODEL), self.repository(MessageRecord.MODEL)
        self.claims = pipelines if isinstance(pipelines, SupportsClaim) else None
        self.limited = pipelines if isinstance(pipelines, SupportsLimitedClaim) else None
        self.due_query = pipelines if isinstance(pipelines, SupportsDueQuery) else None
        self.listing = pipelines if isinstance(pipelines, SupportsPipelineQuery) else None
        self.stats = pipelines if isinstance(pipelines, SupportsPipelineStats) else None
        self.grouping = pipelines if isinstance(pipelines, SupportsVersionGroups) else None
        self.ended = pipelines if isinstance(pipelines, SupportsEndedQuery) else None
        self.purge = pipelines if isinstance(pipelines, SupportsPurge) else None
        self.message_query = messages if isinstance(messages, SupportsMessageQuery) else None
        conditional = {m: r for m in MODELS[:2] if isinstance(r := self.repository(m), SupportsCompareAndSet)}
        self.compare_and_set = conditional if len(conditional) == 2 else None
        self.batches = {m: r for m in MODELS if isinstance(r := self.repository(m), SupportsSaveMany)}
        steps = self.repository(StepRecord.MODEL)
        self.many = steps if isinstance(steps, SupportsSearchMany) else None

    def _find_backend_capabilities(self, factory: RepositoryFactory) -> None:
        """What the factory, as a backend, can do (transactions, pinning, a clock, ticks)."""
        self.transactions = factory if isinstance(factory, SupportsTransaction) else None
        self.pinning = factory if isinstance(factory, SupportsPinning) else None
        self.server_clock = factory if isinstance(factory, SupportsServerClock) else None
        self.tick_marks = factory if isinstance(factory, SupportsScheduleTicks) else None
        self.statements = factory if isinstance(factory, SupportsTransitionStatements) and self.transactions else None

    def __call__(self, model: str) -> Any:
        return self.factory(model)

    def __repr__(self) -> str:
        return repr(self.factory)

    def repository(self, model: str) -> IRepository:
        found: IRepository = self.__dict__["_by_model"][model]
        return found

    # --- reading -------------------------------------------------------------------------------

    def search_many(self, model: str, field: str, values: list[object]) -> list[JSONDict] | None:
        return self.many.search_many(field, values) if self.many is not None and model == StepRecord.MODEL else None

    def due(self, now: datetime, limit: int, runnable: Runnable | None) -> list[JSONDict]:
        if self.due_query is not None:
            return super().due(now, limit, runnable)
        pending = [
            (PipelineRecord.from_dict(row), row) for row in self.search(PipelineRecord.MODEL, "status", "pending")
        ]
        paused = self.paused()
        candidates = [
            (claim_order(p.priority, format_timestamp(p.next_run_at) if p.next_run_at else None), row)
            for p, row in pending
            if is_due(p.status, p.next_run_at, p.lease_expires_at, now)
            and (runnable is None or (p.name, p.version) in runnable)
            and not paused.holds_row(row)
        ]
        candidates.sort(key=lambda pair: pair[0])
        return [row for _, row in candidates[:limit]]

    def query_pipelines(self, query: PipelineQuery) -> tuple[list[JSONDict], int | None]:
        """The user's own query where it has one; a state or attributes filter (newer than that
        protocol, so perhaps unknown to it) in Python over every pipeline, whose records keep
        their attributes."""
        if self.listing is not None and query.state is None and not query.attributes:
            return self.listing.query_pipelines(query)
        return super().query_pipelines(query)

    def pipeline_stats(self, now: datetime, ended_since: datetime) -> PipelineStats:
        if self.stats is not None:
            return self.stats.pipeline_stats(now, ended_since)
        return super().pipeline_stats(now, ended_since)

    def version_groups(self) -> list[VersionGroup]:
        return self.grouping.version_groups() if self.grouping is not None else super().version_groups()

    def ended_before(self, statuses: list[str], before: datetime, limit: int) -> list[str]:
        if self.ended is not None:
            return self.ended.ended_before(statuses, before, limit)
        return super().ended_before(statuses, before, limit)

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[JSONDict]:
        if self.message_query is not None:
            return self.message_query.unread_messages(pipeline_uuid, name, after, limit)
        mail = [
            (MessageRecord.from_dict(row), row)
            for row in self.search(MessageRecord.MODEL, "pipeline_uuid", pipeline_uuid)
        ]
        unread = [
            (m.sent_at, m.uuid, row)
            for m, row in mail
            if m.consumed_at is None and m.name == name and (after is None or (m.sent_at, m.uuid) > after)
        ]
        unread.sort(key=lambda found: found[:2])
        return [row for _, _, row in unread[:limit]]

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        if self.message_query is not None:
            return self.message_query.has_unread_messages(pipeline_uuid)
        return any(
            row.get("consumed_at") is None for row in self.search(MessageRecord.MODEL, "pipeline_uuid", pipeline_uuid)
        )

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        if self.message_query is not None:
            found = self.message_query.last_sent_at(pipeline_uuid)
            return to_utc(found) if found is not None else None
        mail = self.search(MessageRecord.MODEL, "pipeline_uuid", pipeline_uuid)
        return max((MessageRecord.from_dict(row).sent_at for row in mail), default=None)

    def server_time(self) -> datetime | None:
        return self.server_clock.server_time() if self.server_clock is not None else None

    def schedule_ticks(self) -> dict[str, datetime]:
        """Records of the message model addressed to no pipeline, which no purge deletes."""
        if self.tick_marks is not None:
            return self.tick_marks.schedule_ticks()
        marks = [MessageRecord.from_dict(row) for row in self.search(MessageRecord.MODEL, "pipeline_uuid", TICKS_UUID)]
        return {mark.name: mark.sent_at for mark in marks}

    # --- claiming (without a claim: one process, no other claimer to race) ----------------------

    def claim(self, request: ClaimRequest) -> list[JSONDict]:
        """The user's ``claim_due`` or ``claim_due_limited`` (the request spelled out, as the
        protocols have it), else the due pipelines within the limits, unleased."""
        if self.claims is None:
            return self._due_within(request)
        now, owner, until, limit, limits, runnable = (
            request.now, request.owner, request.lease_expires_at, request.limit, request.limits, request.runnable
        )  # fmt: skip
        if self.pauses():
            return self._claim_around_pauses(request)
        if limits and self.limited is not None:
            claim: Callable[..., list[JSONDict]] = self.limited.claim_due_limited
            return claim(now, owner, until, limit, limits, *_runnable_argument(claim, runnable))
        if limits:
            _warn_once(
                f"{self.factory!r} has no SupportsLimitedClaim: the limits of {', '.join(sorted(limits))} "
                "(max_running, rate_limit) are not enforced"
            )
        claim = self.claims.claim_due
        return claim(now, owner, until, limit, *_runnable_argument(claim, runnable))

    def _claim_around_pauses(self, request: ClaimRequest) -> list[JSONDict]:
        """A repository's own ``claim_due`` knows no pauses: while one is stored, the due
        pipelines are chosen here (``due`` leaves the paused out) and each is leased by its
        ``claim_one``; one that another writer changed since it was read is given back."""
        assert self.claims is not None
        claimed = []
        for row in self._due_within(request):
            got = self.claims.claim_one(str(row["uuid"]), request.now, request.owner, request.lease_expires_at)
            if got is None or got.get("status") != "pending":
                continue
            if got.get("revision", 0) != row.get("revision", 0) + 1:
                back = {**got, "lease_owner": None, "lease_expires_at": None, "revision": got.get("revision", 0) + 1}
                self.write_record(PipelineRecord.from_dict(got), int(got.get("revision", 0)), back)
                continue
            claimed.append(got)
        return claimed

    def _due_within(self, request: ClaimRequest) -> list[JSONDict]:
        now, limit, limits, runnable = request.now, request.limit, request.limits, request.runnable
        if not limits:
            return self.due(now, limit, runnable)
        tally = Tally(limits, started=self._starts.counts(limits, now))
        pending = [PipelineRecord.from_dict(row) for row in self.search(PipelineRecord.MODEL, "status", "pending")]
        tally.add_leased({"name": p.name, "context": p.context, "concurrency_key": p.concurrency_key} for p in pending
                         if is_leased(p.status.value, p.lease_expires_at, now))  # fmt: skip
        due = [(row, row) for row in self.due(now, 1_000_000, runnable)]
        chosen = within_limits(fair_order(due, limits), tally, limit)
        self._starts.record(chosen, limits, now)
        return chosen

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        if self.claims is None:
            return self.get(PipelineRecord.MODEL, uuid)
        return self.claims.claim_one(uuid, now, owner, lease_expires_at)

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        return self.claims is not None and bool(self.claims.renew_lease(uuid, owner, lease_expires_at))

    batch_renewal = False  # a user's repository renews one lease at a time: the store calls renew_lease for each

    # --- writing -------------------------------------------------------------------------------

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return self.transactions.transaction() if self.transactions is not None else contextlib.nullcontext()

    def session(self) -> contextlib.AbstractContextManager[None]:
        return self.pinning.pinned() if self.pinning is not None else contextlib.nullcontext()

    # --- streams (the fallback: message records of the pipeline, as pauses and ticks) -----------

    def commit(self, writes: Sequence[Write]) -> list[Outcome]:
        return super().commit([_streams_as_messages(write) for write in writes])

    def insert(self, records: Sequence[Record]) -> None:
        super().insert([_as_message(r) if isinstance(r, StreamRecord) else r for r in records])

    def _stream_rows(self, pipeline_uuid: str) -> list[JSONDict]:
        mail = self.search(MessageRecord.MODEL, "pipeline_uuid", pipeline_uuid)
        rows = [
            row["payload"] for row in mail if row.get("name") == STREAM_MESSAGE and isinstance(row.get("payload"), dict)
        ]
        return sorted(rows, key=lambda row: int(row["seq"]))

    def one_statement(self, writes: Sequence[Write]) -> list[Outcome] | None:
        return by_statements(self, writes, self.statements.write_transitions) if self.statements else None

    def wait_for_work(self, timeout: float) -> bool:
        """A user's repository cannot be told of new work (nor is this adapter shared by its
        writers): sleep, and let the worker's next pass look."""
        time.sleep(max(0.0, timeout))
        return False

    def write_record(self, record: PipelineRecord | StepRecord, expected: int, data: JSONDict) -> None:
        if self.compare_and_set is None:
            call(f"update a {record.MODEL} record", self.repository(record.MODEL).update, record.uuid, data)
            return
        cas = self.compare_and_set[record.MODEL].compare_and_set
        if not call(f"update a {record.MODEL} record", cas, record.uuid, expected, data):
            raise conflict(record.MODEL, record.uuid, expected)

    def save_rows(self, model: str, rows: list[JSONDict]) -> None:
        batch = self.batches.get(model)
        if batch is not None and len(rows) > 1:
            call(f"save {model} records", batch.save_many, rows)
        else:
            super().save_rows(model, rows)

    def advance_schedule(self, name: str, tick: datetime) -> bool:
        """The fallback reads, then writes: atomic only inside a transaction."""
        if self.tick_marks is not None:
            return bool(self.tick_marks.advance_schedule(name, tick))
        uuid = str(uuid_module.uuid5(KEY_NAMESPACE, f"schedule-tick:{name}"))
        found = self.get(MessageRecord.MODEL, uuid)
        mark = MessageRecord(uuid=uuid, pipeline_uuid=TICKS_UUID, name=name, payload=None, sent_at=tick).to_dict()
        if not found:
            self.repository(MessageRecord.MODEL).save(mark)
            return True
        if MessageRecord.from_dict(found).sent_at >= tick:
            return False
        self.repository(MessageRecord.MODEL).update(uuid, mark)
        return True

    def check_deletable(self) -> None:
        missing = [m for m in (*MODELS[1:], MODELS[0]) if not isinstance(self.repository(m), SupportsDelete)]
        if missing:
            raise ConfigurationError(
                f"this repository cannot delete records ({', '.join(missing)}): implement "
                "delete_by(field, values) (SupportsDelete) to use retention"
            )

    def delete_pipelines(self, uuids: list[str], statuses: list[str], before: datetime) -> int:
        """With ``SupportsPurge`` the pipelines go first, checked and locked by one statement, so
        that a purge takes locks in the order the workers do and skips those another holds."""
        self.check_deletable()
        if self.purge is None:
            return super().delete_pipelines(uuids, statuses, before)
        with self.transaction():
            gone = call("delete pipelines", self.purge.delete_ended, uuids, statuses, before)
            for model in MODELS[1:]:
                call("delete records", self.repository(model).delete_by, "pipeline_uuid", gone)  # type: ignore[attr-defined]
            return len(gone)

    def rate_starts(self, name: str, since: datetime) -> int:
        """The starts this adapter counted itself (none when the repository claims within limits)."""
        stamp = format_timestamp(since)
        return sum(start > stamp for start in self._starts.starts.get(name, []))

    # --- pauses (the fallback: message records addressed to no pipeline, as schedule ticks) ----

    def pauses(self) -> list[JSONDict]:
        rows = self.search(MessageRecord.MODEL, "pipeline_uuid", PAUSES_UUID)
        return [row["payload"] for row in rows if isinstance(row.get("payload"), dict)]

    def add_pause(self, row: JSONDict) -> bool:
        """Reads, then writes: atomic only inside a transaction (one process, as this adapter's
        claims without a lease)."""
        uuid = _pause_uuid(str(row["scope"]))
        found = self.get(MessageRecord.MODEL, uuid)
        if found is not None and isinstance(found.get("payload"), dict):
            return False
        at = datetime.fromisoformat(str(row["since"])) if row.get("since") else datetime.now(timezone.utc)
        record = MessageRecord(uuid=uuid, pipeline_uuid=PAUSES_UUID, name=str(row["scope"]), payload=row,
                               sent_at=at, consumed_at=at).to_dict()  # fmt: skip
        messages = self.repository(MessageRecord.MODEL)
        if found is None:
            messages.save(record)
        else:
            messages.update(uuid, record)
        return True

    def drop_pause(self, scope: str) -> JSONDict | None:
        """Deleted where the repository can delete (``SupportsDelete``); else emptied, which
        ``pauses`` skips."""
        uuid = _pause_uuid(scope)
        found = self.get(MessageRecord.MODEL, uuid)
        if found is None or not isinstance(found.get("payload"), dict):
            return None
        messages = self.repository(MessageRecord.MODEL)
        if isinstance(messages, SupportsDelete):
            messages.delete_by("uuid", [uuid])
        else:
            messages.update(uuid, {**found, "payload": None})
        row: JSONDict = found["payload"]
        return row

    # --- workers (the fallback: message records addressed to no pipeline, as schedule ticks) ---


def _pause_uuid(scope: str) -> str:
    return str(uuid_module.uuid5(KEY_NAMESPACE, f"pause:{scope}"))


def _worker_uuid(worker_id: str) -> str:
    return str(uuid_module.uuid5(KEY_NAMESPACE, f"worker:{worker_id}"))


def _runnable_argument(claim: Callable[..., Any], runnable: Runnable | None) -> tuple[Runnable | None, ...]:
    """``(runnable,)`` for a claim that takes it; ``()`` for one written before it existed (its
    worker then claims every class, as prorch 1.x did, and is told so once)."""
    if runnable is None:
        return ()
    try:
        takes = "runnable" in inspect.signature(claim).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        takes = False
    if not takes:
        _warn_once(
            f"{getattr(claim, '__qualname__', claim)} takes no `runnable`: this worker also claims pipelines of "
            "classes it does not have, and puts them off (add runnable=None to the claim, see SupportsClaim)"
        )
        return ()
    return (runnable,)


def _warn_deprecated(factory: RepositoryFactory, repositories: list[IRepository]) -> None:
    """Once per class: the ``Supports*`` protocols found, and what to do instead."""
    found = {p.__name__ for r in repositories for p in CAPABILITIES if isinstance(r, p)}
    found |= {p.__name__ for p in BACKEND_CAPABILITIES if isinstance(factory, p)}
    if found:
        _warn_once(
            f"{getattr(factory, '__qualname__', type(factory).__qualname__)} implements {', '.join(sorted(found))}: "
            "these optional protocols are deprecated and will be ignored in prorch 3; implement the backend "
            "contract instead (subclass prorch.storage.composed.RepositoryBackend, or implement "
            "prorch.storage.backend.Backend; see docs/repositories.md)"
        )


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
