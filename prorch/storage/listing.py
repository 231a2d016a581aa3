"""Listing pipelines: a ``PipelineQuery`` answered by the repository's indexes when it offers
``SupportsPipelineQuery``, else by reading the pipelines and filtering them here (fine for the
stores that have no index: memory, TinyDB, a user's own)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from prorch.model import attributes, substates
from prorch.model.exceptions import InvalidParamsError
from prorch.model.keys import check_key
from prorch.model.patches import recorded as recorded_patches
from prorch.model.records import PipelineRecord
from prorch.model.status import TERMINAL, Status
from prorch.storage.repository import PipelineQuery, PipelineStats, VersionGroup

FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
MAX_LIMIT = 1000
EPOCH = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class PipelinePage:
    """One page of a listing: the pipelines, newest first; ``next_after`` to pass as ``after``
    for the next page (None on the last one); the total number of matches when asked for."""

    pipelines: list[PipelineRecord]
    next_after: str | None
    total: int | None


def checked(query: PipelineQuery) -> PipelineQuery:
    """The query, checked: one clear error for a bad filter."""
    if isinstance(query.limit, bool) or not isinstance(query.limit, int) or not 1 <= query.limit <= MAX_LIMIT:
        raise InvalidParamsError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {query.limit!r}")
    if query.param is not None:
        field, value = query.param
        if not isinstance(field, str) or not FIELD.match(field):
            raise InvalidParamsError(
                f"param filter field {field!r}: give a top-level params field name (letters, digits, _ or -)"
            )
        if not isinstance(value, (str, int, float, bool)):
            raise InvalidParamsError(f"param filter {field}={value!r}: the value must be a string, number or boolean")
    for name in ("created_since", "created_until", "updated_since", "updated_until"):
        moment = getattr(query, name)
        if moment is not None and moment.tzinfo is None:
            raise InvalidParamsError(f"{name} needs a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
    if query.state is not None:
        if query.state not in substates.STATES:
            raise InvalidParamsError(f"state {query.state!r}: use one of {', '.join(substates.STATES)}")
        if query.now is None:
            raise InvalidParamsError("a state filter needs the time to judge it at (query.now)")
    if query.attributes is not None:
        query = replace(query, attributes=_checked_filter(query.attributes))
    if query.key is not None:
        check_key(query.key)  # every pipeline of the key: with if_running or debounce, it may name several
    return query


def _checked_filter(wanted: Any) -> dict[str, str]:
    """An attributes filter: the same rules as the attributes a pipeline may carry."""
    if not isinstance(wanted, dict):
        raise InvalidParamsError(f"attributes filter must be a dict of str to str, got {type(wanted).__name__}")
    for name, value in wanted.items():
        found = attributes.problem(name, value)
        if found is not None:
            raise InvalidParamsError(f"attributes filter: {found}")
    return dict(wanted)


def matches(record: PipelineRecord, query: PipelineQuery) -> bool:
    """The fallback's filter: what the SQL of ``repositories.sql_listing`` selects."""
    for name in ("name", "version", "uuid", "key"):
        wanted = getattr(query, name)
        if wanted is not None and getattr(record, name) != wanted:
            return False
    if query.status is not None and record.status.value != query.status:
        return False
    holds = query.holds or substates.NO_HOLDS
    if (
        query.state is not None
        and query.now is not None
        and substates.state_of(record, query.now, holds) != query.state
    ):
        return False
    if query.tenant is not None and not same_json(record.context.get("tenant", _MISSING), query.tenant):
        return False
    if query.param is not None and not same_json(record.params.get(query.param[0], _MISSING), query.param[1]):
        return False
    if not attributes.matches(record.attributes, query.attributes):
        return False
    return within(record.created_at, query.created_since, query.created_until) and within(
        record.updated_at, query.updated_since, query.updated_until
    )


def within(moment: datetime | None, since: datetime | None, until: datetime | None) -> bool:
    """``since <= moment < until`` for the bounds given; a record without the time matches none."""
    if since is None and until is None:
        return True
    if moment is None:
        return False
    return (since is None or moment >= since) and (until is None or moment < until)


_MISSING = object()


def same_json(stored: Any, wanted: Any) -> bool:
    """Equal as JSON values: ``1``, ``"1"`` and ``true`` differ (Python says ``True == 1``)."""
    if isinstance(wanted, bool) or isinstance(stored, bool):
        return type(stored) is type(wanted) and stored == wanted
    if isinstance(wanted, str) or isinstance(stored, str):
        return isinstance(stored, str) and isinstance(wanted, str) and stored == wanted
    return isinstance(stored, (int, float)) and stored == wanted


def newest_first(record: PipelineRecord) -> tuple[bool, datetime, str]:
    """The listing order, as a sort key for ``sorted(..., reverse=True)``: records without
    ``created_at`` (prorch 1.0.1) last."""
    return (record.created_at is not None, record.created_at or EPOCH, record.uuid)


def filtered_page(records: list[PipelineRecord], query: PipelineQuery) -> tuple[list[PipelineRecord], int | None]:
    """The fallback: a page cut from every pipeline, filtered and sorted here."""
    found = sorted((r for r in records if matches(r, query)), key=newest_first, reverse=True)
    total = len(found) if query.count else None
    if query.after is not None:
        created, uuid = query.after
        cursor = (created is not None, created or EPOCH, uuid)
        found = [r for r in found if newest_first(r) < cursor]
    return found[: query.limit], total


def stats_of(records: list[PipelineRecord], now: datetime, ended_since: datetime) -> PipelineStats:
    """The fallback's overview counts, from every pipeline (what ``sql_listing.stats`` counts)."""
    groups: Counter[tuple[str, str, int]] = Counter()
    running = due = quarantined = 0
    oldest: datetime | None = None
    ended: list[tuple[str, datetime]] = []
    for r in records:
        groups[(r.status.value, r.name, r.version)] += 1
        if r.status == Status.PENDING and r.next_run_at is not None and r.next_run_at <= now:
            leased = r.lease_expires_at is not None and r.lease_expires_at > now
            running += leased
            due += not leased
            if not leased:  # waiting for a worker: a running one is not late
                oldest = r.next_run_at if oldest is None else min(oldest, r.next_run_at)
        elif r.status in TERMINAL and r.updated_at is not None and r.updated_at >= ended_since:
            ended.append((r.status.value, r.updated_at))
        if r.status == Status.FAILED and r.last_error is not None and r.last_error.type == "WorkerCrashed":
            quarantined += 1
    counts = [(status, name, version, n) for (status, name, version), n in groups.items()]
    return PipelineStats(counts, running, due, quarantined, oldest, ended)


def version_groups_of(records: list[PipelineRecord]) -> list[VersionGroup]:
    """The fallback's version groups, from every pipeline (what ``sql_listing.version_groups`` counts)."""
    groups: dict[tuple[str, int, tuple[str, ...], bool], tuple[int, datetime | None]] = {}
    for r in records:
        group = (r.name, r.version, tuple(sorted(recorded_patches(r))), r.status in TERMINAL)
        count, oldest = groups.get(group, (0, None))
        if r.created_at is not None and (oldest is None or r.created_at < oldest):
            oldest = r.created_at
        groups[group] = (count + 1, oldest)
    return [VersionGroup(*group, count, oldest) for group, (count, oldest) in groups.items()]


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_moment(text: str, option: str, now: datetime) -> datetime:
    """A typed ``since``/``until``: an age (``30m``, ``2h``, ``7d``: that long before now) or an
    ISO 8601 time (UTC when it names no zone)."""
    age = DURATION.match(text.strip())
    if age:
        try:
            return now - timedelta(seconds=float(age.group(1)) * UNIT_SECONDS[age.group(2)])
        except OverflowError:  # 99999999999d: before the year 1
            raise InvalidParamsError(
                f"{option} {text!r}: that age reaches before the year 1; give a shorter one"
            ) from None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidParamsError(
            f"{option} {text!r}: give an age such as 30m, 2h or 7d, or a time such as 2026-11-23T08:00:00+00:00"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def filter_value(text: str) -> Any:
    """A typed param filter's value: JSON when it parses (``3``, ``true``, ``"3"``), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_age(text: str, option: str) -> timedelta:
    """An age such as ``30d``, ``12h`` or ``90m`` (retention, ``prorch purge --older-than``)."""
    age = DURATION.match(str(text).strip())
    if not age:
        raise InvalidParamsError(f"{option} {text!r}: give an age such as 30d, 12h or 90m")
    return timedelta(seconds=float(age.group(1)) * UNIT_SECONDS[age.group(2)])
