"""Apps for the message and reaction tests with real worker processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prorch import (
    EventRecord,
    OnContinueMixin,
    OnStartMixin,
    Pipeline,
    ReactionContext,
    Step,
    on_event,
    register_pipeline,
    register_step,
)


def log(line: str) -> None:
    fd = os.open(os.environ["INBOX_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


@register_step
class AwaitGo(OnContinueMixin, Step):
    name = "AwaitGo"

    def on_continue(self) -> None:
        payload = self.receive("go")
        if payload is None:
            self.wait(seconds=3600)
        else:
            log(f"R {self.pipeline_uuid} {payload}")
            # a little work: an idle worker wakes within its poll, so one worker that passes
            # again at once for the messages sent meanwhile cannot read all 30 alone
            time.sleep(0.05)
            self.finish({"payload": payload})


@register_pipeline
class Inbox(Pipeline):
    name = "Inbox"
    steps = [AwaitGo]


@register_step
class Produce(OnStartMixin, Step):
    name = "Produce"

    def on_start(self) -> None:
        self.finish({"n": self.params["n"]})


@register_pipeline
class Source(Pipeline):
    name = "Source"
    steps = [Produce]


@register_step
class Consume(OnStartMixin, Step):
    name = "Consume"

    def on_start(self) -> None:
        log(f"T {self.params['source']}")


@register_pipeline
class Target(Pipeline):
    name = "Target"
    steps = [Consume]


@on_event("pipeline.finished", pipeline="Source")
def fan_out(event: EventRecord, ctx: ReactionContext) -> None:
    log(f"X {event.pipeline_uuid}")
    blocker = Path(os.environ["INBOX_LOG"] + ".block")
    if blocker.exists():  # the test SIGKILLs this worker while it sits here
        Path(os.environ["INBOX_LOG"] + ".blocked").write_text(event.pipeline_uuid)
        time.sleep(60)
    ctx.start(Target, {"source": event.pipeline_uuid})
