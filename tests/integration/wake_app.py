"""The pipelines of the wake-up tests' worker processes (``--app tests.integration.wake_app``):
each hook that counts writes the moment it ran to ``$WAKE_LOG/<pipeline uuid>.<what>``, so that a
test can tell how long after its create or send the worker got going."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step

FAR = 3600.0
"""A wait no test sits out: only a message (or the poll interval's safety net) ends it early."""


def stamp(step: Step, what: str) -> None:
    folder = os.environ.get("WAKE_LOG")
    if folder:
        path = Path(folder) / f"{step.pipeline_uuid}.{what}"
        path.write_text(repr(time.time()))


@register_step
class WakeBegin(OnStartMixin, Step):
    name = "WakeBegin"

    def on_start(self) -> None:
        stamp(self, "start")


@register_step
class WakeInbox(OnStartMixin, OnContinueMixin, Step):
    """Waits for the message ``go``; writes ``.go`` once it has read it."""

    name = "WakeInbox"

    def on_start(self) -> None:
        stamp(self, "parked")
        self.wait(seconds=FAR)

    def on_continue(self) -> None:
        if self.receive("go") is None:
            self.wait(seconds=FAR)
            return
        stamp(self, "go")
        self.finish()


@register_step
class WakeSlow(OnStartMixin, Step):
    """Holds its slot until ``$WAKE_LOG/release`` exists (60 s at most); writes ``.start`` first."""

    name = "WakeSlow"

    def on_start(self) -> None:
        stamp(self, "start")
        release = Path(os.environ.get("WAKE_LOG", ".")) / "release"
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


@register_pipeline
class Slow(Pipeline):
    name = "WakeSlow"
    steps = [WakeSlow]


@register_pipeline
class Stamp(Pipeline):
    name = "WakeStamp"
    steps = [WakeBegin]


@register_pipeline
class Mailbox(Pipeline):
    name = "WakeMailbox"
    steps = [WakeInbox]
