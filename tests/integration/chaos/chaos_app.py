"""The application the chaos test's workers run: pipelines of five steps whose hooks log their
pid, start and end to an append-only file (one write per line, O_APPEND)."""

from __future__ import annotations

import os
import random
import time

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step


def log(kind: str, step: Step) -> None:
    line = f"{kind} {step.pipeline_uuid} {step.name} {os.getpid()} {time.monotonic():.6f}\n"
    fd = os.open(os.environ["CHAOS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Logged(OnStartMixin, Step):
    def on_start(self) -> None:
        log("S", self)
        time.sleep(random.uniform(0, 0.004))
        log("E", self)


@register_step
class One(Logged):
    name = "One"


@register_step
class Two(Logged):
    name = "Two"


@register_step
class Polled(OnStartMixin, OnContinueMixin, Step):
    """Polls twice across passes before finishing."""

    name = "Polled"

    def on_start(self) -> None:
        log("S", self)
        self.metadata["polls"] = 0
        log("E", self)

    def on_continue(self) -> None:
        log("S", self)
        self.metadata["polls"] += 1
        if self.metadata["polls"] >= 2:
            self.finish({"polls": self.metadata["polls"]})
        else:
            self.wait(seconds=0.05)
        log("E", self)


@register_step
class Four(Logged):
    name = "Four"


@register_step
class Five(Logged):
    name = "Five"


@register_pipeline
class ChaosPipeline(Pipeline):
    name = "ChaosPipeline"
    steps = [One, Two, Polled, Four, Five]
