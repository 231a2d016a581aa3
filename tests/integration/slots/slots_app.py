"""A worker's app for the slot tests: hooks that sleep and log their own start and end."""

import os
import time

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step


def log(event: str, uuid: str) -> None:
    with open(os.environ["SLOTS_LOG"], "a") as out:
        out.write(f"{event} {uuid} {time.time()}\n")


class Sleeping(OnStartMixin, Step):
    seconds = 0.0

    def on_start(self) -> None:
        log("start", self.pipeline_uuid)
        time.sleep(self.seconds)
        log("end", self.pipeline_uuid)
        self.finish({})


@register_step
class SlowSleep(Sleeping):
    name = "SlowSleep"
    seconds = 20.0


@register_step
class MidSleep(Sleeping):
    name = "MidSleep"
    seconds = 2.0


@register_step
class QuickSleep(Sleeping):
    name = "QuickSleep"
    seconds = 0.3


@register_pipeline
class Slow(Pipeline):
    name = "Slow"
    steps = [SlowSleep]


@register_pipeline
class Mid(Pipeline):
    name = "Mid"
    steps = [MidSleep]


@register_pipeline
class Quick(Pipeline):
    name = "Quick"
    steps = [QuickSleep]
