"""The dashboard's timeline of step attempts and its earlier attempts (issue #29 item 7), from
history events alone: automatic retries, an operator's retry, a step still running, a step a
rerun reused; user-given names and errors are escaped in the SVG."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from prorch.dashboard import timeline
from prorch.model.records import EventRecord, StepRecord
from prorch.model.status import EventType, Status

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def step(name: str, status: Status, **more: Any) -> StepRecord:
    return StepRecord(uuid=f"s-{name}", pipeline_uuid="p", name=name, status=status, **more)


def event(kind: EventType, seconds: float, name: str | None = None, **data: Any) -> EventRecord:
    if name is not None:
        data["step"] = name
    return EventRecord(
        uuid=f"e{seconds}{kind}", pipeline_uuid="p", step_uuid=f"s-{name}" if name else None, type=kind,
        at=at(seconds), data=data,
    )  # fmt: skip


def test_attempts_retries_and_a_running_step_become_bars() -> None:
    steps = [
        step("Fetch", Status.FINISHED, started_at=at(0), finished_at=at(1)),
        step("Load", Status.PENDING, started_at=at(1)),
    ]
    history = [
        event(EventType.STEP_STARTED, 1, "Load", attempt=1),
        event(EventType.STEP_RETRYING, 2, "Load", attempt=2, error="timeout", retry_at=at(5).isoformat()),
        event(EventType.STEP_FAILED, 6, "Load", error="timeout again"),
        event(EventType.PIPELINE_FAILED, 6),
        event(EventType.PIPELINE_RETRIED, 10, steps=["Load"], actor="ann", reason="fixed",
              errors=[{"step": "Load", "attempt": 2, "type": "E", "message": "timeout again", "traceback": "TB"}]),
    ]  # fmt: skip
    bars = timeline.bars(steps, history, at(12), ended=False)
    assert [(b.step, b.attempt, b.outcome, b.start, b.end) for b in bars] == [
        ("Fetch", 1, "reused", at(0), at(1)),  # no events of its own: a rerun's reused step
        ("Load", 1, "retrying", at(1), at(2)),
        ("Load", 2, "failed", at(5), at(6)),  # from when it was due again
        ("Load", 3, "pending", at(10), at(12)),  # retried: not ended, until now
    ]
    assert timeline.bars(steps, history, at(12), ended=True)[-1].outcome == "failed"  # an ended one runs nothing

    earlier = timeline.earlier_attempts(history)["Load"]
    assert [(e["attempt"], e["message"], e["traceback"], e["by"]) for e in earlier] == [
        (1, "timeout", None, None),
        (2, "timeout again", "TB", "ann: fixed"),
    ]


def test_the_svg_escapes_names_and_errors() -> None:
    steps = [step("<b>x</b>", Status.FAILED)]
    history = [
        event(EventType.STEP_STARTED, 0, "<b>x</b>", attempt=1),
        event(EventType.STEP_FAILED, 3, "<b>x</b>", error="<script>alert(1)</script>"),
    ]
    drawn = timeline.svg(timeline.bars(steps, history, at(5), ended=True))
    assert "<script>" not in drawn and "<b>" not in drawn
    assert "&lt;script&gt;" in drawn and 'data-outcome="failed"' in drawn
    assert timeline.svg([]) == ""
