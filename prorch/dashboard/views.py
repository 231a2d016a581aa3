"""What the dashboard's pages and its JSON API show, as plain JSON-ready dicts: the pages
render them with templates, ``/api/`` returns them as they are."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prorch.bulk import LISTING_FILTERS, Filters
from prorch.dashboard import timeline
from prorch.display import app_loaded, lease_holder, state_text, step_limits, step_seconds
from prorch.model import attributes as search_attributes
from prorch.model import substates
from prorch.model.exceptions import InvalidParamsError, PipelineNotFoundError, ProrchError
from prorch.model.pauses import PIPELINE
from prorch.model.records import EventRecord, PipelineRecord, StepRecord
from prorch.model.status import TERMINAL, EventType, Status
from prorch.model.substates import NO_HOLDS, STATES, Holds
from prorch.model.workers import WorkerRow
from prorch.orchestrator import Orchestrator
from prorch.storage.forking import FORKED_FROM
from prorch.storage.listing import filter_value, parse_moment
from prorch.storage.repository import PipelineStats

MAX_INT = 2**31 - 1  # a stored version is a 32-bit integer on PostgreSQL
FILTERS = (*LISTING_FILTERS, "limit", "after", "attributes")
STATS_SECONDS = 5.0
"""How long overview counts are reused: every open page refreshes every few seconds, and a
count over millions of pipelines should not run once per page per refresh."""
CHART_MINUTES = 60
STATUSES = [status.value for status in Status]


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@dataclass
class StatsCache:
    """The overview's counts, shared by every request for ``STATS_SECONDS``."""

    orchestrator: Orchestrator
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _at: float = 0.0
    _stats: PipelineStats | None = None
    _now: datetime | None = None
    _held: dict[str, int] = field(default_factory=dict)

    def get(self) -> tuple[PipelineStats, datetime]:
        stats, now, _ = self.get_all()
        return stats, now

    def get_all(self) -> tuple[PipelineStats, datetime, dict[str, int]]:
        """The counts, and those of the held states (paused, max-running, rate-limited, and due
        without them) when anything holds work back: counted only then (empty otherwise)."""
        with self._lock:
            if self._stats is None or self._now is None or time.monotonic() - self._at > STATS_SECONDS:
                now = self.orchestrator.clock.now()
                self._stats = self.orchestrator.store.pipeline_stats(now, now - timedelta(minutes=CHART_MINUTES))
                self._held = self.orchestrator.held_counts()
                self._now, self._at = now, time.monotonic()
            return self._stats, self._now, self._held

    def reset(self) -> None:
        """Count again at the next request (after an action changed something)."""
        with self._lock:
            self._stats = None


def overview(orchestrator: Orchestrator, cache: StatsCache) -> dict[str, Any]:
    """Counts by status and by name, running / due / waiting / blocked / quarantined, the
    oldest due pipeline's lag, and the pipelines that ended in each minute of the last hour.
    Blocked (not ended, code not loaded here) is counted only when the app is loaded here, else None."""
    stats, now, held = cache.get_all()
    by_status = {status.value: 0 for status in Status}
    by_name: dict[str, dict[str, int]] = {}
    blocked: int | None = 0 if app_loaded(orchestrator.registry) else None
    for status, name, version, count in stats.counts:
        by_status[status] = by_status.get(status, 0) + count
        row = by_name.setdefault(name, {s.value: 0 for s in Status} | {"total": 0})
        row[status] = row.get(status, 0) + count
        row["total"] += count
        if blocked is not None and Status(status) not in TERMINAL and not _registered(orchestrator, name, version):
            blocked += count
    due = held.get(substates.DUE, stats.due)
    paused, limited = held.get(substates.PAUSED, 0), {state: held.get(state, 0) for state in substates.LIMITED}
    waiting = max(by_status.get(Status.PENDING.value, 0) - stats.running - due - paused - sum(limited.values()), 0)
    minutes = [{"finished": 0, "failed": 0, "cancelled": 0} for _ in range(CHART_MINUTES)]
    for status, at in stats.ended:
        # one that ended between the cache's ``now`` and its read is of this minute, not the future
        age = max(int((now - at).total_seconds() // 60), 0)
        if age < CHART_MINUTES:
            minutes[CHART_MINUTES - 1 - age][status] += 1
    return {
        "now": iso(now),
        "by_status": by_status,
        "by_name": dict(sorted(by_name.items())),
        "running": stats.running,
        "due": due,
        "waiting": waiting,
        "paused": paused,
        "max_running": limited[substates.MAX_RUNNING],
        "rate_limited": limited[substates.RATE_LIMITED],
        "blocked": blocked,
        "quarantined": stats.quarantined,
        "oldest_due_lag_seconds": (now - stats.oldest_due).total_seconds() if stats.oldest_due else None,
        "last_hour": minutes,
        "total": sum(by_status.values()),
    }


def _registered(orchestrator: Orchestrator, name: str, version: int) -> bool:
    try:
        orchestrator.registry.pipeline(name, version)
    except ProrchError:
        return False
    return True


def filters_from(query: Mapping[str, str]) -> dict[str, str]:
    """The listing filters of a request's query string that are set (the form sends empty ones)."""
    return {name: query[name].strip() for name in FILTERS if query.get(name, "").strip()}


def pipelines(orchestrator: Orchestrator, filters: dict[str, str]) -> dict[str, Any]:
    """One page of the listing, with the total; bad filters raise ``InvalidParamsError``."""
    now = orchestrator.clock.now()
    chosen = bulk_filters(filters, now)
    page = orchestrator.query(
        **{name: getattr(chosen, name) for name in LISTED},
        limit=_int(filters, "limit") or 50,
        after=filters.get("after"),
        count=True,
    )
    rows = orchestrator.store.workers() if any(_leased(r, now) for r in page.pipelines) else []
    blocked = orchestrator.blocked_on_page(page.pipelines) if app_loaded(orchestrator.registry) else {}
    holds = orchestrator.holds()
    return {
        "pipelines": [pipeline_row(record, now, rows, blocked.get(record.uuid), holds) for record in page.pipelines],
        "total": page.total,
        "next_after": page.next_after,
        "filters": filters,
    }


LISTED = ("status", "state", "name", "version", "tenant", "key", "param", "since", "until", "attributes")


def bulk_filters(filters: dict[str, str], now: datetime) -> Filters:
    """The listing's filters as a bulk action takes them (``limit`` and ``after`` are the
    page's, not a filter); bad ones raise ``InvalidParamsError``."""
    param = None
    if "param" in filters:
        field_name, sep, text = filters["param"].partition("=")
        if not sep:
            raise InvalidParamsError(f"param filter {filters['param']!r}: expected NAME=VALUE, e.g. region=eu")
        param = (field_name.strip(), filter_value(text.strip()))
    return Filters(
        status=_status(filters), state=_state(filters), name=filters.get("name"), version=_int(filters, "version"),
        tenant=filters.get("tenant"), key=filters.get("key"), param=param,
        since=_moment(filters, "since", now), until=_moment(filters, "until", now),
        attributes=_attributes(filters),
    )  # fmt: skip


def _attributes(filters: dict[str, str]) -> dict[str, str] | None:
    """The ``attributes`` filter as typed: ``name=value`` pairs separated by commas."""
    text = filters.get("attributes")
    if not text:
        return None
    pairs = [pair.strip() for pair in text.split(",") if pair.strip()]
    return dict(search_attributes.parse_pair(pair, "attributes filter") for pair in pairs)


def find(orchestrator: Orchestrator, text: str) -> str:
    """The uuid of the pipeline ``text`` names: its exact uuid, else its creation key."""
    text = text.strip()
    if not text:
        raise InvalidParamsError("type a pipeline's uuid or key to search for")
    canonical = _as_uuid(text)
    if canonical is not None and orchestrator.store.get_pipeline(canonical) is not None:
        return canonical
    try:  # the key's live pipeline, else its newest (if_running and debounce reuse keys)
        return orchestrator.get_by_key(text, workers_code=False).pipeline.uuid
    except (InvalidParamsError, PipelineNotFoundError):  # no pipeline has it (or it is no valid key)
        raise PipelineNotFoundError(f"no pipeline has the uuid or key {text!r}", uuid=text) from None


def _as_uuid(text: str) -> str | None:
    """``text`` as a stored uuid is written (lower case, with hyphens), or None if it is none."""
    try:
        return str(uuid_module.UUID(text))
    except ValueError:
        return None


def pipeline_row(
    record: PipelineRecord, now: datetime, workers: list[WorkerRow] | None = None, blocked: str | None = None,
    holds: Holds = NO_HOLDS,
) -> dict[str, Any]:  # fmt: skip
    """One pipeline of a listing; with ``workers``, which of them runs it (``display.lease_holder``).
    Its state is what ``prorch list`` prints: running, due, waiting, paused, max-running or
    rate-limited for a pending one (``held``: what holds it), stranded, blocked (given why), else
    its status (``display.state_text``)."""
    ended = record.status in TERMINAL
    state = state_text(record, now, workers or [], blocked, holds)
    return {
        "worker": lease_holder(record, workers, now) if workers is not None else None,
        "uuid": record.uuid,
        "name": record.name,
        "version": record.version,
        "status": record.status.value,
        "state": state,
        "held": substates.why(record, state, holds),
        "tenant": record.context.get("tenant"),
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "next_run_at": None if ended else iso(record.next_run_at or now),
        "error": record.last_error.message if record.last_error else None,
    }


def pipeline(orchestrator: Orchestrator, uuid: str) -> dict[str, Any]:
    """One pipeline, as the API returns it (``pipeline_and_bars``)."""
    return pipeline_and_bars(orchestrator, uuid)[0]


def pipeline_and_bars(orchestrator: Orchestrator, uuid: str) -> tuple[dict[str, Any], list[timeline.Bar]]:
    """One pipeline: its steps, the next run and why, params, metadata, progress, outputs,
    errors with tracebacks (and those of earlier attempts), its step attempts over time, where
    it was rerun from and as, the history, and why it is blocked. Without the app loaded here,
    its code is missing here, not necessarily on the workers: it gets its stored next run. The
    bars are the timeline's, for its SVG."""
    state = orchestrator.get(uuid)
    if state.blocked and not app_loaded(orchestrator.registry):
        state = dataclasses.replace(state, blocked=None, code_missing=state.blocked)
    history = orchestrator.history(uuid)
    now = orchestrator.clock.now()
    moment, reason = state.next_run(now, history)
    limits = step_limits(orchestrator.registry, state.steps)
    p = state.pipeline
    workers = orchestrator.store.workers() if _leased(p, now) else []
    found = timeline.bars(state.steps, history, now, p.status in TERMINAL)
    holds = orchestrator.holds()
    pause = holds.pause_of(p)
    row = pipeline_row(p, now, workers, state.blocked, holds)
    reason = row["state"] if row["held"] else reason  # not "due now" while held; which hold: "paused"/"held"
    return {
        "pipeline": {
            **row,
            "key": p.key,
            "priority": p.priority,
            "params": p.params,
            "context": p.context,
            "metadata": p.metadata,
            "last_error": _error(p.last_error),
            "lease_owner": p.lease_owner,
            "cancel_requested": p.cancel_requested,
            "parent_uuid": p.parent_uuid,
            "attributes": p.attributes,
        },
        "children": [pipeline_row(child, now) for child in state.children],
        "result": _result(orchestrator, p),
        "next_run": {"at": iso(moment), "reason": reason},
        "blocked": state.blocked,
        "code_loaded": not (state.blocked or state.code_missing),
        "steps": [_step(step, now, limits) for step in state.steps],
        "history": [{"at": iso(e.at), "type": e.type.value, "step_uuid": e.step_uuid, "data": e.data} for e in history],
        "ended": p.status in TERMINAL,
        "timeline": [bar.to_json() for bar in found],
        "earlier_attempts": timeline.earlier_attempts(history),
        "forked_from": p.metadata.get(FORKED_FROM),
        "reruns": [_rerun(e) for e in history if e.type == EventType.PIPELINE_RERUN],
        "pause": {**pause.to_dict(), "text": pause.describe()} if pause is not None else None,
        "paused_itself": pause is not None and pause.kind == PIPELINE,
    }, found


def _rerun(event: EventRecord) -> dict[str, Any]:
    """A ``pipeline.rerun`` event: the new pipeline, the step, and who reran it and why."""
    data = event.data
    return {"at": iso(event.at), "uuid": data.get("rerun_uuid"), "from_step": data.get("from_step"),
            "actor": data.get("actor"), "reason": data.get("reason")}  # fmt: skip


def _step(step: StepRecord, now: datetime, limits: dict[str, int]) -> dict[str, Any]:
    return {
        "uuid": step.uuid,
        "position": step.position,
        "name": step.name,
        "version": step.version,
        "status": step.status.value,
        "attempt": step.attempt,
        "max_attempts": limits.get(step.name),
        "started_at": iso(step.started_at),
        "finished_at": iso(step.finished_at),
        "seconds": step_seconds(step, now),
        "next_run_at": iso(step.next_run_at),
        "progress": step.progress,
        "metadata": step.metadata,
        "output": step.output,
        "error": _error(step.error),
        "rollback": step.rollback.value if step.rollback else None,
        "logs": _logs(step.logs),
    }


def _logs(logs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A step's logs attempt by attempt: ``attempt``, ``lines`` (``at``, ``level``,
    ``message``), how many were ``dropped`` past the cap, whether an operator ``retried`` after,
    and the ``hook`` that logged them when it is not ``on_start``/``on_continue`` (else None)."""
    return [
        {
            "attempt": entry.get("attempt"),
            "hook": entry.get("hook"),
            "lines": [{"at": at, "level": level, "message": message} for at, level, message in entry.get("lines", [])],
            "dropped": entry.get("dropped", 0),
            "retried": bool(entry.get("retried")),
        }
        for entry in logs or []
    ]


def _error(error: Any) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"type": error.type, "message": error.message, "traceback": error.traceback, "hook": error.hook}


def _int(filters: dict[str, str], name: str) -> int | None:
    if name not in filters:
        return None
    try:
        number = int(filters[name])
    except ValueError:
        number = None
    if number is None or abs(number) > MAX_INT:
        raise InvalidParamsError(f"{name}={filters[name]!r}: give a whole number up to {MAX_INT}")
    return number


def _status(filters: dict[str, str]) -> str | None:
    if "status" not in filters:
        return None
    if filters["status"] not in STATUSES:
        raise InvalidParamsError(f"status {filters['status']!r}: give one of {', '.join(STATUSES)}")
    return filters["status"]


def _state(filters: dict[str, str]) -> str | None:
    if "state" not in filters:
        return None
    if filters["state"] not in STATES:
        raise InvalidParamsError(f"state {filters['state']!r}: give one of {', '.join(STATES)}")
    return filters["state"]


def _moment(filters: dict[str, str], name: str, now: datetime) -> datetime | None:
    return parse_moment(filters[name], name, now) if name in filters else None


def _result(orchestrator: Orchestrator, record: PipelineRecord) -> Any:
    """The result of a finished pipeline (None otherwise, or when it cannot be read here)."""
    if record.status != Status.FINISHED:
        return None
    try:
        return orchestrator.result(record.uuid)
    except ProrchError:
        return None


def _leased(record: PipelineRecord, now: datetime) -> bool:
    return record.lease_expires_at is not None and record.lease_expires_at > now and record.status not in TERMINAL


def workers(orchestrator: Orchestrator) -> dict[str, Any]:
    """Every worker with a row: live ones and stale ones (dead or frozen), oldest first."""
    now = orchestrator.clock.now()
    return {"workers": [row.summary(now) for row in orchestrator.store.workers()], "now": iso(now)}
