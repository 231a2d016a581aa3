"""Recurring schedules (issue #15): which ticks a pass creates under each catch-up policy, cron
schedules in a time zone, params per tick, and one clear error for a bad declaration. The
clock is a FakeClock; tests/integration/test_schedule_workers.py runs real worker processes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from prorch import FakeClock, Orchestrator, RegistrationError
from prorch.registry import Registry
from prorch.schedule import schedule_of
from prorch.testing import Harness
from tests.support.builders import pipeline_of, step_of

START = datetime(2026, 11, 23, 12, 0, 30, tzinfo=timezone.utc)


def scheduled(registry: Registry, **declaration: Any) -> type:
    step = step_of("Tick", lambda self: self.finish({"tick": self.context.get("schedule_tick")}))
    return pipeline_of(step, name="Nightly", **declaration)


def ticks(harness: Harness) -> list[str]:
    found = harness.orchestrator.query(name="Nightly", limit=1000).pipelines
    return sorted(p.context["schedule_tick"] for p in found)


def iso(hours: float) -> str:
    return (datetime(2026, 11, 23, 12, tzinfo=timezone.utc) + timedelta(hours=hours)).isoformat()


def test_latest_creates_each_tick_once_and_only_the_newest_after_a_stop(registry: Registry) -> None:
    scheduled(registry, every=timedelta(hours=1))
    harness = Harness(registry=registry, clock=FakeClock(START))
    assert harness.run_pass().scheduled == 1
    assert harness.run_pass().scheduled == 0  # the same tick: already created
    assert ticks(harness) == [iso(0)]
    harness.clock.advance(5 * 3600)  # five ticks pass with no worker running
    assert harness.run_pass().scheduled == 1
    assert ticks(harness) == [iso(0), iso(5)]
    stored = harness.orchestrator.query(name="Nightly", limit=1).pipelines[0]
    assert stored.key == f"schedule:Nightly:{iso(5)}"


def test_all_creates_every_missed_tick_in_order(registry: Registry) -> None:
    scheduled(registry, every=timedelta(hours=1), catch_up="all")
    harness = Harness(registry=registry, clock=FakeClock(START))
    harness.run_pass()
    harness.clock.advance(5 * 3600)
    assert harness.run_pass().scheduled == 5
    assert ticks(harness) == [iso(h) for h in range(6)]


def test_all_starts_with_the_newest_tick_when_the_schedule_never_ran(registry: Registry) -> None:
    scheduled(registry, every=timedelta(minutes=1), catch_up="all")
    harness = Harness(registry=registry, clock=FakeClock(START))
    assert harness.run_pass().scheduled == 1  # not a backfill of every minute since 1970


def test_none_skips_ticks_no_worker_saw_in_time(registry: Registry) -> None:
    scheduled(registry, every=timedelta(hours=1), catch_up="none", schedule_grace=120)
    harness = Harness(registry=registry, clock=FakeClock(START))
    assert harness.run_pass().scheduled == 1  # 30 s after the tick: within the grace
    harness.clock.advance(5 * 3600 + 600)  # the newest tick is 10 minutes old
    assert harness.run_pass().scheduled == 0
    harness.clock.advance(3600 - 600)  # just after the next tick
    assert harness.run_pass().scheduled == 1
    assert ticks(harness) == [iso(0), iso(6)]


def test_cron_in_a_time_zone_with_params_per_tick(registry: Registry) -> None:
    scheduled(
        registry,
        schedule="0 3 * * *",
        schedule_tz="Europe/Berlin",
        schedule_params=lambda tick: {"day": tick.date().isoformat()},
    )
    clock = FakeClock(datetime(2026, 11, 23, 2, 30, tzinfo=timezone.utc))  # 03:30 in Berlin (UTC+1)
    harness = Harness(registry=registry, clock=clock)
    harness.run_pass()
    (pipeline,) = harness.orchestrator.query(name="Nightly").pipelines
    assert pipeline.context["schedule_tick"] == "2026-11-23T02:00:00+00:00"
    assert pipeline.params == {"day": "2026-11-23"}
    assert harness.orchestrator.get(pipeline.uuid).steps[0].output == {"tick": "2026-11-23T02:00:00+00:00"}
    nxt = schedule_of(registry.pipeline("Nightly"))
    assert nxt is not None
    assert nxt.upcoming(clock.now(), 2) == [
        datetime(2026, 11, 24, 2, tzinfo=timezone.utc),
        datetime(2026, 11, 25, 2, tzinfo=timezone.utc),
    ]


def test_a_schedule_whose_params_are_refused_is_logged_and_the_pass_goes_on(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    from pydantic import BaseModel

    class Needs(BaseModel):
        region: str

    scheduled(registry, every=timedelta(hours=1), Params=Needs)
    other = pipeline_of(step_of("Other", lambda self: None), name="Other")
    harness = Harness(registry=registry, clock=FakeClock(START))
    run = harness.create(other)
    summary = harness.run_pass()
    assert summary.scheduled == 0 and summary.finished == 1
    assert harness.orchestrator.get(run.uuid).pipeline.status.value == "finished"
    assert "schedule of Nightly: invalid params for pipeline Nightly" in caplog.text


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ({"schedule": "61 * * * *"}, "schedule '61 * * * *' is not a cron expression"),
        ({"schedule": "0 3 * * *", "every": timedelta(hours=1)}, "not both"),
        ({"every": 60}, "every must be a timedelta of at least 1 second"),
        ({"every": timedelta(hours=1), "catch_up": "some"}, "catch_up must be one of latest, all, none"),
        ({"schedule": "0 3 * * *", "schedule_tz": "Mars/Olympus"}, "schedule_tz 'Mars/Olympus' is not a time zone"),
        ({"every": timedelta(hours=1), "schedule_params": "x"}, "schedule_params must be a dict or a function"),
    ],
)
def test_bad_declarations_are_refused_at_registration(
    registry: Registry, declaration: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegistrationError, match=message.replace("*", r"\*")):
        scheduled(registry, **declaration)


def test_no_schedule_costs_no_query(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline_of(step_of("Plain", lambda self: None), name="Plain")
    harness = Harness(registry=registry, clock=FakeClock(START))
    calls: list[str] = []
    original = harness.orchestrator.store.get_pipeline
    monkeypatch.setattr(harness.orchestrator.store, "get_pipeline", lambda uuid: calls.append(uuid) or original(uuid))
    harness.run_pass()
    assert calls == []
    assert isinstance(harness.orchestrator, Orchestrator)
