"""Pauses x schedules (issue #29 item 3): a paused class's schedule skips its ticks by default
(marked done: a resume does not catch them up), or with ``schedule_when_paused = "queue"``
creates them, and they wait, paused, until the resume. A pause of another version or of a
tenant does not touch it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from prorch import FakeClock, RegistrationError, Status
from prorch.model.registry import Registry
from prorch.testing import Harness
from tests.support.builders import pipeline_of, step_of

START = datetime(2026, 11, 23, 12, 0, 30, tzinfo=timezone.utc)


def scheduled(registry: Registry, **declaration: Any) -> Harness:
    step = step_of("Tick", lambda self: self.finish({}))
    pipeline_of(step, name="Nightly", every=timedelta(hours=1), catch_up="all", **declaration)
    return Harness(registry=registry, clock=FakeClock(START))


def nightly(harness: Harness) -> list[Status]:
    return [p.status for p in harness.orchestrator.store.all_pipelines() if p.name == "Nightly"]


def test_a_paused_class_skips_its_ticks_and_a_resume_does_not_catch_them_up(registry: Registry) -> None:
    harness = scheduled(registry)
    assert harness.run_pass().scheduled == 1
    harness.orchestrator.pause(name="Nightly", version=1)
    harness.clock.advance(3 * 3600)
    assert harness.run_pass().scheduled == 0
    harness.orchestrator.resume(name="Nightly", version=1)
    assert harness.run_pass().scheduled == 0  # the three were skipped, not missed
    harness.clock.advance(3600)
    assert harness.run_pass().scheduled == 1
    assert nightly(harness) == [Status.FINISHED, Status.FINISHED]


def test_queue_creates_the_ticks_which_wait_paused_until_the_resume(registry: Registry) -> None:
    harness = scheduled(registry, schedule_when_paused="queue")
    harness.orchestrator.pause(name="Nightly", reason="upstream down")
    summary = harness.run_pass()
    assert (summary.scheduled, summary.claimed) == (1, 0)
    harness.clock.advance(2 * 3600)
    assert harness.run_pass().scheduled == 2
    assert nightly(harness) == [Status.PENDING] * 3
    assert harness.orchestrator.query(state="paused", count=True).total == 3
    harness.orchestrator.resume(name="Nightly")
    assert harness.run_pass().claimed == 3
    assert nightly(harness) == [Status.FINISHED] * 3


def test_other_pauses_leave_the_schedule_alone_and_a_bad_setting_is_refused(registry: Registry) -> None:
    harness = scheduled(registry)
    harness.orchestrator.pause(name="Nightly", version=2)
    harness.orchestrator.pause(tenant="acme")
    assert harness.run_pass().scheduled == 1
    with pytest.raises(RegistrationError, match="schedule_when_paused must be one of skip, queue, got 'later'"):
        pipeline_of(step_of("Tock", lambda self: self.finish({})), name="Bad", every=timedelta(hours=1),
                    schedule_when_paused="later")  # fmt: skip
        Harness(registry=registry, clock=FakeClock(START)).run_pass()
