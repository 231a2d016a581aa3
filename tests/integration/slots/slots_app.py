"""A worker's app for the slot tests: hooks that sleep and log their own start and end."""

import asyncio
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


class _Overrunning(OnStartMixin, Step):
    """An async hook that runs past its step's timeout on its first two attempts (it is
    cancelled, and logs its end as it unwinds), then returns at once: each attempt's start and
    end are in the log, so two attempts of one pipeline at once would show."""

    timeout = 0.2
    max_attempts = 4
    retry_delay = 0.001  # due again at once: a worker claims it while its advance still ends

    async def on_start(self) -> None:
        log(f"start-{self.name}", self.pipeline_uuid)
        try:
            if self.attempt <= 2:
                await asyncio.sleep(0.3)
        finally:
            log(f"end-{self.name}", self.pipeline_uuid)
        self.finish({})


@register_step
class OverrunFirst(_Overrunning):
    name = "OverrunFirst"


@register_step
class Done(OnStartMixin, Step):
    name = "Done"

    def on_start(self) -> None:
        log("done", self.pipeline_uuid)
        self.finish({})


@register_pipeline
class Overrun(Pipeline):
    name = "Overrun"
    steps = [OverrunFirst, Done]


class _Logged(Step):
    """Every hook it runs (on_start, on_continue, on_rollback, on_cancel) logs its start and end
    as ``hook-start`` / ``hook-end``: the worker's hooks at once can be counted from the log."""

    seconds = 0.15

    def _hook(self, name: str) -> None:
        log("hook-start", f"{self.pipeline_uuid}:{self.name}:{name}")
        time.sleep(self.seconds)
        log("hook-end", f"{self.pipeline_uuid}:{self.name}:{name}")

    def on_rollback(self) -> None:
        self._hook("on_rollback")

    def on_cancel(self) -> None:
        self._hook("on_cancel")


@register_step
class LoggedStep(OnStartMixin, _Logged):
    name = "LoggedStep"

    def on_start(self) -> None:
        self._hook("on_start")
        self.finish({})


@register_step
class LoggedFlaky(OnStartMixin, _Logged):
    """Fails its first attempt, retried at once (due again while its advance still ends in its
    slot), then fails for good: the finished steps before it roll back."""

    name = "LoggedFlaky"
    max_attempts = 2
    retry_delay = 0.001

    def on_start(self) -> None:
        self._hook("on_start")
        raise RuntimeError(f"attempt {self.attempt} fails")


@register_step
class LoggedLong(OnStartMixin, _Logged):
    """A hook long enough to be cancelled while it runs."""

    name = "LoggedLong"
    seconds = 1.0

    def on_start(self) -> None:
        self._hook("on_start")
        self.finish({})


@register_step
class LoggedNext(LoggedStep):
    name = "LoggedNext"


@register_step
class LoggedLast(LoggedStep):
    name = "LoggedLast"


@register_pipeline
class Chain(Pipeline):
    name = "Chain"
    steps = [LoggedStep, LoggedNext, LoggedLast]


@register_pipeline
class Flaky(Pipeline):
    name = "Flaky"
    steps = [LoggedStep, LoggedFlaky]


@register_pipeline
class Cancelled(Pipeline):
    name = "Cancelled"
    steps = [LoggedLong, LoggedStep]


@register_pipeline
class Instant(Pipeline):
    """One instant hook: a worker's hooks are quick."""

    name = "Instant"
    steps = [Done]
