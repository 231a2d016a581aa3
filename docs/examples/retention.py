"""Retention: delete finished pipelines once they are 30 days old, with their steps, events and
messages, in short batches. Workers do it by themselves with the `retention` setting
(`PRORCH_RETENTION=30d`); `prorch purge --older-than 30d` does it from cron.

Run: python docs/examples/retention.py
"""

from datetime import datetime, timedelta, timezone

from prorch import FakeClock, OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness


@register_step
class Send(OnStartMixin, Step):
    name = "Send"

    def on_start(self):
        self.finish({"sent": True})


@register_pipeline
class Newsletter(Pipeline):
    name = "Newsletter"
    steps = [Send]


clock = FakeClock(datetime(2026, 10, 1, tzinfo=timezone.utc))
h = Harness(clock=clock)
for _ in range(5):
    h.create(Newsletter)
h.run_pass()
clock.advance(40 * 86400)  # forty days later
h.create(Newsletter)
h.run_pass()
print("would purge:", h.orchestrator.purge(timedelta(days=30), dry_run=True).pipelines)
done = h.orchestrator.purge(timedelta(days=30), batch_size=2)
print(f"purged {done.pipelines} in {done.batches} batches; left: {h.orchestrator.query(count=True).total}")
