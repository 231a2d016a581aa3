"""Calling one hook of a step: marked as running in the store first (so that a worker dying in
it is charged to this pipeline alone), bounded in time, and the lease not renewed past that
bound."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from prorch.engine import transitions
from prorch.engine.bounded_calls import HookCaller
from prorch.engine.extension import Extensions
from prorch.engine.journal import Journal
from prorch.engine.policy import Policies
from prorch.engine.state import Run, Writing
from prorch.model import defaults, step_logs
from prorch.model.clock import Clock
from prorch.model.records import ErrorInfo, StepRecord
from prorch.model.step import Step

logger = logging.getLogger(__name__)

OWN_HOOKS = ("on_start", "on_continue")
"""The hooks bounded by the step's deadline; its other hooks get the step's whole ``timeout``."""


class HookInvoker:
    """Calls hooks for the runner, each within its time bound."""

    def __init__(
        self,
        journal: Journal,
        hooks: HookCaller,
        clock: Clock,
        policies: Policies,
        hook_timeout: float | None,
        extensions: Extensions | None = None,
    ) -> None:
        self.journal = journal
        self.hooks = hooks
        self.clock = clock
        self.policies = policies
        self.hook_timeout = hook_timeout
        self.extensions = extensions or Extensions()
        """Their ``around_hook`` (tracing's spans) and ``on_hook_end`` (metrics' timings)."""
        self.log_lines = defaults.STEP_LOG_LINES.default
        """Lines of ``self.log`` kept per attempt of a guarded hook (``step_log_lines``)."""
        self.capture_logging = False
        """Keep ``logging``'s records emitted while a guarded hook runs as well (``capture_logging``)."""

    def bound(self, run: Run, step: StepRecord, now: datetime, *, own_hook: bool) -> float | None:
        """Seconds one hook call may take: until the step's deadline for ``on_start`` and
        ``on_continue``, the step's ``timeout`` for its other hooks, else the default."""
        timeout = self.policies.of(run.classes[step.uuid]).timeout
        if timeout is None:
            return self.hook_timeout
        deadline = transitions.deadline(run, step, self.policies) if own_hook else None
        return (deadline - now).total_seconds() if deadline is not None else timeout

    def call(self, run: Run, step: StepRecord, now: datetime, hook: Callable[[], object], name: str) -> None:
        """Call one hook of ``step``. Raises what the hook raises, or ``HookTimeoutError``. The
        caller marks the hook running first (``Journal.mark_hook_running``), outside its ``try``:
        a store error there is not the hook's."""
        bound = self.bound(run, step, now, own_hook=name in OWN_HOOKS)
        keeper = run.keeper
        if keeper is not None and bound is not None:
            keeper.limit(run.pipeline.uuid, self.clock.now() + timedelta(seconds=bound))
        what = f"{name} of step {step.name} in pipeline {run.pipeline.uuid}"
        ended = False  # returned or raised: whatever its result, the worker did not die in it
        started = time.perf_counter()
        try:
            if self.extensions.around_hook:  # no context manager per hook call otherwise
                with self.extensions.hook_context(run.pipeline, step, name):
                    self.hooks.call(hook, bound, what)
            else:
                self.hooks.call(hook, bound, what)
            ended = True
        except KeyboardInterrupt:
            raise
        except BaseException:
            ended = True
            raise
        finally:
            if self.extensions.on_hook_end:
                seconds = time.perf_counter() - started
                self.extensions.call("on_hook_end", run.pipeline.name, step.name, name, seconds)
            if ended:
                run.pipeline.crashes = 0
            if keeper is not None and bound is not None:
                keeper.limit(run.pipeline.uuid, None)

    def call_guarded(
        self, run: Run, step: StepRecord, now: datetime, name: str, instance: Step | None = None
    ) -> Writing[ErrorInfo | None]:
        """Mark the hook running and call hook ``name`` (``on_timeout``, ``on_rollback``,
        ``on_cancel``) on a fresh step object (or ``instance``); what it raised, or None. Its
        ``self.log`` lines are kept with the step, in an entry naming the hook, for the next
        transition to store, also when it raises."""
        yield from self.journal.mark_hook_running(run)
        target: Step | None = None
        kept = (0, 0)  # the lines and dropped ones a reused instance's earlier hook kept itself
        try:
            target = instance or self.journal.instance(run, step, now)
            before = len(getattr(target, "emitted", ()))  # a reused instance's earlier hook may have emitted
            hook = getattr(target, name)
            buffer = getattr(target, "log_buffer", None)  # a step whose __init__ skips Step's has none
            if buffer is not None:
                kept = (len(buffer.lines), buffer.dropped)
                buffer.cap = kept[0] + self.log_lines
                hook = step_logs.capturing(hook, buffer) if self.capture_logging else hook
            self.call(run, step, now, hook, name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self.keep_logs(step, target, name, kept)
            return ErrorInfo.from_exception(exc, hook=name)
        self.keep_logs(step, target, name, kept)
        self.journal.emitted(run, list(getattr(target, "emitted", ()))[before:], now)  # with the next transition
        return None

    def keep_logs(self, step: StepRecord, target: Step | None, name: str, kept: tuple[int, int]) -> None:
        """The lines hook ``name`` logged (past those ``kept`` before it) join the step's logs, in
        an entry of that hook's attempt (a rollback's count of tries, else the step's attempt)."""
        buffer = getattr(target, "log_buffer", None)
        if buffer is None or not self.log_lines:
            return
        logged = step_logs.since(buffer, *kept)
        if logged:
            attempt = step.rollback_attempt if name == "on_rollback" else step.attempt
            step.logs = step_logs.merged(step.logs, max(attempt, 1), logged, self.log_lines, hook=name)

    def call_on_cancel(self, run: Run, step: StepRecord, now: datetime, instance: Step | None = None) -> Writing[None]:
        """The step is being cancelled: its ``on_cancel`` runs, if it has one. The cancel stands
        whatever it raises; the error is kept on the step for a look."""
        if run.classes[step.uuid].on_cancel is Step.on_cancel:
            return
        error = yield from self.call_guarded(run, step, now, "on_cancel", instance)
        if error is not None:
            step.error = error
            logger.error("on_cancel of step %s in pipeline %s raised %s", step.name, run.pipeline.uuid, error.message)
