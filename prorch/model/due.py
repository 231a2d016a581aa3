"""When a pipeline is due, in which order due pipelines are claimed, and what a claim writes:
the rule written once, for the engine's fallback (``Store.due``) and for the backends that
evaluate it themselves (memory, TinyDB). The SQL backends state the same rule in SQL
(``SQLRepository._due_query``); the repository contract tests hold all of them to it.

Timestamps are compared as they come: aware datetimes, or the fixed-width UTC ISO strings of
stored records (``format_timestamp``), which sort as the moments they name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeAlias, TypeVar

from prorch.model.limit_rules import ClaimLimit
from prorch.model.status import TERMINAL, Status

TERMINAL_VALUES = frozenset(status.value for status in TERMINAL)


class Comparable(Protocol):
    def __le__(self, other: Any, /) -> bool: ...


MomentT = TypeVar("MomentT", bound=Comparable)

Runnable: TypeAlias = frozenset[tuple[str, int]]
"""The (name, version) pairs of the pipeline classes a worker has: its claim takes only those, so
an older worker beside a newer one never claims (and pushes back) what it cannot run."""


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One claim of due pipelines, as the engine asks every backend for it (``Backend.claim``):
    up to ``limit`` due pipelines, in claim order, of the ``runnable`` classes (None: any), within
    the ``limits`` of pipeline names (empty: none), leased to ``owner`` until ``lease_expires_at``.
    With ``mark``, the claim also stores the hook mark of each claimed pipeline that is no crash
    suspect (``fresh``), as shared, at ``now`` (``marks``): its first hook then starts after one
    commit, the claim, not two. A backend may ignore ``mark`` (a user's claim does): the engine
    then stores the mark itself."""

    now: datetime
    owner: str
    lease_expires_at: datetime
    limit: int
    limits: dict[str, ClaimLimit] = field(default_factory=dict)
    runnable: Runnable | None = None
    mark: bool = False


def can_run(row: Mapping[str, Any], runnable: Runnable | None) -> bool:
    """Whether a stored pipeline row is of a class in ``runnable`` (None: any class)."""
    return runnable is None or (row.get("name"), row.get("version", 1)) in runnable


def is_due(status: str, next_run_at: MomentT | None, lease_expires_at: MomentT | None, now: MomentT) -> bool:
    """Pending, its time has come (no time: at once), and no live lease."""
    return (
        status == Status.PENDING.value
        and (next_run_at is None or next_run_at <= now)
        and (lease_expires_at is None or lease_expires_at <= now)
    )


def row_is_due(row: Mapping[str, Any], now: str) -> bool:
    """``is_due`` for a stored pipeline row (timestamps as ISO strings)."""
    return is_due(row.get("status", ""), row.get("next_run_at"), row.get("lease_expires_at"), now)


CLAIM_ORDER: tuple[tuple[str, bool], ...] = (("priority", True), ("next_run_at", False))
"""The order due pipelines are claimed in, as (field, descending): highest priority first, then
the longest due; ties in any order. The one definition: ``row_claim_order`` sorts by it in
Python (the engine's fallback, memory, TinyDB, a SQL claim's result), ``repositories.sql``
builds its ORDER BY from it. A descending field is an int; a missing one is 0 or ``""``."""


def row_claim_order(row: Mapping[Any, Any]) -> tuple[Any, ...]:
    """Sort key of a due pipeline row (``CLAIM_ORDER``; timestamps as ISO strings)."""
    return tuple(-(row.get(field) or 0) if descending else row.get(field) or "" for field, descending in CLAIM_ORDER)


def claim_order(priority: int, next_run_at: str | None) -> tuple[Any, ...]:
    """``row_claim_order`` of a pipeline with this priority and next run."""
    return row_claim_order({"priority": priority, "next_run_at": next_run_at})


KeptT = TypeVar("KeptT")


def merge_in_claim_order(
    sources: Sequence[Sequence[tuple[Mapping[Any, Any], KeptT]]], limit: int
) -> list[tuple[int, KeptT]]:
    """The first ``limit`` due pipelines of several lists in claim order, as (list index, what the
    list keeps): how one claim takes unlimited and limited classes in the one order when each
    list was chosen apart (the unlimited ones; each limited name within its limits). A list
    keeps its own order (a fair name's turns) in the places its rows' claim order gives it;
    ties go to the earlier list."""
    places = sorted((row_claim_order(row), index) for index, source in enumerate(sources) for row, _ in source)
    pending = [iter(source) for source in sources]
    return [(index, next(pending[index])[1]) for _, index in places[:limit]]


def claimable_by(row: Mapping[str, Any], owner: str, now: str) -> bool:
    """Whether ``owner`` may claim this one pipeline now (``claim_one``): no live lease of
    another owner. A finished pipeline is returned as it is, unclaimed, by the caller."""
    lease = row.get("lease_expires_at")
    return lease is None or lease <= now or row.get("lease_owner") == owner


def leased(row: Mapping[str, Any], owner: str, lease_expires_at: str, mark: str | None = None) -> dict[str, Any]:
    """The row as a claim writes it: leased to ``owner``, one more claim, a new revision; with
    ``mark`` (the claim's now), its hook mark (``marks``)."""
    return {
        **row,
        "lease_owner": owner,
        "lease_expires_at": lease_expires_at,
        "claims": row.get("claims", 0) + 1,
        "revision": row.get("revision", 0) + 1,
        **(marks(row, mark) if mark is not None else {}),
    }


def fresh(row: Mapping[str, Any]) -> bool:
    """No crash suspect: no hook mark left by a worker, no crash charged. Only these get a
    claim's mark; a suspect's old mark is evidence the engine reads (``charge_crash``)."""
    return row.get("hook_started_at") is None and not row.get("crashes")


def marks(row: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The hook mark a claim with ``mark`` stores on a ``fresh`` row (``now``, shared: the
    claim's pipelines' hooks run together), or nothing."""
    return {"hook_started_at": now, "hook_shared": True} if fresh(row) else {}


def is_leased(status: str, lease_expires_at: MomentT | None, now: MomentT) -> bool:
    """Pending with a live lease: what ``max_running`` counts."""
    return status == Status.PENDING.value and lease_expires_at is not None and not lease_expires_at <= now


def holds_lease(row: Mapping[str, Any], now: str) -> bool:
    """``is_leased`` for a stored pipeline row (timestamps as ISO strings)."""
    return is_leased(row.get("status", ""), row.get("lease_expires_at"), now)
