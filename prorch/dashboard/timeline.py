"""A pipeline's step attempts as a timeline (Gantt) and the errors of its earlier attempts, both
read from its history events and step records; the timeline is drawn on the server as SVG, as
the overview's chart is (no JavaScript library to vendor)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any

from prorch.display import format_seconds, format_time
from prorch.model.records import EventRecord, StepRecord
from prorch.model.status import EventType, Status

ENDS = {
    EventType.STEP_RETRYING: "retrying",
    EventType.STEP_FINISHED: "finished",
    EventType.STEP_FAILED: "failed",
    EventType.STEP_CANCELLED: "cancelled",
}
COLORS = {
    "finished": "#2e7d32",
    "failed": "#c62828",
    "retrying": "#ef6c00",
    "cancelled": "#9e9e9e",
    "pending": "#1565c0",
    "reused": "#a5d6a7",
}
WIDTH, ROW, LABEL, PAD = 720, 24, 150, 10


@dataclass(frozen=True)
class Bar:
    """One attempt of one step: from its start (or the time it was due again) to its verdict."""

    step: str
    attempt: int
    start: datetime
    end: datetime
    outcome: str  # one of COLORS
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "attempt": self.attempt, "start": self.start.isoformat(),
            "end": self.end.isoformat(), "outcome": self.outcome, "error": self.error,
            "seconds": (self.end - self.start).total_seconds(),
        }  # fmt: skip


def bars(steps: Sequence[StepRecord], history: Sequence[EventRecord], now: datetime, ended: bool) -> list[Bar]:
    """The attempts, oldest first. An attempt begins at ``step.started``, or when the step was
    due again after a ``step.retrying`` or a ``pipeline.retried``; it ends at its verdict, or
    now while the step has not ended (``pending``: running or waiting). A step with no events
    but a start (one a rerun reused) is one ``reused`` bar."""
    names = {step.uuid: step.name or "?" for step in steps}
    by_name = {step.name: step.uuid for step in steps}
    begun: dict[str, datetime] = {}
    counts: dict[str, int] = {}
    found: list[Bar] = []
    for event in history:
        if event.type == EventType.PIPELINE_RETRIED:
            for name in event.data.get("steps", []):
                if name in by_name:
                    begun[by_name[name]] = event.at
            continue
        uuid = event.step_uuid
        if uuid is None or uuid not in names:
            continue
        if event.type == EventType.STEP_STARTED:
            begun[uuid] = event.at
        elif event.type in ENDS and uuid in begun:
            counts[uuid] = counts.get(uuid, 0) + 1
            error = event.data.get("error")
            start = min(begun.pop(uuid), event.at)
            found.append(Bar(names[uuid], counts[uuid], start, event.at, ENDS[event.type], _text(error)))
            if event.type == EventType.STEP_RETRYING:
                begun[uuid] = _moment(event.data.get("retry_at")) or event.at
    found += _still_running(steps, begun, counts, now, ended)
    found += _reused(steps, {bar.step for bar in found})
    return sorted(found, key=lambda bar: bar.start)


def _still_running(
    steps: Sequence[StepRecord], begun: dict[str, datetime], counts: dict[str, int], now: datetime, ended: bool
) -> list[Bar]:
    live = [] if ended else [s for s in steps if s.uuid in begun and s.status in (Status.CREATED, Status.PENDING)]
    return [
        Bar(s.name or "?", counts.get(s.uuid, 0) + 1, begun[s.uuid], now, "pending")
        for s in live
        if begun[s.uuid] <= now
    ]


def _reused(steps: Sequence[StepRecord], shown: set[str]) -> list[Bar]:
    return [
        Bar(s.name or "?", max(s.attempt, 1), s.started_at, s.finished_at, "reused")
        for s in steps
        if s.name not in shown and s.status == Status.FINISHED and s.started_at and s.finished_at
    ]


def earlier_attempts(history: Sequence[EventRecord]) -> dict[str, list[dict[str, Any]]]:
    """By step name, the errors of attempts that are over and were followed by another: each
    automatic retry's (``step.retrying``: its message) and each ``retry``'s (the errors the
    ``pipeline.retried`` event kept, with tracebacks, and who retried and why)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for event in history:
        if event.type == EventType.STEP_RETRYING:
            attempt = event.data.get("attempt")
            found.setdefault(str(event.data.get("step")), []).append({
                "at": event.at.isoformat(), "attempt": attempt - 1 if isinstance(attempt, int) else None,
                "type": None, "message": _text(event.data.get("error")), "traceback": None, "by": None,
            })  # fmt: skip
        elif event.type == EventType.PIPELINE_RETRIED:
            for error in event.data.get("errors", []):
                found.setdefault(str(error.get("step") or "(pipeline)"), []).append({
                    "at": event.at.isoformat(), "attempt": error.get("attempt"), "type": error.get("type"),
                    "message": error.get("message"), "traceback": error.get("traceback"),
                    "by": _who(event.data),
                })  # fmt: skip
    return found


def svg(found: Sequence[Bar]) -> str:
    """The bars, one row per step (in the order the steps first began), on one time axis."""
    if not found:
        return ""
    rows: list[str] = []
    for bar in found:
        if bar.step not in rows:
            rows.append(bar.step)
    first, last = min(b.start for b in found), max(b.end for b in found)
    span = max((last - first).total_seconds(), 0.001)
    scale = (WIDTH - LABEL - 2 * PAD) / span
    height = len(rows) * ROW + 2 * PAD + 16
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="step attempts over time" class="chart gantt" id="gantt">'
    ]
    for index, name in enumerate(rows):
        y = PAD + index * ROW
        parts.append(f'<text x="{PAD}" y="{y + 16}" class="label">{escape(name[:22])}</text>')
        parts.append(f'<line x1="{LABEL}" y1="{y + ROW}" x2="{WIDTH - PAD}" y2="{y + ROW}" stroke="#eee"/>')
    for bar in found:
        x = LABEL + (bar.start - first).total_seconds() * scale
        width = max((bar.end - bar.start).total_seconds() * scale, 6.0)
        y = PAD + rows.index(bar.step) * ROW + 4
        took = format_seconds((bar.end - bar.start).total_seconds())
        tip = f"{bar.step} attempt {bar.attempt}: {bar.outcome}, {took} from {format_time(bar.start)}"
        if bar.error:
            tip += f": {bar.error}"
        parts.append(
            f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{ROW - 8}" rx="3" fill="{COLORS[bar.outcome]}" '
            f'data-step="{escape(bar.step)}" data-outcome="{bar.outcome}"><title>{escape(tip)}</title></rect>'
        )
    axis = PAD + len(rows) * ROW + 14
    parts.append(f'<text x="{LABEL}" y="{axis}" class="axis">{escape(format_time(first))}</text>')
    total = format_seconds(span)
    parts.append(f'<text x="{WIDTH - PAD}" y="{axis}" class="axis" text-anchor="end">+{escape(total)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _moment(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _who(data: dict[str, Any]) -> str | None:
    actor, reason = data.get("actor"), data.get("reason")
    if actor is None and reason is None:
        return None
    return f"{actor or 'someone'}{f': {reason}' if reason else ''}"
