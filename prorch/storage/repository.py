"""The repository interface a user implements, and the optional capabilities the engine uses.

A repository stores one model's records (``IRepository(model)``); a *backend* is any callable
``model -> IRepository``: a seed-style class, or a configured backend from ``repositories``.
The four seed methods are all a user must write. The capabilities below are small optional
protocols; the engine checks for them and, where they are missing, falls back to the four
methods, which is safe in a single orchestrator process only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from prorch.model.due import ClaimRequest, Runnable
from prorch.model.limit_rules import ClaimLimit
from prorch.model.substates import Holds

JSONDict = dict[str, Any]


@dataclass
class SavedItem:
    """What ``save`` may return (prorch 1.0.1): the store's own identifier of the new item."""

    identifier: str | int


class IRepository(ABC):
    """Stores the records of one model (``Metadata.TABLE_NAMES[model]`` names its table).

    Records are JSON-compatible dicts with a unique ``"uuid"`` key. Raise any exception on a
    storage failure: the engine wraps it in ``RepositoryError`` and retries the pipeline later.
    """

    model: str

    def __init__(self, model: str) -> None:
        self.model = model

    @abstractmethod
    def get(self, uuid: str) -> JSONDict | None:
        """The record whose ``uuid`` matches, or None when there is none."""

    @abstractmethod
    def save(self, data: JSONDict) -> Any:
        """Insert a new record (its uuid is new). The return value is not used (seed: SavedItem)."""

    @abstractmethod
    def update(self, uuid: str, data: JSONDict) -> Any:
        """Replace the fields of the record ``uuid`` with ``data`` (the engine sends every field)."""

    @abstractmethod
    def search(self, filter: list[Any]) -> list[JSONDict]:  # noqa: A002 - the seed's name
        """The records whose field equals the value, given as ``[field, value]``; [] when none."""


RepositoryFactory = Callable[[str], IRepository]
"""A backend: a callable ``model -> IRepository`` (an ``IRepository`` subclass is one)."""
RepositoryLike = str | RepositoryFactory
"""What prorch takes wherever it needs a store: a URL (``"sqlite:///prorch.db"``), a backend
from ``repositories``, or a seed-style ``IRepository`` subclass."""


@runtime_checkable
class SupportsCompareAndSet(Protocol):
    """A repository that can refuse a write when the record changed since it was read."""

    def compare_and_set(self, uuid: str, expected_revision: int, data: JSONDict) -> bool:
        """Replace the record only if its stored ``revision`` equals ``expected_revision``.

        Return True if it was replaced, False if the revision differed or the record is missing.
        """
        ...


@runtime_checkable
class SupportsPartialUpdate(Protocol):
    """A repository whose ``update`` and ``compare_and_set`` take some of a record's fields
    and keep the others as stored (``{**stored, **data}``). The engine then writes only the
    fields a transition changed (with ``revision``, which always changes)."""

    partial_update: bool


@runtime_checkable
class SupportsSearchMany(Protocol):
    """A repository that finds the records of several values of a field in one query (the
    steps of every pipeline a pass claimed, instead of one query per pipeline)."""

    def search_many(self, field: str, values: list[Any]) -> list[JSONDict]:
        """The records whose ``field`` is one of ``values`` (as ``search``, for each value)."""
        ...


@dataclass(slots=True)
class TransitionRows:
    """One transition as rows, for ``SupportsTransitionStatements``: the pipeline and its steps
    as ``(model, uuid, expected_revision, fields)`` (compare-and-set), other updated records
    (consumed messages) as ``(model, uuid, fields)``, and new records as ``(model, fields)``."""

    pipeline: tuple[str, str, int, JSONDict]
    steps: list[tuple[str, str, int, JSONDict]]
    updates: list[tuple[str, str, JSONDict]]
    added: list[tuple[str, JSONDict]]


@runtime_checkable
class SupportsTransitionStatements(Protocol):
    """A backend that writes a transition in one statement, conditioned on its pipeline's
    compare-and-set, and several transitions in one round trip (PostgreSQL)."""

    def write_transitions(self, units: list[TransitionRows]) -> list[bool]:
        """Write each unit inside the caller's ``transaction()``: per unit, True when it was
        written, False when its pipeline's revision differed (then nothing of it was written).
        Raise ``ConcurrentUpdateError`` when a written pipeline's step was refused: the
        caller's transaction is then rolled back."""
        ...


@dataclass(frozen=True, slots=True)
class PipelineQuery:
    """Which pipelines a listing wants, newest first (``created_at``, then ``uuid``, descending).

    Every filter given must match; ``param`` is ``(field, value)`` on a top-level params field
    (a str, number or bool), ``tenant`` reads ``context["tenant"]`` and ``attributes`` are
    search attributes the pipeline must carry with those values. ``after`` is the keyset
    cursor: the ``(created_at, uuid)`` of the last pipeline of the previous page. ``count``
    asks for the total number of matches as well (without ``after`` and ``limit``). ``state``
    splits pending by ``prorch.model.substates.state_of`` at ``now``; a repository that filters
    in its own query applies that rule."""

    status: str | None = None
    name: str | None = None
    version: int | None = None
    tenant: str | None = None
    uuid: str | None = None
    key: str | None = None
    created_since: datetime | None = None
    created_until: datetime | None = None
    updated_since: datetime | None = None
    updated_until: datetime | None = None
    param: tuple[str, str | int | float | bool] | None = None
    limit: int = 50
    after: tuple[datetime | None, str] | None = None
    count: bool = False
    state: str | None = None  # running, due, waiting... (prorch.model.substates) or an ended status
    now: datetime | None = None  # what ``state`` is judged at (the store's clock)
    holds: Holds | None = None  # the classes held by their limits at ``now`` (pauses: the store's own)
    attributes: dict[str, str] | None = None  # search attributes, each to match (prorch.model.attributes)


@runtime_checkable
class SupportsPipelineQuery(Protocol):
    """A pipeline repository that answers a ``PipelineQuery`` from its indexes (without it,
    the store reads every pipeline and filters them in Python)."""

    def query_pipelines(self, query: PipelineQuery) -> tuple[list[JSONDict], int | None]:
        """At most ``query.limit`` matching records, newest first, and the total number of
        matches when ``query.count`` (else None)."""
        ...


@dataclass(slots=True)
class PipelineStats:
    """What the dashboard's overview shows, counted by the store: pipelines by status, name and
    version; among the pending ones whose ``next_run_at`` has come, those leased by a worker
    (running) and the others (due); failed ones that were quarantined; the earliest due time
    of the due ones (a running pipeline is not waiting, however long its hook takes);
    and ``(status, updated_at)`` of those that ended since a given time."""

    counts: list[tuple[str, str, int, int]]
    running: int
    due: int
    quarantined: int
    oldest_due: datetime | None
    ended: list[tuple[str, datetime]]


@runtime_checkable
class SupportsPipelineStats(Protocol):
    """A pipeline repository that counts from its indexes (without it, the store reads every
    pipeline to count them)."""

    def pipeline_stats(self, now: datetime, ended_since: datetime) -> PipelineStats: ...


@dataclass(slots=True, frozen=True)
class VersionGroup:
    """Stored pipelines of one class version created with one set of patches, live (not ended)
    or ended, counted by the store (``prorch versions``): how many, and the earliest
    ``created_at`` among them (None when none has one: a prorch 1.0.1 store)."""

    name: str
    version: int
    patches: tuple[str, ...]
    ended: bool
    count: int
    oldest: datetime | None


@runtime_checkable
class SupportsVersionGroups(Protocol):
    """A pipeline repository that groups pipelines by class version and patches itself (a SQL
    ``GROUP BY``; without it, the store reads every pipeline to count them)."""

    def version_groups(self) -> list[VersionGroup]: ...


@runtime_checkable
class SupportsDelete(Protocol):
    """A repository that deletes records (retention: ``Orchestrator.purge``, ``prorch purge``)."""

    def delete_by(self, field: str, values: list[Any]) -> int:
        """Delete the records whose ``field`` is one of ``values``; how many were deleted."""
        ...


@runtime_checkable
class SupportsEndedQuery(Protocol):
    """A pipeline repository that finds ended pipelines by age from an index (without it, the
    store reads the pipelines of each status and filters them)."""

    def ended_before(self, statuses: list[str], before: datetime, limit: int) -> list[str]:
        """Up to ``limit`` uuids of pipelines with one of ``statuses`` (ended ones) and
        ``updated_at`` before ``before``."""
        ...


@runtime_checkable
class SupportsPurge(Protocol):
    """A pipeline repository that deletes ended pipelines with the checks in the same statement
    (retention). Without it, the store checks each pipeline inside its transaction, which is as
    exact only where a transaction holds the whole store (memory, TinyDB, SQLite)."""

    def delete_ended(self, uuids: list[str], statuses: list[str], before: datetime) -> list[str]:
        """In the caller's transaction, delete those of ``uuids`` still with one of ``statuses``,
        ``updated_at`` before ``before`` and no stored parent (a child goes after its parent),
        skipping rows another transaction holds (never waiting on them); the uuids deleted."""
        ...


@runtime_checkable
class SupportsMessageQuery(Protocol):
    """A message repository that reads a pipeline's unread messages by an index, rather than
    every message the pipeline was ever sent (``receive``, ``child_result`` and ``send`` would
    otherwise cost as much as the pipeline's whole mail, each call)."""

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[JSONDict]:
        """Up to ``limit`` messages ``name`` of the pipeline with no ``consumed_at``, oldest first
        by (``sent_at``, ``uuid``); with ``after``, only those after that (sent_at, uuid)."""
        ...

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        """Whether the pipeline has a message (of any name) with no ``consumed_at``."""
        ...

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        """The newest ``sent_at`` of the pipeline's messages (read or not); None without any.
        May be later than that (a memory store keeps the newest it ever held), never earlier."""
        ...


@runtime_checkable
class SupportsDueQuery(Protocol):
    """A pipeline repository that finds due pipelines without reading the others (an index)."""

    def search_due(self, now: datetime, limit: int) -> list[JSONDict]:
        """Pending pipelines with ``next_run_at`` null or <= now and no lease expiring after now,
        highest ``priority`` first, then earliest ``next_run_at``; at most ``limit``."""
        ...


@runtime_checkable
class SupportsClaim(Protocol):
    """A pipeline repository that claims due pipelines atomically, so two workers never share one."""

    def claim_due(
        self, now: datetime, owner: str, lease_expires_at: datetime, limit: int, runnable: Runnable | None = None
    ) -> list[JSONDict]:
        """Select as ``search_due``, only pipelines whose (name, version) is in ``runnable`` when
        it is given (the classes the claiming worker has), and, in the same atomic step, set
        ``lease_owner``, ``lease_expires_at`` and ``revision + 1`` on them; return them as now stored."""
        ...

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        """Lease one pipeline whatever its ``next_run_at`` (as ``claim_due`` does) if no live
        lease is held by another owner; return it as now stored, or None when it is missing or
        leased elsewhere. A finished, failed or cancelled pipeline is returned unleased."""
        ...

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        """Move ``lease_expires_at`` if ``owner`` still holds the lease (the revision is left
        alone); False when the lease was lost."""
        ...


@runtime_checkable
class SupportsLimitedClaim(Protocol):
    """A pipeline repository whose claim keeps to the limits of pipeline classes
    (``max_running``, ``max_running_per_tenant``, ``rate_limit``: ``prorch.model.limit_rules``),
    atomically with the claim, however many workers claim at once."""

    def claim_due_limited(
        self,
        now: datetime,
        owner: str,
        lease_expires_at: datetime,
        limit: int,
        limits: dict[str, ClaimLimit],
        runnable: Runnable | None = None,
    ) -> list[JSONDict]:
        """``claim_due`` (``runnable`` as there), taking the due pipelines in claim order that
        ``prorch.model.limit_rules.within_limits`` admits: counting the live leases (pending,
        ``lease_expires_at`` after ``now``) of each limited name and tenant, and the claims of
        each rate-limited name within its period before ``now``, which it stores with the claim
        (one start per pipeline claimed)."""
        ...


class ClaimsByRequest:
    """``SupportsClaim.claim_due`` and ``SupportsLimitedClaim.claim_due_limited`` for a shipped
    repository whose one claim takes a ``ClaimRequest`` (``claim``): the protocols' spelled-out
    forms, which a user's repository implements and the contract tests call."""

    def claim(self, request: ClaimRequest) -> list[JSONDict]:  # pragma: no cover - the repository's
        raise NotImplementedError

    def claim_due(
        self, now: datetime, owner: str, lease_expires_at: datetime, limit: int, runnable: Runnable | None = None
    ) -> list[JSONDict]:
        return self.claim(ClaimRequest(now, owner, lease_expires_at, limit, runnable=runnable))

    def claim_due_limited(
        self,
        now: datetime,
        owner: str,
        lease_expires_at: datetime,
        limit: int,
        limits: dict[str, ClaimLimit],
        runnable: Runnable | None = None,
    ) -> list[JSONDict]:
        return self.claim(ClaimRequest(now, owner, lease_expires_at, limit, limits, runnable))


@runtime_checkable
class SupportsTransaction(Protocol):
    """A backend whose repositories can write several records all-or-nothing."""

    def transaction(self) -> AbstractContextManager[None]:
        """Writes made by this backend's repositories inside the block commit together."""
        ...


@runtime_checkable
class SupportsServerClock(Protocol):
    """A backend whose server keeps the time that every worker should follow."""

    def server_time(self) -> datetime | None:
        """The server's current time (timezone-aware), or None when the store has no clock of
        its own (an embedded store used by the processes of one machine)."""
        ...


@runtime_checkable
class SupportsScheduleTicks(Protocol):
    """A backend that remembers, per schedule, the newest tick whose pipeline was created, in a
    table of its own: no purge of pipelines can bring a tick back (``prorch.features.schedules``)."""

    def schedule_ticks(self) -> dict[str, datetime]:
        """Every schedule's last created tick (timezone-aware), by schedule name."""
        ...

    def advance_schedule(self, name: str, tick: datetime) -> bool:
        """Store ``tick`` as ``name``'s last tick if it is later than the stored one (or none
        is stored): True if so; False when that tick or a later one is stored already, which
        means another worker created it. Atomic: of two workers at once, one gets True; in a
        ``transaction()``, a second worker waits for the first's commit (or raises
        ``DuplicateRecordError`` where the first tick of a name raced)."""
        ...


@runtime_checkable
class SupportsSaveMany(Protocol):
    """A repository that inserts several new records in one call (one round trip)."""

    def save_many(self, rows: list[JSONDict]) -> None:
        """Insert the records; a uuid stored already raises ``DuplicateRecordError``."""
        ...


@runtime_checkable
class SupportsPinning(Protocol):
    """A backend that can keep this thread's connections checked out for a block of work."""

    def pinned(self) -> AbstractContextManager[None]:
        """Inside the block, this thread's calls reuse the same connections."""
        ...


def is_thread_safe(backend: object) -> bool:
    """Backends declare ``thread_safe = True`` to let a pass run hooks in a thread pool."""
    return bool(getattr(backend, "thread_safe", False))
