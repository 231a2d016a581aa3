"""Schemas: Params and Output are pydantic models; bad params store nothing, a bad output fails
the step naming the field, and `prorch schema NAME` prints both as JSON Schema.

Run: python docs/examples/schemas.py
"""

import json

from pydantic import BaseModel

from prorch import InvalidParamsError, OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.cli import pipeline_schema
from prorch.testing import Harness


class Resized(BaseModel):
    url: str
    width: int


@register_step
class Resize(OnStartMixin, Step):
    name = "Resize"
    Output = Resized

    def on_start(self):
        width = self.params.width if self.params.width < 4000 else "huge"
        self.finish({"url": f"https://cdn.example.com/{self.params.image}", "width": width})


@register_pipeline
class Thumbnail(Pipeline):
    name = "Thumbnail"
    steps = [Resize]

    class Params(BaseModel):
        image: str
        width: int = 320


h = Harness()
try:
    h.create(Thumbnail, {"width": "wide"})
except InvalidParamsError as exc:
    print("rejected:", exc)
ok = h.create(Thumbnail, {"image": "cat.png"})
bad = h.create(Thumbnail, {"image": "map.png", "width": 5000})
h.run_pass()
print("ok:", h.orchestrator.get(ok.uuid).steps[0].output)
print("bad:", h.orchestrator.get(bad.uuid).steps[0].error.message.splitlines()[1])
print(json.dumps(pipeline_schema(Thumbnail)["params"]["required"]))
