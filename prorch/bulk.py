"""Bulk actions by filter: cancel, retry, rerun or purge every pipeline that the filters of a
listing (``prorch list``) match, a page at a time.

The pages follow the listing's keyset order (newest first, by creation time and uuid), so a
pipeline whose status an action changes is neither visited twice nor skipped, and the
pipelines a rerun creates (newer than every page still to come) are never acted on. Each
pipeline goes through the same call as a single action (``Orchestrator.cancel`` and so on),
with the same checks and races handled; one that does not qualify is counted as skipped, one
whose action fails as failed with its error, and the others go on."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from prorch.model.clock import Clock
from prorch.model.exceptions import InvalidParamsError, ProrchError, StoreUnreachableError
from prorch.model.records import PipelineRecord
from prorch.model.status import TERMINAL, Status
from prorch.storage import purge
from prorch.storage.outside import operator_note
from prorch.storage.repository import PipelineQuery
from prorch.storage.store import Store

ACTIONS = ("cancel", "retry", "rerun", "purge")
DEFAULT_BATCH = 100
MAX_PROBLEMS = 100
"""Errors kept in a summary, by uuid; the count goes on past it."""

Progress = Callable[[int], None]
"""Told how many more pipelines were looked at, after each one."""


class Acting(Protocol):
    """What a bulk action reads: the orchestrator's store and clock."""

    store: Store
    clock: Clock


LISTING_FILTERS = ("status", "state", "name", "version", "tenant", "key", "param", "since", "until")
"""The filters every listing shares by name (``prorch list``, bulk actions, the dashboard)."""


def any_filter(values: Iterable[object]) -> bool:
    """Whether any of a listing's filter values was given: None is not, nor an empty repeatable
    one (the CLI's ``--attr``: (), ``Filters.attributes``: {})."""
    return any(value is not None and value != () and value != {} for value in values)


@dataclass(frozen=True)
class Filters:
    """The filters of ``prorch list`` (all given must match): creation and last-change windows
    (``until`` excluded), a top-level params field's value, search attributes (each given must
    be carried with that value), and the rest by equality."""

    status: Status | str | None = None
    name: str | None = None
    version: int | None = None
    tenant: str | None = None
    key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    updated_since: datetime | None = None
    updated_until: datetime | None = None
    param: tuple[str, str | int | float | bool] | None = None
    state: str | None = None  # running, due, waiting (``prorch.model.substates``) or an ended status
    attributes: dict[str, str] | None = None  # search attributes (``prorch.model.attributes``)

    def query(
        self, now: datetime, limit: int, after: tuple[datetime | None, str] | None = None, count: bool = False
    ) -> PipelineQuery:
        return PipelineQuery(
            status=Status(self.status).value if self.status is not None else None,
            name=self.name, version=self.version, tenant=self.tenant, key=self.key,
            created_since=self.since, created_until=self.until,
            updated_since=self.updated_since, updated_until=self.updated_until,
            param=self.param, limit=limit, after=after, count=count, state=self.state, now=now,
            attributes=self.attributes or None,
        )  # fmt: skip

    def given(self) -> bool:
        return any_filter(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass
class BulkSummary:
    """What a bulk action did, or with ``dry_run`` would do: the pipelines the filters matched,
    those acted on, those that did not qualify (an ended one for cancel, one not failed for
    retry) with how many for each reason, and those whose action failed, with the first
    errors by uuid."""

    action: str
    matched: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    dry_run: bool = False
    skipped_why: Counter[str] = field(default_factory=Counter)
    errors: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)  # rerun: the new pipelines' uuids

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped += n
        self.skipped_why[reason] += n

    def fail(self, uuid: str, error: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_PROBLEMS:
            self.errors[uuid] = error


@dataclass(frozen=True)
class BulkAction:
    """One bulk action's arguments: ``from_step``, ``params`` and ``cancel_original`` are
    rerun's; ``older_than`` and ``statuses`` are purge's (a purge takes only ended pipelines
    whose last change is older, and, by default, not failed ones, as ``purge`` does);
    ``actor`` and ``reason`` go into each pipeline's history event, as a single action's."""

    action: str
    from_step: str | None = None
    params: dict[str, Any] | None = None
    cancel_original: bool = False
    older_than: timedelta = timedelta(0)
    statuses: tuple[Status | str, ...] = purge.DEFAULT_STATUSES
    actor: str | None = None
    reason: str | None = None

    def check(self) -> None:
        if self.action not in ACTIONS:
            raise InvalidParamsError(f"bulk action {self.action!r}: use one of {', '.join(ACTIONS)}")
        if self.action == "rerun" and not self.from_step:
            raise InvalidParamsError("a bulk rerun needs from_step (--from-step STEP)")
        if not isinstance(self.older_than, timedelta) or self.older_than < timedelta(0):
            raise InvalidParamsError(f"older_than must be a timedelta of 0 or more, got {self.older_than!r}")
        operator_note(self.actor, self.reason)

    def qualifies(self, record: PipelineRecord, now: datetime) -> str | None:
        """Why ``record`` is skipped, or None when the action applies to it."""
        status = record.status
        if self.action == "cancel" and status in TERMINAL:
            return f"already {status.value}"
        if self.action == "retry" and status != Status.FAILED:
            return f"{status.value}, not failed"
        if self.action == "rerun" and status not in TERMINAL and not self.cancel_original:
            return f"{status.value}, not ended (cancel_original reruns it anyway)"
        if self.action == "purge":
            if status.value not in {Status(s).value for s in self.statuses}:
                return f"{status.value}, not a status purged"
            if record.updated_at is None or record.updated_at >= now - self.older_than:
                return "changed too recently"
        return None


ActOn = Callable[[BulkAction, str], str | None]
"""One pipeline's single action (``Orchestrator.cancel``, ``retry`` or ``rerun``) for a bulk
action, given the pipeline's uuid: returns the uuid of the pipeline a rerun created, else None.
The orchestrator gives it (``Actions._act_on``): the single actions' signatures are written
once, where they are defined."""


def count(orchestrator: Acting, filters: Filters) -> int:
    """How many pipelines the filters match now."""
    page = orchestrator.store.query_pipelines(filters.query(orchestrator.clock.now(), limit=1, count=True))
    return page.total or 0


def apply(
    orchestrator: Acting,
    action: BulkAction,
    filters: Filters,
    act_on: ActOn,
    *,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> BulkSummary:
    """Apply ``action`` to every pipeline ``filters`` match, ``batch_size`` at a time (a purge
    here, the others by ``act_on``), and say what happened; with ``dry_run``, count what would
    be done and change nothing. A store that fails stops the run with its error (what was done
    stays done: run it again for the rest)."""
    action.check()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 1_000:
        raise InvalidParamsError(f"batch_size must be a whole number from 1 to 1000, got {batch_size!r}")
    if action.action == "purge":
        orchestrator.store.deleters()  # a store that cannot delete says so before anything is read
    summary = BulkSummary(action.action, dry_run=dry_run)
    after: tuple[datetime | None, str] | None = None
    while True:
        now = orchestrator.clock.now()
        page = orchestrator.store.query_pipelines(filters.query(now, limit=batch_size, after=after))
        if not page.pipelines:
            return summary
        summary.matched += len(page.pipelines)
        chosen = []
        for record in page.pipelines:
            reason = action.qualifies(record, now)
            if reason is None:
                chosen.append(record)
            else:
                summary.skip(reason)
        if not dry_run:
            _act(orchestrator, action, act_on, chosen, summary, now)
        else:
            summary.done += len(chosen)
        if progress is not None:
            progress(len(page.pipelines))
        if page.next_after is None:
            return summary
        last = page.pipelines[-1]
        after = (last.created_at, last.uuid)


def _act(
    orchestrator: Acting,
    action: BulkAction,
    act_on: ActOn,
    chosen: list[PipelineRecord],
    summary: BulkSummary,
    now: datetime,
) -> None:
    if action.action == "purge":
        statuses = [Status(s) for s in action.statuses]
        deleted = orchestrator.store.delete_pipelines([r.uuid for r in chosen], statuses, now - action.older_than)
        summary.done += deleted
        if len(chosen) > deleted:  # retried meanwhile, or a child whose parent is kept
            summary.skip("changed meanwhile, or a child whose parent is kept", len(chosen) - deleted)
        return
    for record in chosen:
        try:
            created = act_on(action, record.uuid)
        except StoreUnreachableError:
            raise
        except ProrchError as exc:
            summary.fail(record.uuid, f"{type(exc).__name__}: {exc}")
        else:
            summary.done += 1
            if created is not None:
                summary.created.append(created)
