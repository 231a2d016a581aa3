"""One turn of a step: its next hook (``on_start`` or ``on_continue``) and the transition that
records the hook's result: a verdict, a failed attempt and its retry, or a timeout."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from prorch.engine import transitions
from prorch.engine.journal import Journal
from prorch.engine.policy import Policies
from prorch.engine.runtime import HookRuntime
from prorch.engine.state import Run, Writing
from prorch.engine.step_hooks import HookInvoker
from prorch.model import defaults
from prorch.model.clock import Clock
from prorch.model.exceptions import (
    ConcurrentUpdateError,
    HookTimeoutError,
    RepositoryError,
    StepFailed,
    StepTimeoutError,
    StoreUnreachableError,
    UnstorableResultError,
    UnstorableValueError,
)
from prorch.model.jsonvalue import check_json
from prorch.model.mixins import defines_hook
from prorch.model.records import ErrorInfo, StepRecord
from prorch.model.registry import Registry
from prorch.model.status import EventType, Status
from prorch.model.step import Step, Verdict
from prorch.model.step_logs import capturing, merged

logger = logging.getLogger(__name__)

STORE_ATTEMPTS = 10
"""Attempts a step gets, at least, when the store fails to take its results (it may be a blip)."""


class Turns:
    """Runs a step's hooks and records what they decided."""

    def __init__(
        self, journal: Journal, invoker: HookInvoker, registry: Registry, clock: Clock, policies: Policies
    ) -> None:
        self.journal = journal
        self.invoker = invoker
        self.registry = registry
        self.clock = clock
        self.policies = policies
        self.log_lines = defaults.STEP_LOG_LINES.default
        """Lines of a hook's ``self.log`` kept per step attempt (``step_log_lines``)."""
        self.capture_logging = False
        """Keep ``logging``'s records emitted while a hook runs as well (``capture_logging``)."""

    def turn(self, run: Run, step: StepRecord, now: datetime) -> Writing[bool]:
        """Run the step's next hook and persist the result; True to go on in this pass."""
        cls = run.classes[step.uuid]
        first_run = step.status == Status.CREATED
        has_continue = defines_hook(cls, "on_continue")
        # on_start when the step starts (or, for a step without on_continue, whenever it runs)
        name = "on_start" if (first_run or not has_continue) else "on_continue"
        run.transitions += 1
        step.attempt = max(step.attempt, 1)
        runtime = HookRuntime(self.journal.store, self.registry, self.clock, run, now)
        yield from self.journal.mark_hook_running(run)
        instance: Step | None = None
        try:
            instance = self.journal.instance(run, step, now, runtime)
            instance.log_buffer.cap = self.log_lines
            if defines_hook(cls, name):
                try:
                    self.invoker.call(run, step, now, self.hook_of(instance, name), name)
                finally:
                    runtime.close()
            if instance.verdict is None and not has_continue:
                instance.finish()  # its only hook returned: done, its Output model still applies
            check_json(instance.metadata, "metadata")
        except HookTimeoutError as exc:
            self.keep_logs(step, instance)
            return (yield from self.time_out(run, step, now, exc))
        except UnstorableValueError as exc:
            self.keep_logs(step, instance)
            error = UnstorableResultError(f"the results of {name} of step {step.name} cannot be stored: {exc}")
            return (yield from self.failed(run, step, error, now, name))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a failure of this step, not of the worker
            self.keep_logs(step, instance)
            return (yield from self.failed(run, step, exc, now, name))
        self.keep_logs(step, instance)
        runtime.merge()
        self.journal.emitted(run, getattr(instance, "emitted", []), now)  # a step whose __init__ skips Step's has none
        try:
            step.metadata = instance.metadata
            if instance.reported_progress is not None:
                step.progress = instance.reported_progress
            if instance.changed_attributes is not None:
                run.pipeline.attributes = instance.changed_attributes
            if first_run:
                transitions.start_step(run, step, now)
            return (yield from self.apply(run, step, instance, instance.verdict, now, name, first_run=first_run))
        except (ConcurrentUpdateError, StoreUnreachableError):
            raise  # not the hook's results: the store went away (the pass reports a store error)
        except RepositoryError as exc:
            return (yield from self.unstorable(run, step, exc, name))

    def hook_of(self, instance: Step, name: str) -> Any:
        """The hook to call: with ``capture_logging``, wrapped to keep ``logging``'s records."""
        hook = getattr(instance, name)
        return capturing(hook, instance.log_buffer) if self.capture_logging else hook

    def keep_logs(self, step: StepRecord, instance: Step | None) -> None:
        """The hook call's lines join its attempt's, to be stored with this transition."""
        if instance is not None and instance.log_buffer and self.log_lines:
            step.logs = merged(step.logs, max(step.attempt, 1), instance.log_buffer, self.log_lines)

    def apply(
        self, run: Run, step: StepRecord, instance: Step, verdict: Verdict | None, now: datetime, hook: str,
        *, first_run: bool,
    ) -> Writing[bool]:  # fmt: skip
        """Record a hook's verdict (or its lack of one); True to go on in this pass."""
        if verdict is None:
            # After on_start, on_continue follows in this pass. An on_continue without a verdict
            # keeps the step pending: the pipeline is due again at the next pass.
            step.next_run_at = None
            go_on = yield from self.journal.commit(run, [step], stop=not first_run)
            return go_on and first_run
        if verdict.kind == "wait":
            step.next_run_at = verdict.until
            yield from self.journal.commit(run, [step], stop=True)
            return False
        if verdict.kind == "finish":
            transitions.finish_step(run, step, verdict.output, now)
        elif verdict.kind == "fail":
            error = ErrorInfo(type=StepFailed.__name__, message=verdict.reason or "failed", hook=hook)
            logger.warning(
                "step %s of pipeline %s called fail(): %s", step.name, run.pipeline.uuid, error.message,
                extra={"pipeline_uuid": run.pipeline.uuid, "step_uuid": step.uuid},
            )  # fmt: skip
            transitions.fail_step(run, step, error, now)
        else:
            yield from self.invoker.call_on_cancel(run, step, now, instance)
            transitions.end_step(run, step, Status.CANCELLED, EventType.STEP_CANCELLED, now)
        return (yield from self.journal.commit(run, [step], stop=False))

    def unstorable(self, run: Run, step: StepRecord, exc: RepositoryError, hook: str) -> Writing[bool]:
        """The store refused what a hook produced: count a failed attempt of the step, recorded
        without those results (read back from the store), instead of running the hook forever."""
        logger.error(
            "pipeline %s: the results of %s of step %s could not be stored: %s",
            run.pipeline.uuid, hook, step.name, exc, extra={"pipeline_uuid": run.pipeline.uuid},
        )  # fmt: skip
        if not self.journal.reload(run):
            raise ConcurrentUpdateError(f"pipeline {run.pipeline.uuid}: lease lost", uuid=run.pipeline.uuid) from exc
        run.pipeline.crashes = 0
        current = next(s for s in run.steps if s.uuid == step.uuid)
        current.attempt = max(current.attempt, 1)
        error = UnstorableResultError(f"the results of {hook} of step {step.name} could not be stored: {exc}")
        return (yield from self.failed(run, current, error, self.clock.now(), hook, attempts=STORE_ATTEMPTS))

    def failed(
        self, run: Run, step: StepRecord, exc: BaseException, now: datetime, hook: str, *, attempts: int = 1
    ) -> Writing[bool]:
        """Count a failed attempt: retry with backoff while the step has attempts left (at
        least ``attempts``), else fail the step."""
        error = ErrorInfo.from_exception(exc, hook=hook)
        step.error = error
        context = {"pipeline_uuid": run.pipeline.uuid, "step_uuid": step.uuid}
        policy = self.policies.of(run.classes[step.uuid])
        if policy.retries(exc, step.attempt, at_least=attempts):
            step.attempt += 1
            delay = yield from self.retry_later(run, step, step.attempt - 1, str(exc), now)
            logger.warning(
                "step %s of pipeline %s raised %s: %s; retry %d/%d in %.1fs",
                step.name, run.pipeline.uuid, type(exc).__name__, exc, step.attempt,
                max(policy.max_attempts, attempts), delay, extra=context,
            )  # fmt: skip
            return False
        logger.error(
            "step %s of pipeline %s failed: %s: %s",
            step.name,
            run.pipeline.uuid,
            type(exc).__name__,
            exc,
            extra=context,
        )
        transitions.fail_step(run, step, error, now)
        return (yield from self.journal.commit(run, [step], stop=False))

    def time_out(self, run: Run, step: StepRecord, now: datetime, error: StepTimeoutError) -> Writing[bool]:
        """The step, or one hook call of it, ran out of time: ``on_timeout`` runs, then the step
        is retried from ``on_start`` per its attempts, or fails. True to go on in this pass."""
        cls = run.classes[step.uuid]
        run.transitions += 1
        step.attempt = max(step.attempt, 1)
        if cls.on_timeout is not Step.on_timeout:
            raised = yield from self.invoker.call_guarded(run, step, now, "on_timeout")
            if raised is not None:  # the timeout stands; keep what on_timeout raised in the log
                logger.error(
                    "on_timeout of step %s in pipeline %s raised %s", step.name, run.pipeline.uuid, raised.message
                )
        run.pipeline.crashes = 0
        logger.error("pipeline %s: %s", run.pipeline.uuid, error, extra={"pipeline_uuid": run.pipeline.uuid})
        timed_out = ErrorInfo(type=type(error).__name__, message=str(error))
        if step.attempt < self.policies.of(cls).max_attempts:
            step.error = timed_out
            transitions.restart_after_timeout(run, step)
            yield from self.retry_later(run, step, step.attempt - 1, str(error), now, timeout=True)
            return False
        transitions.fail_step(run, step, timed_out, now, timeout=True)
        return (yield from self.journal.commit(run, [step], stop=False))

    def retry_later(
        self, run: Run, step: StepRecord, attempt: int, error: str, now: datetime, **data: Any
    ) -> Writing[float]:
        """Back off before attempt ``attempt + 1``: record when, say so in the history, stop."""
        delay = self.policies.of(run.classes[step.uuid]).delay(attempt)
        transitions.plan_retry(run, step, attempt, error, now, delay, **data)
        yield from self.journal.commit(run, [step], stop=True)
        return delay
