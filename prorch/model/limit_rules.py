"""A pipeline class's concurrency and rate limits, and the one rule by which a claim picks due
pipelines within them.

- ``max_running = N``: at most N of its pipelines hold a lease at once, across all workers.
- ``max_running_per_tenant = N``: at most N of one tenant's (``context["tenant"]``); the
  pipelines without a tenant count as one tenant of their own.
- ``rate_limit = "100/minute"``: at most 100 of its hook calls start in any minute. A claim of
  such a pipeline runs one hook (``Run.hooks_left``), so a claim is a start; the starts of the
  last period are stored with the claims, in the claim's transaction.

Backends that claim apply ``within_limits`` inside their claim's transaction: memory and TinyDB
to their rows, the SQL backends to the counts and candidates their SQL reads under a lock per
name. This module is the model layer: it knows rows, not stores."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from prorch.model.exceptions import RegistrationError
from prorch.model.records import format_timestamp

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400}
RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(second|minute|hour|day|s|m|h|d)s?\s*$")

Row = Mapping[Any, Any]  # a stored pipeline row: its "name" and "context" are read
Scalar = str | int | float | bool
TenantKey = tuple[str, Scalar] | None
"""A tenant as the limits tell tenants apart: its JSON type and value (so that "1" and 1 are
two tenants, as they are in the store); None for pipelines without a (scalar) tenant."""


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` starts in any window of ``seconds``."""

    count: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``"100/minute"``, ``"10/second"``, ``"5/10s"``, ``"1000/2h"``; ValueError says what is wrong."""
        match = RATE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f'{text!r} is not a rate: write "COUNT/PERIOD", e.g. "100/minute", "10/second" or "5/10s" '
                "(periods: second, minute, hour, day, or a number of s, m, h, d)"
            )
        count, amount, unit = int(match[1]), float(match[2] or 1), match[3]
        if count < 1 or amount <= 0:
            raise ValueError(f"{text!r}: the count and the period must be more than 0")
        return cls(count, amount * PERIODS[unit])

    @property
    def period(self) -> timedelta:
        return timedelta(seconds=self.seconds)


@dataclass(frozen=True)
class ClaimLimit:
    """The limits of one pipeline name that a claim must keep to."""

    max_running: int | None = None
    per_tenant: int | None = None
    rate: RateLimit | None = None


def limits_of(cls: Any) -> ClaimLimit | None:
    """A pipeline class's limits, checked (``RegistrationError`` names the attribute and the
    fix); None when it declares none. Read once per class: every pass asks."""
    return _limits_of(cls)


@functools.cache
def _limits_of(cls: Any) -> ClaimLimit | None:
    name = getattr(cls, "name", None) or cls.__qualname__
    counts = {}
    for attribute in ("max_running", "max_running_per_tenant"):
        value = getattr(cls, attribute, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RegistrationError(f"pipeline {name}: {attribute} must be a whole number of 1 or more, got {value!r}")
        counts[attribute] = value
    rate = None
    text = getattr(cls, "rate_limit", None)
    if text is not None:
        try:
            rate = RateLimit.parse(text)
        except ValueError as exc:
            raise RegistrationError(f"pipeline {name}: rate_limit {exc}") from None
    if counts["max_running"] is None and counts["max_running_per_tenant"] is None and rate is None:
        return None
    return ClaimLimit(counts["max_running"], counts["max_running_per_tenant"], rate)


def tenant_key(context: Row | None) -> TenantKey:
    tenant = (context or {}).get("tenant")
    if isinstance(tenant, (str, int, float, bool)):
        return (type(tenant).__name__, tenant)
    return None


@dataclass
class Tally:
    """What each limited name holds during one claim: its live leases (in all and per tenant)
    and its starts within the rate window, counting what the claim takes as it goes."""

    limits: Mapping[str, ClaimLimit]
    running: Counter[str] = field(default_factory=Counter)
    tenants: Counter[tuple[str, TenantKey]] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)

    def add_leased(self, rows: Iterable[Row]) -> Tally:
        """Count rows that hold a live lease (each with its ``name`` and ``context``)."""
        for row in rows:
            name = str(row.get("name", ""))
            if name in self.limits:
                self.running[name] += 1
                self.tenants[(name, tenant_key(row.get("context")))] += 1
        return self

    def room(self, name: str) -> int | None:
        """How many more of ``name`` may be claimed, tenants aside; None when unbounded."""
        limit = self.limits.get(name)
        rooms = []
        if limit is not None and limit.max_running is not None:
            rooms.append(limit.max_running - self.running[name])
        if limit is not None and limit.rate is not None:
            rooms.append(limit.rate.count - self.started[name])
        return max(0, min(rooms)) if rooms else None

    def full_tenants(self, name: str) -> list[TenantKey]:
        """The tenants of ``name`` at their ``max_running_per_tenant``."""
        limit = self.limits.get(name)
        if limit is None or limit.per_tenant is None:
            return []
        return [tenant for (held, tenant), count in self.tenants.items() if held == name and count >= limit.per_tenant]

    def admits(self, row: Row) -> bool:
        name = str(row.get("name", ""))
        limit = self.limits.get(name)
        if limit is None:
            return True
        room = self.room(name)
        if room is not None and room <= 0:
            return False
        return limit.per_tenant is None or self.tenants[(name, tenant_key(row.get("context")))] < limit.per_tenant

    def take(self, row: Row) -> None:
        name = str(row.get("name", ""))
        if name in self.limits:
            self.running[name] += 1
            self.tenants[(name, tenant_key(row.get("context")))] += 1
            self.started[name] += 1


KeptT = TypeVar("KeptT")


def within_limits(due: Sequence[tuple[Row, KeptT]], tally: Tally, limit: int) -> list[KeptT]:
    """From due rows in claim order (each with what the caller keeps for it), the first
    ``limit`` that the limits admit, given what ``tally`` holds (and counting them in it)."""
    chosen: list[KeptT] = []
    for row, kept in due:
        if len(chosen) >= limit:
            break
        if tally.admits(row):
            tally.take(row)
            chosen.append(kept)
    return chosen


class StartLog:
    """The starts of rate-limited names within their window, as fixed-width UTC timestamps by
    name: how memory, TinyDB and the engine's one-process fallback keep them."""

    def __init__(self, starts: dict[str, list[str]] | None = None) -> None:
        self.starts = starts if starts is not None else {}

    def counts(self, limits: Mapping[str, ClaimLimit], now: datetime) -> Counter[str]:
        """Each rate-limited name's starts in its window ending ``now``; older ones are dropped."""
        counts: Counter[str] = Counter()
        for name, limit in limits.items():
            if limit.rate is not None and name in self.starts:
                since = format_timestamp(now - limit.rate.period)
                self.starts[name] = [start for start in self.starts[name] if start > since]
                counts[name] = len(self.starts[name])
        return counts

    def record(self, rows: Iterable[Row], limits: Mapping[str, ClaimLimit], now: datetime) -> None:
        """A start at ``now`` for each claimed row of a rate-limited name."""
        stamp = format_timestamp(now)
        for row in rows:
            name = str(row.get("name", ""))
            limit = limits.get(name)
            if limit is not None and limit.rate is not None:
                self.starts.setdefault(name, []).append(stamp)
