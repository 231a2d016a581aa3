"""Recurring schedules (issue #15): which ticks a pass creates under each catch-up policy, cron
schedules in a time zone, params per tick, and one clear error for a bad declaration. The
clock is a FakeClock; tests/integration/test_schedule_workers.py runs real worker processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel

from prorch import FakeClock, RegistrationError
from prorch.model.registry import Registry
from prorch.model.schedule_rules import Schedule, schedule_of
from prorch.testing import Harness
from tests.support.builders import pipeline_of, step_of

START = datetime(2026, 11, 23, 12, 0, 30, tzinfo=timezone.utc)


class Region(BaseModel):
    region: str


def scheduled(registry: Registry, **declaration: Any) -> type:
    step = step_of("Tick", lambda self: self.finish({"tick": self.context.get("schedule_tick")}))
    return pipeline_of(step, name="Nightly", **declaration)


def ticks(harness: Harness) -> list[str]:
    found = harness.orchestrator.store.all_pipelines()
    return sorted(p.context["schedule_tick"] for p in found if p.name == "Nightly")


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


def test_a_schedule_whose_params_are_refused_is_an_error_of_the_pass_and_the_pass_goes_on(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (#25 item 15): refused params were logged, but the pass reported errors 0."""
    from pydantic import BaseModel

    class Needs(BaseModel):
        region: str

    scheduled(registry, every=timedelta(hours=1), Params=Needs, schedule_params=lambda tick: {"area": "x"})
    other = pipeline_of(step_of("Other", lambda self: None), name="Other")
    harness = Harness(registry=registry, clock=FakeClock(START))
    run = harness.create(other)
    summary = harness.run_pass()
    assert summary.scheduled == 0 and summary.finished == 1
    assert harness.orchestrator.get(run.uuid).pipeline.status.value == "finished"
    assert "invalid params for pipeline Nightly" in summary.errors["schedule:Nightly"]
    assert "schedule of Nightly failed: invalid params for pipeline Nightly" in caplog.text


def test_a_raising_schedule_params_is_an_error_of_the_pass_and_the_pass_goes_on(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (#25 item 4): user code raising in schedule_params killed the pass (and the worker)."""

    def broken(tick: datetime) -> dict[str, Any]:
        raise RuntimeError("the params service is down")

    scheduled(registry, every=timedelta(hours=1), schedule_params=broken)
    other = pipeline_of(step_of("Other", lambda self: None), name="Other")
    harness = Harness(registry=registry, clock=FakeClock(START))
    run = harness.create(other)
    summary = harness.run_pass()
    assert summary.finished == 1 and summary.scheduled == 0
    assert harness.orchestrator.get(run.uuid).pipeline.status.value == "finished"
    assert summary.errors == {"schedule:Nightly": "RuntimeError: the params service is down"}
    assert "schedule of Nightly failed" in caplog.text and "the params service is down" in caplog.text
    assert harness.run_pass().errors == {"schedule:Nightly": "RuntimeError: the params service is down"}
    assert ticks(harness) == []  # the tick is not marked created: a fixed deploy creates it


def test_a_leap_day_schedule_catching_up_all_runs(registry: Registry) -> None:
    """Regression (#25 item 4): looking back 1,000 leap days raised OverflowError on every pass."""
    scheduled(registry, schedule="0 0 29 2 *", catch_up="all")
    harness = Harness(registry=registry, clock=FakeClock(START))
    summary = harness.run_pass()
    assert summary.errors == {} and summary.scheduled == 1
    assert ticks(harness) == ["2024-02-29T00:00:00+00:00"]
    harness.clock.advance(8 * 366 * 86400)  # two leap days missed (2028, 2032)
    assert harness.run_pass().scheduled == 2
    assert ticks(harness) == ["2024-02-29T00:00:00+00:00", "2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"]


def test_all_means_all_after_a_stop_of_more_than_a_thousand_ticks(registry: Registry) -> None:
    """Regression (#25 item 9): a stop of 1,000 ticks or more created only the newest. Now every
    missed tick is created, oldest first, a bounded batch per pass."""
    from prorch.features.schedules import CATCH_UP_BATCH

    scheduled(registry, every=timedelta(minutes=1), catch_up="all")
    harness = Harness(registry=registry, clock=FakeClock(START))
    assert harness.run_pass().scheduled == 1
    harness.clock.advance(2500 * 60)
    per_pass = []
    while (created := harness.run_pass().scheduled) and len(per_pass) < 100:
        per_pass.append(created)
    assert sum(per_pass) == 2500 and max(per_pass) <= CATCH_UP_BATCH and len(per_pass) > 1
    first = datetime(2026, 11, 23, 12, tzinfo=timezone.utc)
    assert ticks(harness) == sorted((first + timedelta(minutes=m)).isoformat() for m in range(2501))


def test_a_tick_whose_pipeline_was_deleted_is_not_created_again(registry: Registry) -> None:
    """Regression (#25 item 3): retention purged a tick's pipeline and the next pass created it again."""
    scheduled(registry, schedule="0 0 1 * *", catch_up="all")
    harness = Harness(registry=registry, clock=FakeClock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc)))
    assert harness.run_pass().scheduled == 1
    harness.run_pass()
    harness.clock.advance(30 * 86400 + 60)  # January 31: "retention = 30d"
    assert harness.orchestrator.purge(timedelta(days=30)).pipelines == 1
    assert harness.run_pass().scheduled == 0
    assert ticks(harness) == []
    harness.clock.advance(86400 - 60)  # February 1
    assert harness.run_pass().scheduled == 1
    assert ticks(harness) == ["2026-02-01T00:00:00+00:00"]


def test_a_cron_tick_exactly_at_now_is_created_in_that_pass(registry: Registry) -> None:
    scheduled(registry, schedule="0 3 * * *")
    harness = Harness(registry=registry, clock=FakeClock(datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc)))
    assert harness.run_pass().scheduled == 1
    assert ticks(harness) == ["2026-11-23T03:00:00+00:00"]
    harness.clock.advance(24 * 3600 - 0.001)  # a millisecond before the next one
    assert harness.run_pass().scheduled == 0
    harness.clock.advance(0.001)
    assert harness.run_pass().scheduled == 1


def test_every_second_is_the_shortest_interval_and_ticks_each_second(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match="at least 1 second"):
        scheduled(registry, every=timedelta(milliseconds=999))
    scheduled(registry, every=timedelta(seconds=1), catch_up="all")
    harness = Harness(registry=registry, clock=FakeClock(START))
    assert harness.run_pass().scheduled == 1
    harness.clock.advance(0.999)
    assert harness.run_pass().scheduled == 0
    harness.clock.advance(2.001)
    assert harness.run_pass().scheduled == 3
    assert ticks(harness) == [(START + timedelta(seconds=s)).isoformat() for s in range(4)]


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ({"schedule": "61 * * * *"}, "schedule '61 * * * *' is not a cron expression"),
        ({"schedule": "0 3 * * *", "every": timedelta(hours=1)}, "not both"),
        ({"every": 60}, "every must be a timedelta of at least 1 second"),
        ({"every": timedelta(hours=1), "catch_up": "some"}, "catch_up must be one of latest, all, none"),
        ({"schedule": "0 3 * * *", "schedule_tz": "Mars/Olympus"}, "schedule_tz 'Mars/Olympus' is not a time zone"),
        ({"every": timedelta(hours=1), "schedule_params": "x"}, "schedule_params must be a dict or a function"),
        ({"every": timedelta(hours=1), "catch_up": "none", "schedule_grace": "60s"}, "schedule_grace must be"),
        ({"every": timedelta(hours=1), "catch_up": "none", "schedule_grace": -1}, "schedule_grace must be"),
        ({"every": timedelta(hours=1), "Params": Region}, "schedule_params {} are refused by Params"),
        ({"every": timedelta(hours=1), "Params": Region, "schedule_params": {"region": 3}}, "refused by Params"),
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
    store = harness.orchestrator.store
    calls: list[str] = []
    for method in ("get_pipeline", "schedule_ticks"):
        original = getattr(store, method)
        monkeypatch.setattr(store, method, lambda *a, _m=method, _o=original: calls.append(_m) or _o(*a))
    harness.run_pass()
    assert calls == []
    scheduled(registry, every=timedelta(hours=1))  # the control: a schedule is read
    harness.run_pass()
    assert calls[0] == "schedule_ticks"
    calls.clear()
    harness.run_pass()  # its tick is created: one read of the last ticks, and nothing else
    assert calls == ["schedule_ticks"]


# --- the declaration read by schedule_of, and the ticks a Schedule computes (no store) ------------


def declared(**attrs: Any) -> Schedule:
    found = schedule_of(type("Declared", (), {"name": "Nightly", **attrs}))
    assert found is not None
    return found


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_what_a_declaration_reads_when_left_out() -> None:
    assert schedule_of(type("Plain", (), {})) is None
    every = declared(every=timedelta(hours=1))
    assert (every.tz, every.catch_up, every.params) == (timezone.utc, "latest", None)
    assert every.grace == timedelta(seconds=60)
    assert declared(every=timedelta(hours=1), schedule_tz=None).tz is timezone.utc
    with pytest.raises(RegistrationError, match=r"^pipeline Unnamed: every must be"):
        schedule_of(type("Unnamed", (), {"every": 60}))


@pytest.mark.parametrize(
    ("grace", "read"),
    [(0, timedelta(0)), (90.5, timedelta(seconds=90.5)), (timedelta(minutes=2), timedelta(minutes=2))],
)
def test_a_grace_of_seconds_or_a_timedelta_not_negative_is_read(grace: Any, read: timedelta) -> None:
    assert declared(every=timedelta(hours=1), schedule_grace=grace).grace == read


@pytest.mark.parametrize("grace", [True, float("inf"), float("nan"), timedelta(seconds=-1)])
def test_a_grace_that_is_no_length_of_time_is_refused(grace: Any) -> None:
    with pytest.raises(RegistrationError, match=r"^pipeline Nightly: schedule_grace must be .* e\.g\. schedule_grace"):
        declared(every=timedelta(hours=1), schedule_grace=grace)


def test_every_ticks_at_whole_multiples_since_the_epoch() -> None:
    hourly = declared(every=timedelta(hours=1))
    assert hourly.latest(at("2026-11-23T12:00:30+00:00")) == at("2026-11-23T12:00:00+00:00")
    assert hourly.latest(at("2026-11-23T13:00:00+00:00")) == at("2026-11-23T13:00:00+00:00")
    backwards = hourly.backwards(at("2026-11-23T12:59:59+00:00"))
    assert [next(backwards) for _ in range(3)] == [at(f"2026-11-23T{h}:00:00+00:00") for h in (12, 11, 10)]
    after = hourly.after(at("2026-11-23T12:00:00+00:00"))
    assert [next(after) for _ in range(2)] == [at(f"2026-11-23T{h}:00:00+00:00") for h in (13, 14)]
    assert hourly.upcoming(at("2026-11-23T12:00:00+00:00"), 3) == [
        at(f"2026-11-23T{h}:00:00+00:00") for h in (13, 14, 15)
    ]
    assert hourly.description == "every 1:00:00"


def test_cron_ticks_in_its_time_zone_are_read_in_utc() -> None:
    nightly = declared(schedule="0 3 * * *", schedule_tz="Europe/Berlin")  # 02:00 UTC in winter
    tick = at("2026-11-23T02:00:00+00:00")
    assert nightly.latest(tick) == tick
    assert nightly.latest(tick - timedelta(microseconds=1)) == tick - timedelta(days=1)
    backwards = nightly.backwards(tick)
    assert [next(backwards), next(backwards)] == [tick, tick - timedelta(days=1)]
    after = nightly.after(tick)
    assert [next(after), next(after)] == [tick + timedelta(days=1), tick + timedelta(days=2)]
    assert nightly.upcoming(tick, 2) == [tick + timedelta(days=1), tick + timedelta(days=2)]
    assert nightly.description == "cron '0 3 * * *' (Europe/Berlin)"
    assert nightly.key(tick.astimezone(nightly.tz)) == "schedule:Nightly:2026-11-23T02:00:00+00:00"


def test_params_per_tick_are_a_copy_of_the_dict_or_the_functions_result() -> None:
    fixed = {"region": "eu"}
    tick = at("2026-11-23T02:00:00+00:00")
    params = declared(every=timedelta(hours=1), schedule_params=fixed).params_for(tick)
    assert params == fixed and params is not fixed
    assert declared(every=timedelta(hours=1)).params_for(tick) == {}
    assert declared(every=timedelta(hours=1), schedule_params=lambda t: {"at": t}).params_for(tick) == {"at": tick}


def test_a_cron_declaration_that_is_no_expression_is_refused_with_why() -> None:
    with pytest.raises(RegistrationError, match=r"^pipeline Nightly: schedule '0 0 30 2 \*' is not .* \(Bad day-of"):
        declared(schedule="0 0 30 2 *")
    with pytest.raises(RegistrationError, match=r"^pipeline Nightly: schedule must be a cron string"):
        declared(schedule=3)


def test_every_after_a_tick_off_its_grid_goes_back_to_the_grid() -> None:
    """The last stored tick of a schedule whose interval changed (half-hourly, now hourly)."""
    after = declared(every=timedelta(hours=1)).after(at("2026-11-23T12:30:00+00:00"))
    assert [next(after), next(after)] == [at("2026-11-23T13:00:00+00:00"), at("2026-11-23T14:00:00+00:00")]


@pytest.fixture
def local_tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The machine's local time zone is Asia/Tokyo (UTC+9)."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_tokyo")
def test_cron_ticks_and_keys_are_in_utc_whatever_the_machines_zone() -> None:
    nightly = declared(schedule="0 3 * * *", schedule_tz="Europe/Berlin")
    tick = at("2026-11-23T02:00:00+00:00")
    found = [nightly.latest(tick), next(nightly.after(tick)), *nightly.upcoming(tick, 1)]
    assert [t.isoformat() for t in found] == [
        "2026-11-23T02:00:00+00:00", "2026-11-24T02:00:00+00:00", "2026-11-24T02:00:00+00:00",
    ]  # fmt: skip
    assert nightly.key(tick) == "schedule:Nightly:2026-11-23T02:00:00+00:00"


def test_fixed_params_that_params_accepts_are_accepted_and_refused_ones_say_how_to_fix(registry: Registry) -> None:
    """In its own registry: its hourly Nightly in the default one made another test's pass create
    a tick's pipeline (the audit log test, after 09:00 UTC)."""
    flow = pipeline_of(step_of("Tick", lambda self: None), name="Nightly", every=timedelta(hours=1), Params=Region,
                       schedule_params={"region": "eu"})  # fmt: skip
    assert flow.name == "Nightly"
    with pytest.raises(RegistrationError, match=r"\); set schedule_params to params that Params accepts"):
        pipeline_of(step_of("Tock", lambda self: None), name="Other", every=timedelta(hours=1), Params=Region)


def test_a_schedule_whose_ticks_cannot_be_computed_is_refused_with_why() -> None:
    with pytest.raises(
        RegistrationError,
        match=r"^pipeline Nightly: the ticks of every 999999999 days, 0:00:00 cannot be computed "
        r"\(OverflowError\(.*\); check the expression against a calendar$",
    ):
        declared(every=timedelta(days=999_999_999))
