"""Concurrency and rate limits: a pipeline that calls a partner's API may run at most one at a
time per customer (tenant) and start at most 3 calls a minute in all. The limits are kept by
the claim, so a worker simply does not take what they leave no room for; it takes it later.

Run: python docs/examples/limits.py
"""

from pydantic import BaseModel

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness


@register_step
class CallPartner(OnStartMixin, Step):
    name = "CallPartner"

    def on_start(self):
        self.finish({"order": self.params.order})


@register_pipeline
class SyncOrder(Pipeline):
    name = "SyncOrder"
    steps = [CallPartner]
    max_running_per_tenant = 1  # one at a time per customer
    rate_limit = "3/minute"  # the partner allows 3 calls a minute

    class Params(BaseModel):
        order: int


h = Harness()
orders = [("acme", 1), ("acme", 2), ("acme", 3), ("globex", 4), ("initech", 5), ("umbrella", 6)]
for tenant, order in orders:
    h.create(SyncOrder, {"order": order}, tenant=tenant)
    h.clock.advance(1)  # due in this order


def synced() -> list[int]:
    done = h.orchestrator.query(name="SyncOrder", status="finished").pipelines
    return sorted(p.params["order"] for p in done)


h.run_pass()
print("first pass:", synced())  # one per customer, and 3 calls: umbrella's waits for room
h.run_pass()
print("same minute:", synced())  # the rate leaves no room until the minute is over
h.clock.advance(60)
h.run_pass()
print("a minute later:", synced())  # acme's next, and umbrella's; acme's last waits its turn
h.run_pass()
print("then:", synced())
