"""Versions: in-flight pipelines keep the version they started with after a deploy adds v2.

Run: python docs/examples/versions.py
"""

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness


@register_step
class QuoteV1(OnStartMixin, Step):
    name = "Quote"

    def on_start(self):
        self.finish({"price": 100, "currency": "EUR"})


@register_pipeline
class PricingV1(Pipeline):
    name = "Pricing"
    steps = [QuoteV1]


h = Harness()
old = h.create(PricingV1)  # created before the deploy: pinned to version 1


# --- the deploy: version 2 of the step and of the pipeline, beside version 1 ---
@register_step
class QuoteV2(OnStartMixin, Step):
    name = "Quote"
    version = 2

    def on_start(self):
        self.finish({"price": 90, "currency": "EUR", "discount": "10%"})


@register_pipeline
class PricingV2(Pipeline):
    name = "Pricing"
    version = 2
    steps = [QuoteV2]


new = h.create(PricingV2)  # new pipelines take the newest...
pinned = h.create(PricingV2, version=1)  # ...or the version asked for
h.run_pass()
for label, run in (("old", old), ("new", new), ("pinned", pinned)):
    state = h.orchestrator.get(run.uuid)
    print(label, f"v{state.pipeline.version}", state.steps[0].output)
