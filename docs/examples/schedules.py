"""Schedules: a report every night at 03:00 Berlin time, run by whatever workers are up; one
pipeline per tick however many workers see it, and missed nights caught up.

Run: python docs/examples/schedules.py
"""

from datetime import datetime, timezone

from pydantic import BaseModel

from prorch import FakeClock, OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness


@register_step
class BuildReport(OnStartMixin, Step):
    name = "BuildReport"

    def on_start(self):
        self.finish({"report": f"sales-{self.params.day}.pdf"})


@register_pipeline
class NightlyReport(Pipeline):
    name = "NightlyReport"
    steps = [BuildReport]

    class Params(BaseModel):
        day: str

    schedule = "0 3 * * *"  # cron: minute hour day month weekday
    schedule_tz = "Europe/Berlin"
    schedule_params = lambda tick: {"day": tick.date().isoformat()}  # noqa: E731 - the params of each tick
    catch_up = "all"  # after a stop, create every missed night (default "latest": only the newest)


clock = FakeClock(datetime(2026, 11, 23, 2, 30, tzinfo=timezone.utc))  # 03:30 in Berlin
h = Harness(clock=clock)
print("first pass created:", h.run_pass().scheduled)
print("again, same night:", h.run_pass().scheduled)  # the tick's key makes it once only
clock.advance(3 * 24 * 3600)  # no worker ran for three nights
print("after three nights:", h.run_pass().scheduled)
for p in sorted(h.orchestrator.query(name="NightlyReport").pipelines, key=lambda p: p.params["day"]):
    print(p.params["day"], p.status.value, h.orchestrator.get(p.uuid).steps[0].output)
