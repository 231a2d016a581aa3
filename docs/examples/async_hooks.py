"""Async hooks: 20 pipelines whose hooks await (simulated) I/O for 0.2 s each run on the
worker's event loop, 20 at once, so one pass takes about 0.4 s, not 20 x 0.4 s. A hook that
overruns its ``timeout`` is cancelled.

Run: python docs/examples/async_hooks.py
"""

import asyncio

from pydantic import BaseModel

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness

AWAITING = {"now": 0, "peak": 0}


async def call_service(what):  # stands for an HTTP call with httpx.AsyncClient, aiohttp...
    AWAITING["now"] += 1
    AWAITING["peak"] = max(AWAITING["peak"], AWAITING["now"])
    await asyncio.sleep(0.2)
    AWAITING["now"] -= 1
    return {"job": f"job-{what}"}


@register_step
class Submit(OnStartMixin, OnContinueMixin, Step):
    name = "Submit"

    async def on_start(self):
        self.metadata.update(await call_service(self.params.n))

    async def on_continue(self):
        await call_service("status")
        self.finish({"job": self.metadata["job"]})


@register_step
class Stuck(OnStartMixin, Step):
    name = "Stuck"
    timeout = 0.5

    async def on_start(self):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("Stuck was cancelled after its timeout")
            raise


@register_pipeline
class Report(Pipeline):
    name = "Report"
    steps = [Submit]

    class Params(BaseModel):
        n: int


@register_pipeline
class Hangs(Pipeline):
    name = "Hangs"
    steps = [Stuck]


with Harness(concurrency=20) as h:
    runs = [h.create(Report, params={"n": n}) for n in range(20)]
    h.run_pass()
    done = sum(h.status(run.uuid) == "finished" for run in runs)
    print(f"finished {done} of 20 in one pass; hooks awaiting at once, at most: {AWAITING['peak']}")
    print("first output:", h.orchestrator.get(runs[0].uuid).steps[0].output)
    hung = h.create(Hangs)
    h.run_pass()
    print("Hangs:", h.status(hung.uuid), "-", h.orchestrator.get(hung.uuid).steps[0].error.type)
