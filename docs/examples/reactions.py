"""Reactions: when an order pipeline finishes, start a notification pipeline, exactly once per
event (even if the worker dies mid-reaction).

Run: python docs/examples/reactions.py
"""

from pydantic import BaseModel

from prorch import OnStartMixin, Pipeline, Step, on_event, register_pipeline, register_step
from prorch.testing import Harness


@register_step
class Ship(OnStartMixin, Step):
    name = "Ship"

    def on_start(self):
        self.finish({"tracking": "TRK-" + self.pipeline_uuid[:6]})


@register_pipeline
class Order(Pipeline):
    name = "Order"
    steps = [Ship]


@register_step
class Email(OnStartMixin, Step):
    name = "Email"

    def on_start(self):
        print("  emailing the customer about order", self.params.order[:8])


@register_pipeline
class Notify(Pipeline):
    name = "Notify"
    steps = [Email]

    class Params(BaseModel):
        order: str


@on_event("pipeline.finished", pipeline="Order")
def notify_customer(event, ctx):
    ctx.start(Notify, {"order": event.pipeline_uuid})  # started once per event, even on a re-run


h = Harness(concurrency=1)  # one hook at a time, so the prints come out in order
for _ in range(2):
    h.create(Order)
h.run_pass()  # the orders finish; one reaction task per finished order is stored with the event
h.run_pass()  # the reactions run and start Notify pipelines; a third pass runs those
h.run_pass()
print("notifications:", len(h.orchestrator.list_pipelines(name="Notify", status="finished")))
