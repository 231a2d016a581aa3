"""A pipeline class's concurrency and rate limits, and the one rule by which a claim picks due
pipelines within them.

- ``max_running = N``: at most N of its pipelines hold a lease at once, across all workers.
- ``max_running_per_tenant = N``: at most N of one tenant's (``context["tenant"]``); the
  pipelines without a tenant count as one tenant of their own.
- ``concurrency_key = "customer_id"`` (a params field, or a function of the stored params) with
  ``max_running_per_key = N``: at most N of one key value's. The value is computed at create
  time and stored as JSON text (``PipelineRecord.concurrency_key``); None is one group, as the
  pipelines without a tenant are. Per tenant is the same rule with the tenant as the key: both
  are a ``Grouping`` of the claim, and both may hold at once.
- ``fair = True`` (or ``tenant_weights = {...}``): the claim takes the due pipelines of each
  group in turn, weighted: of each concurrency key value, and the tenant is the key of a class
  that declares none (stored so, so that the claim groups by one indexed column).
- ``rate_limit = "100/minute"``: at most 100 of its hook calls start in any minute. A claim of
  such a pipeline runs one hook (``Run.hooks_left``), so a claim is a start; the starts of the
  last period are stored with the claims, in the claim's transaction.

Backends that claim apply ``within_limits`` inside their claim's transaction: memory and TinyDB
to their rows, the SQL backends to the counts and candidates their SQL reads under a lock per
name. This module is the model layer: it knows rows, not stores."""

from __future__ import annotations

import functools
import itertools
import json
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


TENANT, KEY = "tenant", "key"
"""The two groupings of a name's pipelines: by tenant (``context["tenant"]``) and by the stored
concurrency key (the ``concurrency_key`` column)."""

KEY_LENGTH = 400  # the stored column's length
GroupValue = Any  # a TenantKey (by tenant) or the key's JSON text (by key); None: the group of none


@dataclass(frozen=True)
class Fairness:
    """Claim the due pipelines of each group (``fair_group``: the concurrency key's value, by
    default the tenant) in turn: a group of weight w has w turns for each turn of a group of
    weight 1 (groups not named: 1). ``weights`` pairs stored key texts with weights."""

    weights: tuple[tuple[str, float], ...] = ()

    def weight(self, group: str) -> float:
        return dict(self.weights).get(group, 1.0)


@dataclass(frozen=True)
class ClaimLimit:
    """The limits of one pipeline name that a claim must keep to."""

    max_running: int | None = None
    per_tenant: int | None = None
    rate: RateLimit | None = None
    per_key: int | None = None
    fair: Fairness | None = None

    def groupings(self) -> tuple[tuple[str, int], ...]:
        """(grouping, cap) of each per-group cap: per tenant, per key."""
        found = ((TENANT, self.per_tenant), (KEY, self.per_key))
        return tuple((by, cap) for by, cap in found if cap is not None)


def group_of(row: Row, by: str) -> GroupValue:
    """The group of a stored pipeline row: its tenant, or its stored concurrency key."""
    return tenant_key(row.get("context")) if by == TENANT else row.get("concurrency_key")


def key_text(value: Any) -> str:
    """A concurrency key's value as stored: JSON text of a scalar or None (so that "7" and 7 are
    two keys, as they are two tenants); ValueError for anything else."""
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"a concurrency key must be a str, int, float, bool or None, got {value!r}")
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > KEY_LENGTH:
        raise ValueError(f"a concurrency key is at most {KEY_LENGTH} characters as JSON, got {len(text)}")
    return text


def concurrency_key_of(cls: Any, params: Mapping[str, Any], context: Row | None = None) -> str:
    """The concurrency key a new pipeline of ``cls`` stores: its declared key's value from the
    validated params (a missing field: None), else its tenant (None without a scalar one), as
    JSON text. The tenant is the default key: what a fair claim takes in turn. ValueError when
    the key is not a scalar or the class's function raised."""
    declared = getattr(cls, "concurrency_key", None)
    if declared is None:
        tenant = tenant_key(context)
        return key_text(tenant[1] if tenant is not None else None)
    if isinstance(declared, str):
        return key_text(params.get(declared))
    try:
        value = declared(params)
    except Exception as exc:
        raise ValueError(f"concurrency_key of pipeline {cls.name} raised {type(exc).__name__}: {exc}") from exc
    return key_text(value)


def fair_group(row: Row) -> str:
    """The group a fair claim takes in turn: the stored key (the tenant's when the class declares
    none); for a row stored before keys were (no key), its tenant's."""
    stored = row.get("concurrency_key")
    if stored is not None:
        return str(stored)
    tenant = tenant_key(row.get("context"))
    return key_text(tenant[1] if tenant is not None else None)


def limits_of(cls: Any) -> ClaimLimit | None:
    """A pipeline class's limits, checked (``RegistrationError`` names the attribute and the
    fix); None when it declares none. Read once per class: every pass asks."""
    return _limits_of(cls)


@functools.cache
def _limits_of(cls: Any) -> ClaimLimit | None:
    name = getattr(cls, "name", None) or cls.__qualname__
    counts = {}
    for attribute in ("max_running", "max_running_per_tenant", "max_running_per_key"):
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
    keyed = _checked_key(cls, name)
    if counts["max_running_per_key"] is not None and not keyed:
        raise RegistrationError(
            f"pipeline {name}: max_running_per_key needs a concurrency_key: the params field (or a function "
            'of the params) whose value the pipelines are counted by, e.g. concurrency_key = "customer_id"'
        )
    fair = _fairness_of(cls, name)
    if not any(counts.values()) and rate is None and fair is None:
        return None
    per_tenant, per_key = counts["max_running_per_tenant"], counts["max_running_per_key"]
    return ClaimLimit(counts["max_running"], per_tenant, rate, per_key, fair)


def _checked_key(cls: Any, name: str) -> bool:
    """Whether the class declares a concurrency key; a field its Params does not have is refused."""
    declared = getattr(cls, "concurrency_key", None)
    if declared is None:
        return False
    if isinstance(declared, str):
        model = getattr(cls, "Params", None)
        fields = getattr(model, "model_fields", None)
        if fields is not None and declared not in fields:
            raise RegistrationError(
                f"pipeline {name}: concurrency_key {declared!r} names no field of its Params "
                f"({', '.join(sorted(fields)) or 'none'}); name one, or give a function of the params"
            )
        return True
    if callable(declared):
        return True
    raise RegistrationError(
        f"pipeline {name}: concurrency_key must be a params field's name or a function of the params, got {declared!r}"
    )


def _fairness_of(cls: Any, name: str) -> Fairness | None:
    """``fair = True`` and ``tenant_weights``, checked: weights by tenant, or by the concurrency
    key's values when the class declares one (the groups a fair claim takes in turn)."""
    fair, weights = getattr(cls, "fair", False), getattr(cls, "tenant_weights", None)
    if not isinstance(fair, bool):
        raise RegistrationError(f"pipeline {name}: fair must be True or False, got {fair!r}")
    if weights is None:
        return Fairness() if fair else None
    return Fairness(checked_weights(weights, f"pipeline {name}: tenant_weights"))


def checked_weights(weights: Any, what: str) -> tuple[tuple[str, float], ...]:
    """``{tenant or key value: positive number}`` as (stored key, weight) pairs; RegistrationError else."""
    if not isinstance(weights, Mapping) or not weights:
        raise RegistrationError(f'{what} must be a non-empty dict of group to weight, e.g. {{"acme": 3}}: {weights!r}')
    pairs = []
    for group, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise RegistrationError(f"{what}: the weight of {group!r} must be a positive number, got {weight!r}")
        if not isinstance(group, (str, int, float, bool)):
            raise RegistrationError(f"{what}: {group!r} is not a tenant or key value (a str, int, float or bool)")
        pairs.append((key_text(group), float(weight)))
    return tuple(pairs)


def tenant_key(context: Row | None) -> TenantKey:
    tenant = (context or {}).get("tenant")
    if isinstance(tenant, (str, int, float, bool)):
        return (type(tenant).__name__, tenant)
    return None


@dataclass
class Tally:
    """What each limited name holds during one claim: its live leases (in all and per group:
    tenant, key) and its starts within the rate window, counting what the claim takes as it goes."""

    limits: Mapping[str, ClaimLimit]
    running: Counter[str] = field(default_factory=Counter)
    groups: Counter[tuple[str, str, GroupValue]] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)

    def add_leased(self, rows: Iterable[Row]) -> Tally:
        """Count rows that hold a live lease (each with its ``name``, ``context`` and
        ``concurrency_key``)."""
        for row in rows:
            name = str(row.get("name", ""))
            if name in self.limits:
                self.running[name] += 1
                self._count(name, row)
        return self

    def _count(self, name: str, row: Row) -> None:
        for by, _ in self.limits[name].groupings():
            self.groups[(name, by, group_of(row, by))] += 1

    def room(self, name: str) -> int | None:
        """How many more of ``name`` may be claimed, groups aside; None when unbounded."""
        limit = self.limits.get(name)
        rooms = []
        if limit is not None and limit.max_running is not None:
            rooms.append(limit.max_running - self.running[name])
        if limit is not None and limit.rate is not None:
            rooms.append(limit.rate.count - self.started[name])
        return max(0, min(rooms)) if rooms else None

    def full_groups(self, name: str, by: str) -> list[GroupValue]:
        """The groups (``by`` TENANT or KEY) of ``name`` at their cap."""
        cap = dict(self.limits[name].groupings()).get(by) if name in self.limits else None
        if cap is None:
            return []
        held = self.groups.items()
        return [group for (of, kind, group), count in held if (of, kind) == (name, by) and count >= cap]

    def full_tenants(self, name: str) -> list[TenantKey]:
        """The tenants of ``name`` at their ``max_running_per_tenant``."""
        return self.full_groups(name, TENANT)

    def admits(self, row: Row) -> bool:
        name = str(row.get("name", ""))
        limit = self.limits.get(name)
        if limit is None:
            return True
        room = self.room(name)
        if room is not None and room <= 0:
            return False
        return all(self.groups[(name, by, group_of(row, by))] < cap for by, cap in limit.groupings())

    def take(self, row: Row) -> None:
        name = str(row.get("name", ""))
        if name in self.limits:
            self.running[name] += 1
            self._count(name, row)
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


_ROTATIONS = itertools.count()
"""Claims of this process that took turns: which group goes first rotates from one to the next."""


def next_rotation() -> int:
    """This process's next claim's rotation (``fair_order``'s ``start``), for a claim that orders
    several lists in turns: all take the one rotation, or two lists a claim would advance it by
    two and each fair name's turns would start with the same group at every claim."""
    return next(_ROTATIONS)


def fair_order(
    due: Sequence[tuple[Row, KeptT]], limits: Mapping[str, ClaimLimit], start: int | None = None
) -> list[tuple[Row, KeptT]]:
    """Due rows (in claim order) with those of fair names taken from their groups in turn: the
    places each fair name's rows hold are refilled with them in order of turn / weight, so that a
    group's long backlog does not hold back another group's first pipeline. Turns carry no
    memory from one claim to the next, so the group that goes first within a turn rotates by
    ``start`` (default: this process's next claim), else claims of one pipeline would always
    take the group first in claim order. Other rows keep their places; without a fair name,
    ``due`` as it is."""
    if not any(limit.fair is not None for limit in limits.values()):
        return list(due)
    first = next(_ROTATIONS) if start is None else start
    found = []
    turns: Counter[tuple[str, str]] = Counter()
    ranks: dict[str, dict[str, int]] = {}
    for place, (row, kept) in enumerate(due):
        name = str(row.get("name", ""))
        fairness = limits[name].fair if name in limits else None
        if fairness is not None:
            group = fair_group(row)
            turns[(name, group)] += 1
            rank = ranks.setdefault(name, {}).setdefault(group, len(ranks[name]))
            found.append((turns[(name, group)] / fairness.weight(group), name, rank, place, (row, kept)))
    keyed = [((name, turn, (rank - first) % len(ranks[name]), place), item) for turn, name, rank, place, item in found]
    by_name = sorted((name, place) for _, name, _, place, _ in found)
    ordered = list(due)
    # each name's turns fill its own places (by name, then turn): one name's turns never take another's
    for (_, place), (_, item) in zip(by_name, sorted(keyed, key=lambda pair: pair[0]), strict=True):
        ordered[place] = item
    return ordered


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
