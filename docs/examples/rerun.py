"""Rerun from a step: an import failed on bad input; fix the input and run again from the
failed step, reusing the download that already finished.

Run: python docs/examples/rerun.py
"""

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness


@register_step
class Download(OnStartMixin, Step):
    name = "Download"

    def on_start(self):
        print("  downloading", self.params["url"])  # slow and costly: not repeated by the rerun
        self.finish({"rows": 3})


@register_step
class Load(OnStartMixin, Step):
    name = "Load"
    max_attempts = 1

    def on_start(self):
        if self.params["table"] == "":
            self.fail("no table given")
        else:
            self.finish({"loaded": self.outputs["Download"]["rows"], "into": self.params["table"]})


@register_pipeline
class Import(Pipeline):
    name = "Import"
    steps = [Download, Load]


h = Harness()
first = h.create(Import, {"url": "https://example.com/data.csv", "table": ""})
h.run_pass()
print("first:", h.status(first.uuid))
# the CLI: prorch rerun UUID --from-step Load -p table=sales
again = h.orchestrator.rerun(first.uuid, "Load", {"table": "sales"})
h.run_pass()
print("rerun:", h.status(again.pipeline.uuid), h.orchestrator.result(again.pipeline.uuid))
print("forked from:", h.orchestrator.get(again.pipeline.uuid).pipeline.metadata["forked_from"])
