"""Tenant plugins: one step, customer-specific behaviour chosen by the pipeline's tenant.

Run: python docs/examples/plugins.py
"""

from pydantic import BaseModel

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_plugin, register_step
from prorch.testing import Harness


@register_step
class SendInvoice(OnStartMixin, Step):
    name = "SendInvoice"
    plugin_points = {"render": ("amount",)}  # the point and the keyword arguments it passes

    def on_start(self):
        self.finish({"lines": self.plugins("render", amount=self.params.amount)})


@register_pipeline
class Billing(Pipeline):
    name = "Billing"
    steps = [SendInvoice]

    class Params(BaseModel):
        amount: float


@register_plugin(step=SendInvoice, point="render")  # every tenant
def total(step, amount):
    return f"Total: {amount:.2f} EUR"


@register_plugin(step=SendInvoice, point="render", tenant="acme")  # only acme's pipelines
def acme_po_number(step, amount):
    return "PO: ACME-" + step.pipeline_uuid[:6]


h = Harness()
acme = h.create(Billing, {"amount": 120}, tenant="acme")
other = h.create(Billing, {"amount": 80}, tenant="globex")
h.run_pass()
for run in (acme, other):
    state = h.orchestrator.get(run.uuid)
    print(state.pipeline.context["tenant"], state.steps[0].output["lines"])
