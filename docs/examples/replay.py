"""Replay: check recorded pipelines against changed code before deploying it (a CI gate).

Run: python docs/examples/replay.py
"""

import tempfile
from pathlib import Path

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness, isolated_registry, replay


@register_step
class Pack(OnStartMixin, Step):
    name = "Pack"

    def on_start(self):
        self.finish({"boxes": 2})


def deployed_code():
    @register_step
    class Ship(OnStartMixin, OnContinueMixin, Step):
        name = "Ship"

        def on_start(self):
            self.wait(seconds=3600)  # waits for the carrier

        def on_continue(self):
            self.finish({"shipped": True})

    @register_pipeline
    class Order(Pipeline):
        name = "Order"
        steps = [Pack, Ship]


def changed_code():  # the change under review: Ship removed in place, without a new version
    @register_pipeline
    class Order(Pipeline):
        name = "Order"
        steps = [Pack]


def load(code):
    with isolated_registry() as registry:
        registry.add_step(Pack)
        code()
    return registry


url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'prod-copy.db'}"
deployed = load(deployed_code)
production = Harness(url, registry=deployed)
for _ in range(2):
    production.create(deployed.pipeline("Order"))
production.run_pass()  # both orders packed, waiting in Ship

print("deployed code:", replay(url, registry=deployed).text())
report = replay(url, registry=load(changed_code))
print("changed code:", "ok" if report.ok else "fails")
print(report.text())
