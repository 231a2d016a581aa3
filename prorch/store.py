"""Typed access to a backend: records in and out, validated, and each transition written as one
unit. Decisions stay in the engine; this module only loads and saves."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import threading
import uuid as uuid_module
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from prorch import listing
from prorch.clock import Clock, ServerAlignedClock, SystemClock
from prorch.due import Runnable, can_run, claim_order, is_due, is_leased
from prorch.exceptions import (
    ConcurrentUpdateError,
    ConfigurationError,
    CorruptRecordError,
    PipelineNotFoundError,
    ProrchError,
    RepositoryError,
    RepositoryNotDefinedException,
)
from prorch.keys import KEY_NAMESPACE
from prorch.limits import ClaimLimit, StartLog, Tally, within_limits
from prorch.listing import PipelinePage
from prorch.records import (
    EventRecord,
    JSONDict,
    MessageRecord,
    PipelineRecord,
    Record,
    RecordError,
    StepRecord,
    changed_fields,
    format_timestamp,
    remember_stored,
    snapshot,
    to_utc,
)
from prorch.repository import (
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
    TransitionRows,
    is_thread_safe,
)
from prorch.secrets import error_summary
from prorch.status import Status

logger = logging.getLogger("prorch.store")
RecordT = TypeVar("RecordT", bound=Record)
T = TypeVar("T")

_warned_backends: set[int] = set()
TICKS_UUID = str(uuid_module.uuid5(KEY_NAMESPACE, "prorch:schedule-ticks"))
"""The pipeline uuid (of no pipeline) that the fallback's records of schedules' last ticks carry."""
SAVE_CHUNK = 1000
MESSAGE_PAGE = 500
"""Unread messages per read of ``unread_messages``: a hook draining a long queue reads it by pages."""
"""Records per ``save_many`` call: a ``create_many`` of 100,000 pipelines does not hold every row at once."""


def resolve_backend(repository: object) -> RepositoryFactory:
    """Accept a URL string, a backend from ``repositories``, or a seed-style repository class."""
    if repository is None:
        raise RepositoryNotDefinedException()
    if isinstance(repository, str):
        backend: RepositoryFactory = backends_package().from_url(repository)
        return backend
    if isinstance(repository, IRepository):
        raise ConfigurationError(
            f"got a repository instance ({type(repository).__name__}); pass its class or a "
            "backend (a callable model -> IRepository) or a URL such as 'sqlite:///prorch.db'"
        )
    if not callable(repository):
        raise ConfigurationError(
            f"cannot use {repository!r} as a repository: pass a URL such as 'sqlite:///prorch.db', "
            "a backend from `repositories`, or an IRepository subclass"
        )
    return repository


def backends_package() -> Any:
    """prorch's own ``repositories`` package, checked: an application's package of the same name
    found first on ``sys.path`` would otherwise fail later with a puzzling error."""
    try:
        import repositories
    except ImportError as exc:  # pragma: no cover - the package ships with prorch
        raise ConfigurationError("the 'repositories' package is missing; reinstall prorch") from exc
    expected = Path(__file__).resolve().parent.parent / "repositories"
    where = getattr(repositories, "__file__", None) or ", ".join(getattr(repositories, "__path__", []))
    if not where or Path(where).resolve().parent != expected or not hasattr(repositories, "from_url"):
        raise ConfigurationError(
            f"the module 'repositories' was imported from {where or 'a namespace package'}, which shadows "
            f"prorch's own 'repositories' package ({expected}): rename your package (e.g. 'app_repositories') "
            "or keep its folder off sys.path ahead of the installed packages (PYTHONPATH, the current "
            "directory of `python -m` or a script)"
        )
    return repositories


def _call(action: str, func: Callable[..., T], *args: Any) -> T:
    """Run one repository call, wrapping a driver's exception in RepositoryError."""
    try:
        return func(*args)
    except ProrchError:
        raise
    except Exception as exc:
        # the first line only: drivers quote rows and parameters (secrets) on the next ones
        raise RepositoryError(f"repository failed to {action}: {type(exc).__name__}: {error_summary(exc)}") from exc


def _load(record_type: type[RecordT], data: Any, *, remember: bool = False) -> RecordT:
    """A record from a repository's data; with ``remember``, a snapshot of it is kept, so that
    its next write sends only what changed (on repositories with ``SupportsPartialUpdate``)."""
    try:
        record = record_type.from_dict(data)
    except (RecordError, TypeError, ValueError) as exc:
        uuid = data.get("uuid") if isinstance(data, dict) else None
        raise CorruptRecordError(f"stored {record_type.MODEL} record {uuid!r} is not valid: {exc}", uuid=uuid) from exc
    if remember:
        remember_stored(record, snapshot(record, data))
    return record


@dataclass(slots=True)
class Write:
    """One transition to store, as ``Store.commit`` takes it: the changed pipeline and steps
    (by compare-and-set), the new records (events) and the consumed messages."""

    changed: list[PipelineRecord | StepRecord]
    added: list[Record]
    touched: list[MessageRecord]


_stores: weakref.WeakKeyDictionary[Any, Store] = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def store_for(repository: object) -> Store:
    """The ``Store`` of a repository (URL, backend or class), made once per backend: detecting
    capabilities is not free, and ``Pipeline.create`` runs on every web request."""
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
    """The engine's view of one backend: four repositories and the capabilities they offer."""

    def __init__(self, repository: object) -> None:
        self.backend = resolve_backend(repository)
        self.pipelines = self._make(PipelineRecord.MODEL)
        self.steps = self._make(StepRecord.MODEL)
        self.events = self._make(EventRecord.MODEL)
        self.messages = self._make(MessageRecord.MODEL)
        self._by_model = {
            PipelineRecord.MODEL: self.pipelines,
            StepRecord.MODEL: self.steps,
            EventRecord.MODEL: self.events,
            MessageRecord.MODEL: self.messages,
        }
        self._starts = StartLog()  # rate limits without claims (one process): kept here
        # The optional capabilities, each held narrowed to its Protocol (None: not offered).
        self.claims = self.pipelines if isinstance(self.pipelines, SupportsClaim) else None
        self.due_query = self.pipelines if isinstance(self.pipelines, SupportsDueQuery) else None
        self.message_query = self.messages if isinstance(self.messages, SupportsMessageQuery) else None
        self.transactions = self.backend if isinstance(self.backend, SupportsTransaction) else None
        self.pinning = self.backend if isinstance(self.backend, SupportsPinning) else None
        self.server_clock = self.backend if isinstance(self.backend, SupportsServerClock) else None
        self.tick_marks = self.backend if isinstance(self.backend, SupportsScheduleTicks) else None
        self.statements = (
            self.backend
            if isinstance(self.backend, SupportsTransitionStatements) and self.transactions is not None
            else None
        )
        self.compare_and_set: dict[str, SupportsCompareAndSet] | None = {
            model: repository
            for model, repository in self._by_model.items()
            if model in (PipelineRecord.MODEL, StepRecord.MODEL) and isinstance(repository, SupportsCompareAndSet)
        }
        if len(self.compare_and_set) < 2:
            self.compare_and_set = None
        self.save_many: dict[str, SupportsSaveMany] = {
            model: repository
            for model, repository in self._by_model.items()
            if isinstance(repository, SupportsSaveMany)
        }
        self.thread_safe = is_thread_safe(self.backend)
        # write only the changed fields when both record kinds the engine updates allow it
        self.partial_update = all(
            isinstance(repository, SupportsPartialUpdate) and repository.partial_update
            for repository in (self.pipelines, self.steps)
        )
        self._aligned_clock: ServerAlignedClock | None = None
        self.guards_concurrency = self.claims is not None and self.compare_and_set is not None

    @property
    def can_claim(self) -> bool:
        return self.claims is not None

    @property
    def has_transaction(self) -> bool:
        return self.transactions is not None

    def clock(self, clock: Clock | None = None) -> Clock:
        """The clock to run on: the one given; else, on a store with a server clock
        (PostgreSQL), the system clock aligned to the server's; else the system clock. A
        ``SystemClock`` given explicitly is aligned too; a test clock is used as it is."""
        if clock is not None and not isinstance(clock, SystemClock):
            return clock
        server = self.server_clock
        if server is None:
            return clock or SystemClock()
        if clock is None and self._aligned_clock is not None:
            return self._aligned_clock
        try:
            probe = _call("read the server's clock", server.server_time)
        except RepositoryError as exc:
            probe = None
            logger.warning("could not read the clock of %r (%s); using this machine's", self.backend, exc)
        if probe is None:
            return clock or SystemClock()
        aligned = ServerAlignedClock(lambda: _server_now(server), clock)
        if clock is None:
            self._aligned_clock = aligned
        return aligned

    def _make(self, model: str) -> IRepository:
        return _call(f"open the {model} repository", self.backend, model)

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

    # --- reading -----------------------------------------------------------------------------

    def get_pipeline(self, uuid: str) -> PipelineRecord | None:
        data = _call("get a pipeline", self.pipelines.get, uuid)
        return _load(PipelineRecord, data, remember=self.partial_update) if data else None

    def pipelines_with_status(self, status: Status) -> list[PipelineRecord]:
        rows = _call("search pipelines", self.pipelines.search, ["status", status.value])
        return [_load(PipelineRecord, row) for row in rows or []]

    def query_pipelines(self, query: PipelineQuery, after: str | None = None) -> PipelinePage:
        """A page of pipelines, newest first (``prorch list``, the dashboard); ``after`` is the
        uuid of the last pipeline of the previous page."""
        query = listing.checked(query)
        if after is not None:
            last = self.get_pipeline(after)
            if last is None:
                raise PipelineNotFoundError(f"--after {after}: no pipeline with that uuid is stored", uuid=after)
            query = dataclasses.replace(query, after=(last.created_at, last.uuid))
        if isinstance(self.pipelines, SupportsPipelineQuery):
            rows, total = _call("list pipelines", self.pipelines.query_pipelines, query)
            records = [_load(PipelineRecord, row) for row in rows]
        else:
            records, total = listing.filtered_page(self.all_pipelines(), query)
        last_page = len(records) < query.limit
        return PipelinePage(records, None if last_page or not records else records[-1].uuid, total)

    def pipeline_stats(self, now: datetime, ended_since: datetime) -> PipelineStats:
        """Counts for the dashboard's overview, by the store's indexes when it has them."""
        if isinstance(self.pipelines, SupportsPipelineStats):
            stats: PipelineStats = _call("count pipelines", self.pipelines.pipeline_stats, now, ended_since)
            return stats
        return listing.stats_of(self.all_pipelines(), now, ended_since)

    def ended_before(self, statuses: list[Status], before: datetime, limit: int) -> list[str]:
        """Uuids of ended pipelines of ``statuses`` last changed before ``before`` whose parent
        is not stored (retention: a child goes after its parent, whose ``child_result`` reads it)."""
        values = [status.value for status in statuses]
        if isinstance(self.pipelines, SupportsEndedQuery):
            found: list[str] = _call("find ended pipelines", self.pipelines.ended_before, values, before, limit)
            return found
        old = [p.uuid for status in statuses for p in self.pipelines_with_status(status)
               if self._purgeable(p, statuses, before)]  # fmt: skip
        return old[:limit]

    def _purgeable(self, record: PipelineRecord, statuses: list[Status], before: datetime) -> bool:
        """Retention's rule, for stores without ``SupportsEndedQuery`` / ``SupportsPurge``."""
        return (
            record.status in statuses
            and record.updated_at is not None
            and record.updated_at < before
            and (record.parent_uuid is None or self.get_pipeline(record.parent_uuid) is None)
        )

    def deleters(self) -> list[SupportsDelete]:
        """The steps, events, messages and pipelines repositories, each able to delete; one
        ``ConfigurationError`` naming those that cannot."""
        repositories = (self.steps, self.events, self.messages, self.pipelines)
        missing = [r.model for r in repositories if not isinstance(r, SupportsDelete)]
        if missing:
            raise ConfigurationError(
                f"this repository cannot delete records ({', '.join(missing)}): implement "
                "delete_by(field, values) (SupportsDelete) to use retention"
            )
        return [r for r in repositories if isinstance(r, SupportsDelete)]

    def delete_pipelines(self, uuids: list[str], statuses: list[Status], before: datetime) -> int:
        """Delete those of ``uuids`` that retention may still take (ended with one of
        ``statuses``, last changed before ``before``, no stored parent: checked again here, as
        a retry may have landed since they were found) with their steps, events and messages,
        all-or-nothing where the backend has transactions.

        With ``SupportsPurge`` the pipelines go first, checked and locked by one statement, so
        that a purge takes their locks in the order the workers do (pipeline, then steps) and
        skips those another transaction holds: no deadlock with a worker or a second purge.
        Otherwise each is checked inside the transaction, and the pipelines go last, so an
        interrupted delete leaves them to be purged again rather than steps without a pipeline."""
        deleters = self.deleters()
        with self.transaction():
            if isinstance(self.pipelines, SupportsPurge):
                values = [status.value for status in statuses]
                gone: list[str] = _call("delete pipelines", self.pipelines.delete_ended, uuids, values, before)
                for children in deleters[:3]:
                    _call("delete records", children.delete_by, "pipeline_uuid", gone)
                return len(gone)
            chosen = [r.uuid for r in map(self.get_pipeline, uuids) if r and self._purgeable(r, statuses, before)]
            for children in deleters[:3]:
                _call("delete records", children.delete_by, "pipeline_uuid", chosen)
            deleted: int = _call("delete pipelines", deleters[3].delete_by, "uuid", chosen)
        return deleted

    def children_of(self, uuid: str) -> list[PipelineRecord]:
        """The pipelines started by ``uuid``'s hooks, oldest first."""
        rows = _call("search pipelines", self.pipelines.search, ["parent_uuid", uuid])
        found = [_load(PipelineRecord, row) for row in rows or []]
        return sorted(found, key=listing.newest_first)

    def all_pipelines(self) -> list[PipelineRecord]:
        found: list[PipelineRecord] = []
        for status in Status:
            found.extend(self.pipelines_with_status(status))
        return found

    def steps_of(self, pipeline_uuid: str) -> list[StepRecord]:
        rows = _call("search steps", self.steps.search, ["pipeline_uuid", pipeline_uuid])
        return [_load(StepRecord, row, remember=self.partial_update) for row in rows or []]

    def steps_of_many(self, pipeline_uuids: Sequence[str]) -> dict[str, list[StepRecord]]:
        """The steps of several pipelines, by pipeline, in one query, where the repository can
        (``SupportsSearchMany``). A pipeline left out (none can be read that way, or one of its
        steps is not a valid record) is read on its own by ``steps_of``, which then reports
        the error on that pipeline only."""
        if not isinstance(self.steps, SupportsSearchMany) or len(pipeline_uuids) < 2:
            return {}
        try:
            rows = self.steps.search_many("pipeline_uuid", list(pipeline_uuids))
        except Exception as exc:
            logger.debug("reading the steps of %d pipelines at once failed (%s); one by one", len(pipeline_uuids), exc)
            return {}
        found: dict[str, list[StepRecord]] = {uuid: [] for uuid in pipeline_uuids}
        unreadable: set[str] = set()
        for row in rows:
            try:
                step = _load(StepRecord, row, remember=self.partial_update)
            except CorruptRecordError:
                unreadable.add(str(row.get("pipeline_uuid")))
                continue
            if step.pipeline_uuid in found:
                found[step.pipeline_uuid].append(step)
        return {uuid: steps for uuid, steps in found.items() if uuid not in unreadable}

    def events_of(self, pipeline_uuid: str) -> list[EventRecord]:
        rows = _call("search events", self.events.search, ["pipeline_uuid", pipeline_uuid])
        events = [_load(EventRecord, row) for row in rows or []]
        return sorted(events, key=lambda event: (event.seq, event.at))

    def messages_of(self, pipeline_uuid: str) -> list[MessageRecord]:
        rows = _call("search messages", self.messages.search, ["pipeline_uuid", pipeline_uuid])
        messages = [_load(MessageRecord, row) for row in rows or []]
        return sorted(messages, key=lambda message: message.sent_at)

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None = None, limit: int = MESSAGE_PAGE
    ) -> list[MessageRecord]:
        """Up to ``limit`` unread messages ``name`` of a pipeline, oldest first, after the
        (sent_at, uuid) ``after``: by the repository's index where it has one
        (``SupportsMessageQuery``), else from all the pipeline's messages."""
        if self.message_query is not None:
            args = (pipeline_uuid, name, after, limit)
            rows = _call("read unread messages", self.message_query.unread_messages, *args)
            return [_load(MessageRecord, row) for row in rows]
        unread = [
            m
            for m in self.messages_of(pipeline_uuid)
            if m.consumed_at is None and m.name == name and (after is None or (m.sent_at, m.uuid) > after)
        ]
        return sorted(unread, key=lambda m: (m.sent_at, m.uuid))[:limit]

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        """Whether a message (of any name) waits unread for the pipeline."""
        if self.message_query is not None:
            return bool(_call("look for unread messages", self.message_query.has_unread_messages, pipeline_uuid))
        return any(m.consumed_at is None for m in self.messages_of(pipeline_uuid))

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        """The newest ``sent_at`` of the pipeline's messages (or later, never earlier)."""
        if self.message_query is not None:
            last = self.message_query.last_sent_at
            found: datetime | None = _call("read the last message's time", last, pipeline_uuid)
            return to_utc(found) if found is not None else None
        return max((m.sent_at for m in self.messages_of(pipeline_uuid)), default=None)

    def due(self, now: datetime, limit: int, runnable: Runnable | None = None) -> list[PipelineRecord]:
        """Due pipelines, highest priority first, only of the ``runnable`` classes when given;
        through the index when the backend has one."""
        if self.due_query is not None:
            wanted = limit
            while True:  # the index knows nothing of classes: read more until enough are runnable
                rows = _call("query due pipelines", self.due_query.search_due, now, wanted)
                found = [row for row in rows if can_run(row, runnable)]
                if len(found) >= limit or len(rows) < wanted:
                    return [_load(PipelineRecord, row, remember=self.partial_update) for row in found[:limit]]
                wanted *= 4
        candidates = [
            p
            for p in self.pipelines_with_status(Status.PENDING)
            if is_due(p.status, p.next_run_at, p.lease_expires_at, now)
            and (runnable is None or (p.name, p.version) in runnable)
        ]
        candidates.sort(
            key=lambda p: claim_order(p.priority, format_timestamp(p.next_run_at) if p.next_run_at else None)
        )
        return candidates[:limit]

    # --- claiming ----------------------------------------------------------------------------

    def claim_due(
        self,
        now: datetime,
        owner: str,
        lease_expires_at: datetime,
        limit: int,
        limits: dict[str, ClaimLimit] | None = None,
        runnable: Runnable | None = None,
    ) -> list[PipelineRecord]:
        """Lease the due pipelines within the limits of their names (``prorch.limits``), only
        those of the ``runnable`` classes (name, version) when given: a worker never claims what
        it cannot run, so an older worker beside a newer one leaves the new classes to it."""
        if self.claims is None:  # one process: no other claimer to race
            if not limits:
                return self.due(now, limit, runnable)
            tally = Tally(limits, started=self._starts.counts(limits, now))
            pending = self.pipelines_with_status(Status.PENDING)
            tally.add_leased({"name": p.name, "context": p.context} for p in pending
                             if is_leased(p.status.value, p.lease_expires_at, now))  # fmt: skip
            due = [({"name": r.name, "context": r.context}, r) for r in self.due(now, 1_000_000, runnable)]
            chosen = within_limits(due, tally, limit)
            self._starts.record(({"name": r.name} for r in chosen), limits, now)
            return chosen
        if limits and isinstance(self.claims, SupportsLimitedClaim):
            args = (now, owner, lease_expires_at, limit, limits)
            limited = self.claims.claim_due_limited
            rows = _call("claim due pipelines", limited, *args, *_runnable_argument(limited, runnable))
            return [_load(PipelineRecord, row, remember=self.partial_update) for row in rows]
        if limits:
            _warn_once(
                f"{self.backend!r} has no SupportsLimitedClaim: the limits of {', '.join(sorted(limits))} "
                "(max_running, rate_limit) are not enforced"
            )
        claim = self.claims.claim_due
        extra = _runnable_argument(claim, runnable)
        rows = _call("claim due pipelines", claim, now, owner, lease_expires_at, limit, *extra)
        return [_load(PipelineRecord, row, remember=self.partial_update) for row in rows]

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> PipelineRecord | None:
        """Lease one pipeline for an in-process run; None when another owner holds it."""
        if self.claims is None:
            return self.get_pipeline(uuid)
        row = _call("claim a pipeline", self.claims.claim_one, uuid, now, owner, lease_expires_at)
        return _load(PipelineRecord, row, remember=self.partial_update) if row else None

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        """Extend a lease this owner holds; False when it was lost (or leases are unsupported)."""
        if self.claims is None:
            return False
        return bool(_call("renew a lease", self.claims.renew_lease, uuid, owner, lease_expires_at))

    # --- schedules ---------------------------------------------------------------------------

    def schedule_ticks(self) -> dict[str, datetime]:
        """Each schedule's last created tick (``SupportsScheduleTicks``; on a repository
        without it, records of the message model addressed to no pipeline, which no purge
        deletes: it deletes the messages of the pipelines it deletes)."""
        if self.tick_marks is not None:
            return _call("read the schedules' last ticks", self.tick_marks.schedule_ticks)
        rows = _call("read the schedules' last ticks", self.messages.search, ["pipeline_uuid", TICKS_UUID])
        marks = [_load(MessageRecord, row) for row in rows]
        return {mark.name: mark.sent_at for mark in marks}

    def advance_schedule(self, name: str, tick: datetime) -> bool:
        """Store ``tick`` as the schedule's last created tick unless that tick or a later one is
        stored: False then (another worker created it). Call it in the ``transaction()`` that
        creates the tick's pipeline. The fallback (a user's repository) reads, then writes:
        atomic only inside a transaction, as the rest of such a store."""
        if self.tick_marks is not None:
            return bool(_call("store a schedule's last tick", self.tick_marks.advance_schedule, name, tick))
        uuid = str(uuid_module.uuid5(KEY_NAMESPACE, f"schedule-tick:{name}"))
        found = _call("read a schedule's last tick", self.messages.get, uuid)
        mark = MessageRecord(uuid=uuid, pipeline_uuid=TICKS_UUID, name=name, payload=None, sent_at=tick)
        if not found:
            _call("store a schedule's last tick", self.messages.save, mark.to_dict())
            return True
        if _load(MessageRecord, found).sent_at >= tick:
            return False
        _call("store a schedule's last tick", self.messages.update, uuid, mark.to_dict())
        return True

    # --- writing -----------------------------------------------------------------------------

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Hold this thread's connections for a block of work, if the backend can (``pinned``)."""
        return self.pinning.pinned() if self.pinning is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes in the block commit together, on a backend with transactions (nested
        blocks join the outer one); elsewhere, each write stands alone."""
        if self.transactions is not None:
            with self.transactions.transaction():
                yield
        else:
            yield

    def insert_all(self, records: Sequence[Record]) -> None:
        """Store new records (a pipeline with its steps and first event) as one unit."""
        with self.transaction():
            self._save(records)

    def _save(self, records: Sequence[Record]) -> None:
        """Insert new records in order; consecutive records of one model go in one call to the
        repository's optional ``save_many``."""
        index = 0
        while index < len(records):
            model = records[index].MODEL
            end = index
            while end < len(records) and model == records[end].MODEL:
                end += 1
            batch = self.save_many.get(model)
            if batch is not None and end - index > 1:
                for start in range(index, end, SAVE_CHUNK):  # rows made a chunk at a time: bounded memory
                    rows = [r.to_dict() for r in records[start : min(end, start + SAVE_CHUNK)]]
                    _call(f"save {model} records", batch.save_many, rows)
            else:
                repository = self._by_model[model]
                for record in records[index:end]:
                    _call(f"save a {model} record", repository.save, record.to_dict())
            index = end

    def commit(
        self,
        changed: Sequence[PipelineRecord | StepRecord],
        added: Sequence[Record] = (),
        touched: Sequence[MessageRecord] = (),
    ) -> None:
        """Write one transition: steps by compare-and-set on their revision, consumed messages,
        new records (events), and last the pipeline, by compare-and-set. Without a transaction a
        crash in between leaves the steps (the source of truth) ahead, and the next pass derives
        the pipeline from them."""
        self.commit_write(Write(list(changed), list(added), list(touched)))

    def commit_write(self, write: Write) -> None:
        """``commit`` of a ``Write``: one transition, in its own transaction."""
        if self.statements is not None and _one_pipeline(write):
            error = self._commit_by_statements([write])[0]
            if error is not None:
                raise error
            return
        revisions = [record.revision for record in write.changed]
        try:
            with self.transaction():
                self._write_unit(write)
        except BaseException:
            _restore(write, revisions)  # the unit did not happen
            raise
        _settle(write)

    def _write_unit(self, write: Write, *, pipeline_first: bool = False) -> None:
        """The statements of one write. Steps go first (without a transaction, a crash in
        between leaves them, the source of truth, ahead); inside a group, the pipeline goes
        first, so that a refused compare-and-set is found before anything is written."""
        pipelines = [record for record in write.changed if isinstance(record, PipelineRecord)]
        if pipeline_first and pipelines:
            try:
                self._write(pipelines[0])
            except ConcurrentUpdateError as exc:
                raise _Refused(exc) from exc
            pipelines = pipelines[1:]
        for record in write.changed:
            if not isinstance(record, PipelineRecord):
                self._write(record)
        for message in write.touched:
            _call("update a message", self.messages.update, message.uuid, message.to_dict())
        self._save(write.added)
        for record in pipelines:
            self._write(record)

    def commit_many(self, writes: Sequence[Write]) -> list[Exception | None]:
        """Store several pipelines' transitions in one transaction (group commit: one commit,
        one sync of the log, for all of them), each all-or-nothing on its own. Returns, per
        write, None when it was stored or the error that kept it out.

        Each write's pipeline goes first, by compare-and-set: a refused one (another worker
        holds it, or an outside write came in) has written nothing yet and is left out, and
        the others go on. Should anything else fail half-way through a write, or the commit
        itself, the transaction is rolled back and each write is stored on its own instead:
        slower, and as exact. Without transactions, each write is its own commit anyway."""
        if self.transactions is None or len(writes) == 1:
            return [self._try_commit(write) for write in writes]
        if self.statements is not None and all(_one_pipeline(write) for write in writes):
            try:
                return self._commit_by_statements(writes)
            except Exception:
                return [self._try_commit(write) for write in writes]
        revisions = [[record.revision for record in write.changed] for write in writes]
        outcomes: list[Exception | None] = []
        try:
            with self.transaction():
                for write, before in zip(writes, revisions, strict=True):
                    try:
                        self._write_unit(write, pipeline_first=True)
                    except _Refused as refused:
                        _restore(write, before)
                        outcomes.append(refused.error)
                    else:
                        outcomes.append(None)
        except BaseException as exc:
            for write, before in zip(writes, revisions, strict=True):
                _restore(write, before)  # nothing of the group was stored
            if not isinstance(exc, Exception):
                raise
            return [self._try_commit(write) for write in writes]
        for write, outcome in zip(writes, outcomes, strict=True):
            if outcome is None:
                _settle(write)
        return outcomes

    def _commit_by_statements(self, writes: Sequence[Write]) -> list[Exception | None]:
        """``commit_many`` on a backend that writes a transition in one statement: the rounds'
        statements go in one round trip. A refused pipeline wrote nothing (each statement is
        conditioned on its compare-and-set); anything else rolls the whole call back."""
        assert self.statements is not None
        revisions = [[record.revision for record in write.changed] for write in writes]
        try:
            with self.transaction():
                units = [self._rows(write) for write in writes]
                written = _call("write transitions", self.statements.write_transitions, units)
        except BaseException:
            for write, before in zip(writes, revisions, strict=True):
                _restore(write, before)  # nothing was stored
            raise
        outcomes: list[Exception | None] = []
        for write, before, stored in zip(writes, revisions, written, strict=True):
            if stored:
                _settle(write)
                outcomes.append(None)
            else:
                _restore(write, before)
                pipeline = next(r for r in write.changed if isinstance(r, PipelineRecord))
                outcomes.append(_conflict(pipeline.MODEL, pipeline.uuid, pipeline.revision))
        return outcomes

    def _rows(self, write: Write) -> TransitionRows:
        """A write as rows: each changed record's revision bumped, its changed fields."""
        pipeline: tuple[str, str, int, JSONDict] | None = None
        steps = []
        for record in write.changed:
            expected, data = self._payload(record)
            if isinstance(record, PipelineRecord):
                pipeline = (record.MODEL, record.uuid, expected, data)
            else:
                steps.append((record.MODEL, record.uuid, expected, data))
        assert pipeline is not None
        return TransitionRows(
            pipeline=pipeline,
            steps=steps,
            updates=[(message.MODEL, message.uuid, message.to_dict()) for message in write.touched],
            added=[(record.MODEL, record.to_dict()) for record in write.added],
        )

    def _try_commit(self, write: Write) -> Exception | None:
        try:
            self.commit_write(write)
        except Exception as exc:
            return exc
        return None

    def _payload(self, record: PipelineRecord | StepRecord) -> tuple[int, JSONDict]:
        """Bump a record's revision for its write; the revision it was read with, and the
        fields to write (only the changed ones where the repository takes that)."""
        expected = record.revision
        record.revision = expected + 1
        data = record.to_dict()
        if self.partial_update:
            changes, stored = changed_fields(record, data)
            record.__dict__["pending"] = stored  # what the store holds once this commits
            if changes is not None:
                data = changes
        return expected, data

    def _write(self, record: PipelineRecord | StepRecord) -> None:
        expected, data = self._payload(record)
        if self.compare_and_set is not None:
            conditional = self.compare_and_set[record.MODEL]
            written = _call(f"update a {record.MODEL} record", conditional.compare_and_set, record.uuid, expected, data)
            if not written:
                raise _conflict(record.MODEL, record.uuid, expected)
        else:
            repository = self._repository(record)
            _call(f"update a {record.MODEL} record", repository.update, record.uuid, data)

    def _repository(self, record: Record) -> IRepository:
        return self._by_model[record.MODEL]


class _Refused(Exception):
    """A write of a group was refused before any of its statements ran."""

    def __init__(self, error: ConcurrentUpdateError) -> None:
        super().__init__(str(error))
        self.error = error


def _conflict(model: str, uuid: str, expected: int) -> ConcurrentUpdateError:
    return ConcurrentUpdateError(
        f"{model} {uuid} changed since it was read (revision {expected}); "
        "another orchestrator holds it or it was cancelled",
        uuid=uuid,
    )


def _one_pipeline(write: Write) -> bool:
    """A write of exactly one pipeline (with its steps): what a one-statement transition is."""
    return sum(isinstance(record, PipelineRecord) for record in write.changed) == 1


def _restore(write: Write, revisions: list[int]) -> None:
    """A write that did not happen: its records keep the revisions they were read with (and
    what the store holds for them is unchanged)."""
    for record, revision in zip(write.changed, revisions, strict=True):
        record.revision = revision
        record.__dict__.pop("pending", None)


def _settle(write: Write) -> None:
    """A write that was committed: what the store holds for its records is what was written."""
    for record in write.changed:
        stored = record.__dict__.pop("pending", None)
        if stored is not None:
            remember_stored(record, stored)


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


def _server_now(backend: SupportsServerClock) -> datetime:
    found = _call("read the server's clock", backend.server_time)
    if found is None:  # pragma: no cover - it answered when the clock was made
        raise RepositoryError(f"{backend!r} no longer reports its clock")
    return found


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
