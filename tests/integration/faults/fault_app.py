"""Pipelines for the fault tests, run by real worker processes. Every hook appends
``event pid pipeline time`` to the file named by FAULT_LOG (one short O_APPEND write a line, so
lines from several processes never mix)."""

from __future__ import annotations

import os
import time

from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step


def note(event: str, step: Step) -> None:
    path = os.environ.get("FAULT_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"{event} {os.getpid()} {step.pipeline_uuid} {time.time():.6f}\n")


@register_step
class Sleep(OnStartMixin, Step):
    """Sleeps ``params['seconds']`` (at most ``$FAULT_SLEEP_CAP`` seconds, for a worker that
    resumes a long hook another worker started)."""

    name = "Sleep"

    def on_start(self) -> None:
        note("start", self)
        time.sleep(min(float(self.params.get("seconds", 3)), float(os.environ.get("FAULT_SLEEP_CAP", "inf"))))
        note("end", self)


@register_pipeline
class Slow(Pipeline):
    name = "Slow"
    steps = [Sleep]


@register_step
class Kill(OnStartMixin, Step):
    """Kills its worker, as a segfault would."""

    name = "Kill"

    def on_start(self) -> None:
        note("start", self)
        os._exit(1)


@register_pipeline
class Culprit(Pipeline):
    name = "Culprit"
    steps = [Kill]


@register_step
class Hang(OnStartMixin, Step):
    """Never returns; its step allows it 2 seconds."""

    name = "Hang"
    timeout = 2

    def on_start(self) -> None:
        note("start", self)
        time.sleep(3600)

    def on_timeout(self) -> None:
        note("timeout", self)


@register_pipeline
class Hung(Pipeline):
    name = "Hung"
    steps = [Hang]


@register_step
class HangForever(OnStartMixin, Step):
    """Never returns, and its step sets no timeout."""

    name = "HangForever"

    def on_start(self) -> None:
        note("start", self)
        time.sleep(3600)


@register_pipeline
class HungNoLimit(Pipeline):
    name = "HungNoLimit"
    steps = [HangForever]


@register_step
class Interrupt(OnStartMixin, Step):
    name = "Interrupt"

    def on_start(self) -> None:
        note("start", self)
        raise KeyboardInterrupt


@register_pipeline
class Interrupts(Pipeline):
    name = "Interrupts"
    steps = [Interrupt]


@register_step
class Inbox(OnStartMixin, OnContinueMixin, Step):
    """Takes every 'tick' sent to it, writing each payload to the log as it does; finishes on 'stop'."""

    name = "Inbox"

    def on_start(self) -> None:
        self.metadata["count"] = 0

    def on_continue(self) -> None:
        while (payload := self.receive("tick")) is not None:
            note(f"tick:{payload}", self)
            self.metadata["count"] += 1
        if self.receive("stop") is not None:
            self.finish({"count": self.metadata["count"]})
        else:
            self.wait(seconds=3600)


@register_pipeline
class Mailbox(Pipeline):
    name = "Mailbox"
    steps = [Inbox]


@register_step
class Emitter(OnContinueMixin, Step):
    """Emits two entries in on_start; in on_continue emits two more and, with ``$STREAM_BLOCK``
    set, blocks before returning (its worker is SIGKILLed there), else finishes."""

    name = "Emitter"

    def on_start(self) -> None:
        for value in ("a", "b"):
            self.emit({"v": value, "pid": os.getpid()})

    def on_continue(self) -> None:
        for value in ("c", "d"):
            self.emit({"v": value, "pid": os.getpid()})
        if os.environ.get("STREAM_BLOCK"):
            note("blocked", self)
            time.sleep(300)
        self.finish()


@register_pipeline
class Streaming(Pipeline):
    name = "Streaming"
    steps = [Emitter]


@register_step
class Reporter(OnStartMixin, Step):
    """Reports progress, then blocks until the file ``$PROGRESS_GATE`` exists (at most a
    minute), then reports its last progress and finishes: its progress is read while it runs."""

    name = "Reporter"

    def on_start(self) -> None:
        self.progress(1, 3, note="first")
        self.progress(2, 3, note="throttled")  # within the half second: kept for the transition
        note("reporting", self)
        gate, deadline = os.environ.get("PROGRESS_GATE", ""), time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.progress(3, 3, note="done")
        self.finish()


@register_pipeline
class Reporting(Pipeline):
    name = "Reporting"
    steps = [Reporter]


@register_step
class Sleeper(OnStartMixin, Step):
    """Blocks until the file ``$FREEZE_GATE.<pid>`` exists (at most a minute; its worker is
    frozen there), then writes at once: ``emit(now=True)`` and a live ``progress()``, each with
    this process's pid, noting whether the emit was refused; then finishes."""

    name = "Sleeper"

    def on_start(self) -> None:
        note("asleep", self)
        gate, deadline = f"{os.environ.get('FREEZE_GATE', '')}.{os.getpid()}", time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self.emit({"pid": os.getpid()}, now=True)
        except Exception as exc:
            note(f"emit-refused:{type(exc).__name__}", self)
        else:
            note("emit-stored", self)
        self.progress(1, 2, note=str(os.getpid()))
        note("awake", self)
        self.finish()


@register_pipeline
class Freezing(Pipeline):
    name = "Freezing"
    steps = [Sleeper]
