"""Advancing one pipeline: run its current step's hooks, persist each transition, start the next
step when one finishes, roll finished steps back when one fails for good, and stop at a wait, a
verdict, or the per-pass bound.

Each transition is one ``Store.commit``: the changed step, the pipeline record (status derived
from the steps, lease renewed or released) and the transition's events, together, by
compare-and-set on the pipeline's revision. A worker that lost its lease has its write refused.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prorch.clock import Clock
from prorch.config import StepOverride
from prorch.exceptions import (
    ConcurrentUpdateError,
    InvalidOutputError,
    InvalidStateError,
    NotRegisteredError,
    StepTimeoutError,
    StepUsageError,
)
from prorch.mixins import defines_hook
from prorch.records import ErrorInfo, EventRecord, MessageRecord, PipelineRecord, Record, StepRecord, new_uuid
from prorch.registry import Registry
from prorch.runtime import HookRuntime
from prorch.status import (
    PIPELINE_EVENT_FOR,
    TERMINAL,
    EventType,
    Status,
    can_move,
    derive_pipeline_status,
)
from prorch.step import Step, Verdict
from prorch.store import Store

logger = logging.getLogger("prorch.runner")

DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_MAX_TURNS_PER_PASS = 100
"""How many step hooks one pipeline may run in one pass before it yields to the others."""
DEFAULT_MAX_CRASHES = 3
"""How many times in a row a worker may die holding a pipeline before it is quarantined."""
NEVER_RETRIED: tuple[type[BaseException], ...] = (StepUsageError, InvalidOutputError)
"""Programming errors: a retry would fail the same way."""


@dataclass
class Outcome:
    """What one advance did to one pipeline."""

    uuid: str
    status: Status
    transitions: int = 0
    waiting_until: datetime | None = None
    blocked: str | None = None


@dataclass
class Run:
    """The state of one advance: the records as last written and what is pending to write."""

    pipeline: PipelineRecord
    steps: list[StepRecord]
    classes: dict[str, type[Step]]
    params: Any
    outputs: dict[str, Any]
    events: list[EventRecord] = field(default_factory=list)
    consumed: list[MessageRecord] = field(default_factory=list)
    transitions: int = 0
    woken: bool = False  # a message arrived while we held the pipeline: be due again at once

    def current_step(self) -> StepRecord | None:
        return next((s for s in self.steps if s.status in (Status.CREATED, Status.PENDING)), None)

    def pending_rollbacks(self) -> list[StepRecord]:
        """Finished steps to compensate, latest first, once a step has failed for good."""
        if not any(s.status == Status.FAILED for s in self.steps):
            return []
        return [
            s
            for s in reversed(self.steps)
            if s.status == Status.FINISHED
            and s.rollback is None
            and self.classes[s.uuid].on_rollback is not Step.on_rollback
        ]


class _Stop(Exception):
    """Ends an advance early: a cancel request took over the pipeline."""


def backoff_delay(attempt: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds before retry number ``attempt``: exponential, capped, with jitter (50-100%)."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return float(ceiling * random.uniform(0.5, 1.0))


class Runner:
    """Advances pipelines against one store with one clock."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        clock: Clock,
        *,
        owner: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_turns: int = DEFAULT_MAX_TURNS_PER_PASS,
        max_crashes: int = DEFAULT_MAX_CRASHES,
        step_overrides: Mapping[str, StepOverride] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.max_turns = max_turns
        self.max_crashes = max_crashes
        self.step_overrides = dict(step_overrides or {})
        self.should_stop = should_stop

    # --- settings: configuration overrides class attributes ----------------------------------

    def _timeout(self, cls: type[Step]) -> float | None:
        override = self.step_overrides.get(cls.name or "")
        return override.timeout if override and override.timeout is not None else cls.timeout

    def _max_attempts(self, cls: type[Step]) -> int:
        override = self.step_overrides.get(cls.name or "")
        return override.max_attempts if override and override.max_attempts is not None else cls.max_attempts

    def _deadline(self, run: Run, step: StepRecord) -> datetime | None:
        timeout = self._timeout(run.classes[step.uuid])
        if timeout is None or step.started_at is None or step.status != Status.PENDING:
            return None
        return step.started_at + timedelta(seconds=timeout)

    # --- entry points ----------------------------------------------------------------------

    def advance(self, pipeline: PipelineRecord) -> Outcome:
        """Run the pipeline's due work now. The record must be claimed by this runner, or the
        store must be one without claims, used by a single orchestrator."""
        try:
            run = self._load(pipeline)
        except NotRegisteredError as exc:
            return self._blocked(pipeline, str(exc))
        try:
            if pipeline.status not in TERMINAL and pipeline.claims > self.max_crashes:
                self._quarantine(run)
            elif pipeline.cancel_requested and pipeline.status not in TERMINAL:
                self._cancel(run)
            else:
                if self._settle(run):
                    self._commit(run, [], stop=run.pipeline.status in TERMINAL)
                self._loop(run)
        except _Stop:
            pass
        return self._outcome(run)

    def cancel(self, pipeline: PipelineRecord) -> Outcome:
        """Cancel a pipeline that has not ended; the current step's ``on_cancel`` runs."""
        run = self._load(pipeline)
        with contextlib.suppress(_Stop):
            self._cancel(run)
        return self._outcome(run)

    def retry(self, pipeline: PipelineRecord) -> Outcome:
        """Put a failed pipeline back to pending from its failed step, with fresh attempts.
        Steps that were rolled back run again; the others keep their results."""
        run = self._load(pipeline)
        now = self.clock.now()
        changed = []
        for step in run.steps:
            if step.status == Status.FAILED:
                self._move(step, Status.PENDING if step.started_at else Status.CREATED)
            elif step.rollback == "done":
                self._move(step, Status.CREATED)  # compensated: its effect is gone, do it again
                step.started_at = step.finished_at = None
                step.output = None
                step.metadata = {}
            elif step.rollback is None:
                continue
            step.attempt = step.rollback_attempt = 0
            step.error = step.rollback = step.finished_at = step.next_run_at = None
            changed.append(step)
        self._move(run.pipeline, Status.PENDING)
        run.pipeline.last_error = None
        run.events.append(self.make_event(run, EventType.PIPELINE_RETRIED, None, now, steps=[s.name for s in changed]))
        self._commit(run, changed, stop=True)
        return self._outcome(run)

    # --- the loop --------------------------------------------------------------------------

    def _loop(self, run: Run) -> None:
        while run.pipeline.status not in TERMINAL:
            now = self.clock.now()
            rollbacks = run.pending_rollbacks()
            step = rollbacks[0] if rollbacks else run.current_step()
            if step is None:  # pragma: no cover - derive_pipeline_status makes this terminal
                return
            deadline = None if rollbacks else self._deadline(run, step)
            if deadline is not None and deadline <= now:
                self._time_out(run, step, now)
                continue
            if step.next_run_at is not None and step.next_run_at > now:
                if rollbacks or not self._has_mail(run):
                    self._park(run, self._wake_time(run, now))
                    return
                step.next_run_at = None  # woken by a message before its wait was over
            if run.transitions >= self.max_turns or self.should_stop():
                self._park(run, now)
                return
            go_on = self._roll_back(run, step, now) if rollbacks else self._turn(run, step, now)
            if not go_on:
                return

    def _has_mail(self, run: Run) -> bool:
        return any(m.consumed_at is None for m in self.store.messages_of(run.pipeline.uuid))

    # --- loading -----------------------------------------------------------------------------

    def _load(self, pipeline: PipelineRecord) -> Run:
        pipeline_cls = self.registry.pipeline(pipeline.name, pipeline.version)
        order = {cls.name: index for index, cls in enumerate(pipeline_cls.steps)}
        steps = sorted(
            self.store.steps_of(pipeline.uuid),
            key=lambda s: s.position if s.position is not None else order.get(s.name, len(order)),
        )
        classes = {s.uuid: self.registry.step(s.name, s.version) for s in steps}
        params: Any = dict(pipeline.params)
        if pipeline_cls.Params is not None:
            params = pipeline_cls.Params.model_validate(pipeline.params)
        outputs = {s.name: s.output for s in steps if s.status == Status.FINISHED}
        return Run(pipeline=pipeline, steps=steps, classes=classes, params=params, outputs=outputs)

    def _instance(self, run: Run, step: StepRecord, now: datetime, runtime: HookRuntime | None = None) -> Step:
        cls = run.classes[step.uuid]
        return cls(record=step, pipeline=run.pipeline, params=run.params, outputs=run.outputs, now=now, runtime=runtime)

    # --- one turn: one hook call and its transition --------------------------------------------

    def _turn(self, run: Run, step: StepRecord, now: datetime) -> bool:
        """Run the step's next hook and persist the result; True to go on in this pass."""
        cls = run.classes[step.uuid]
        first_run = step.status == Status.CREATED
        has_continue = defines_hook(cls, "on_continue")
        run.transitions += 1
        step.attempt = max(step.attempt, 1)
        instance: Step | None = None
        runtime = HookRuntime(self, run, now)
        try:
            instance = self._instance(run, step, now, runtime)
            if first_run and defines_hook(cls, "on_start"):
                instance.on_start()  # type: ignore[attr-defined]
            elif not first_run and has_continue:
                instance.on_continue()  # type: ignore[attr-defined]
        except Exception as exc:
            return self._hook_failed(run, step, exc, now)
        runtime.merge()

        step.metadata = instance.metadata
        if first_run:
            if not any(s.started_at for s in run.steps):
                run.events.append(self.make_event(run, EventType.PIPELINE_STARTED, None, now))
            self._move(step, Status.PENDING)
            step.started_at = now
            run.pipeline.metadata["current_step"] = step.uuid
            run.events.append(self.make_event(run, EventType.STEP_STARTED, step, now, attempt=step.attempt))
        verdict = instance.verdict
        if verdict is None and not has_continue:
            verdict = Verdict("finish")
        return self._apply(run, step, instance, verdict, now, first_run=first_run)

    def _apply(
        self,
        run: Run,
        step: StepRecord,
        instance: Step,
        verdict: Verdict | None,
        now: datetime,
        *,
        first_run: bool,
    ) -> bool:
        if verdict is None:
            # After on_start, on_continue follows in this pass. An on_continue without a verdict
            # keeps the step pending: the pipeline is due again at the next pass.
            step.next_run_at = None
            return self._commit(run, [step], stop=not first_run) and first_run
        if verdict.kind == "wait":
            step.next_run_at = verdict.until
            self._commit(run, [step], stop=True)
            return False
        if verdict.kind == "finish":
            step.output = verdict.output
            step.error = None
            run.outputs[step.name] = verdict.output
            self._end_step(run, step, Status.FINISHED, EventType.STEP_FINISHED, now)
        elif verdict.kind == "fail":
            step.error = ErrorInfo(type="StepFailed", message=verdict.reason or "failed")
            logger.warning(
                "step %s of pipeline %s called fail(): %s",
                step.name,
                run.pipeline.uuid,
                step.error.message,
                extra={"pipeline_uuid": run.pipeline.uuid, "step_uuid": step.uuid},
            )
            self._end_step(run, step, Status.FAILED, EventType.STEP_FAILED, now, error=step.error.message)
        else:
            self._run_on_cancel(run, step, now, instance)
            self._end_step(run, step, Status.CANCELLED, EventType.STEP_CANCELLED, now)
        return self._commit(run, [step], stop=False)

    def _hook_failed(self, run: Run, step: StepRecord, exc: Exception, now: datetime) -> bool:
        cls = run.classes[step.uuid]
        step.error = ErrorInfo.from_exception(exc)
        context = {"pipeline_uuid": run.pipeline.uuid, "step_uuid": step.uuid}
        max_attempts = self._max_attempts(cls)
        if step.attempt < max_attempts and not isinstance(exc, NEVER_RETRIED + tuple(cls.never_retry)):
            step.attempt += 1
            delay = self._schedule_retry(run, step, step.attempt - 1, exc, now)
            logger.warning(
                "step %s of pipeline %s raised %s: %s; retry %d/%d in %.1fs",
                step.name, run.pipeline.uuid, type(exc).__name__, exc, step.attempt, max_attempts, delay,
                extra=context,
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
        self._end_step(run, step, Status.FAILED, EventType.STEP_FAILED, now, error=step.error.message)
        return self._commit(run, [step], stop=False)

    def _time_out(self, run: Run, step: StepRecord, now: datetime) -> None:
        cls = run.classes[step.uuid]
        run.transitions += 1
        error = StepTimeoutError(f"step {step.name} timed out: no verdict within {self._timeout(cls):g}s of its start")
        if cls.on_timeout is not Step.on_timeout:
            try:
                self._instance(run, step, now).on_timeout()
            except Exception as exc:  # the timeout stands; keep what on_timeout raised in the log
                logger.error("on_timeout of step %s in pipeline %s raised %s", step.name, run.pipeline.uuid, exc)
        step.error = ErrorInfo(type="StepTimeoutError", message=str(error))
        self._end_step(run, step, Status.FAILED, EventType.STEP_FAILED, now, error=step.error.message, timeout=True)
        self._commit(run, [step], stop=False)

    def _schedule_retry(
        self, run: Run, step: StepRecord, attempt: int, exc: Exception, now: datetime, **data: Any
    ) -> float:
        """Back off before attempt ``attempt + 1``: record when, say so in the history, stop."""
        cls = run.classes[step.uuid]
        delay = backoff_delay(attempt, cls.retry_delay, cls.retry_max_delay)
        step.next_run_at = now + timedelta(seconds=delay)
        retry_at = step.next_run_at.isoformat()
        event = self.make_event(
            run, EventType.STEP_RETRYING, step, now, attempt=attempt + 1, error=str(exc), retry_at=retry_at, **data
        )
        run.events.append(event)
        self._commit(run, [step], stop=True)
        return delay

    # --- rollback -------------------------------------------------------------------------------

    def _roll_back(self, run: Run, step: StepRecord, now: datetime) -> bool:
        """Run one finished step's ``on_rollback``; retried like a hook, then given up on."""
        cls = run.classes[step.uuid]
        run.transitions += 1
        step.rollback_attempt += 1
        try:
            self._instance(run, step, now).on_rollback()
        except Exception as exc:
            error = ErrorInfo.from_exception(exc)
            if step.rollback_attempt < self._max_attempts(cls):
                self._schedule_retry(run, step, step.rollback_attempt, exc, now, rollback=True)
                return False
            logger.error("on_rollback of step %s in pipeline %s failed for good: %s", step.name, run.pipeline.uuid, exc)
            step.rollback = "failed"
            step.error = error
            run.events.append(self.make_event(run, EventType.STEP_ROLLBACK_FAILED, step, now, error=error.message))
        else:
            step.rollback = "done"
            run.events.append(self.make_event(run, EventType.STEP_ROLLED_BACK, step, now))
        step.next_run_at = None
        return self._commit(run, [step], stop=False)

    # --- cancel, quarantine ------------------------------------------------------------------

    def _cancel(self, run: Run) -> None:
        now = self.clock.now()
        step = run.current_step()
        run.pipeline.cancel_requested = False
        if step is not None:
            self._run_on_cancel(run, step, now)
            self._end_step(run, step, Status.CANCELLED, EventType.STEP_CANCELLED, now)
        self._commit(run, [step] if step else [], stop=True)

    def _run_on_cancel(self, run: Run, step: StepRecord, now: datetime, instance: Step | None = None) -> None:
        cls = run.classes[step.uuid]
        if cls.on_cancel is Step.on_cancel:
            return
        try:
            (instance or self._instance(run, step, now)).on_cancel()
        except Exception as exc:  # the cancel stands; the hook's error is kept for a look
            step.error = ErrorInfo.from_exception(exc)
            logger.error("on_cancel of step %s in pipeline %s raised %s", step.name, run.pipeline.uuid, exc)

    def _quarantine(self, run: Run) -> None:
        """Workers died holding this pipeline again and again: fail it instead of running its
        hooks once more (no rollback either: a rollback hook may be what kills them)."""
        now = self.clock.now()
        crashes = run.pipeline.claims - 1
        error = ErrorInfo(
            type="WorkerCrashed",
            message=(
                f"quarantined: a worker died {crashes} times in a row while running this pipeline "
                f"(limit {self.max_crashes}); fix the cause, then retry it (prorch retry {run.pipeline.uuid})"
            ),
        )
        logger.error("pipeline %s %s", run.pipeline.uuid, error.message, extra={"pipeline_uuid": run.pipeline.uuid})
        changed = [s for s in run.steps if s.status == Status.FINISHED and s.rollback is None]
        for finished in changed:
            finished.rollback = "skipped"
        step = run.current_step()
        if step is not None:
            step.error = error
            self._end_step(run, step, Status.FAILED, EventType.STEP_FAILED, now, error=error.message, quarantined=True)
            changed.append(step)
        run.pipeline.last_error = error
        self._commit(run, changed, stop=True)

    # --- writing -------------------------------------------------------------------------------

    def _move(self, record: PipelineRecord | StepRecord, status: Status) -> None:
        if not can_move(record.status, status):
            raise InvalidStateError(
                f"{record.MODEL} {record.uuid} cannot move from {record.status.value} to {status.value}"
            )
        record.status = status

    def _end_step(
        self, run: Run, step: StepRecord, status: Status, event: EventType, now: datetime, **data: Any
    ) -> None:
        self._move(step, status)
        step.finished_at = now
        step.next_run_at = None
        run.events.append(self.make_event(run, event, step, now, **data))

    def _settle(self, run: Run) -> bool:
        """Derive the pipeline's status from its steps; True when the record changed. A failed
        pipeline stays pending until its rollbacks have run."""
        pipeline = run.pipeline
        derived = derive_pipeline_status(s.status for s in run.steps)
        if derived == Status.FAILED and run.pending_rollbacks():
            derived = Status.PENDING
        if derived == pipeline.status:
            return False
        self._move(pipeline, derived)
        if derived in TERMINAL:
            if derived == Status.FAILED:
                pipeline.last_error = next(
                    (s.error for s in run.steps if s.status == Status.FAILED), pipeline.last_error
                )
            run.events.append(self.make_event(run, PIPELINE_EVENT_FOR[derived], None, self.clock.now()))
        return True

    def _wake_time(self, run: Run, now: datetime) -> datetime:
        """When the pipeline is next due: its step's wait or backoff, or its timeout if sooner."""
        rollbacks = run.pending_rollbacks()
        step = rollbacks[0] if rollbacks else run.current_step()
        if step is None:
            return now
        candidates = [t for t in (step.next_run_at, None if rollbacks else self._deadline(run, step)) if t is not None]
        return min(candidates) if candidates else now

    def _commit(self, run: Run, steps: list[StepRecord], *, stop: bool) -> bool:
        """Persist one transition; returns whether the pass goes on with this pipeline."""
        self._settle(run)
        pipeline = run.pipeline
        now = self.clock.now()
        stop = stop or pipeline.status in TERMINAL
        pipeline.updated_at = now
        if pipeline.status in TERMINAL:
            pipeline.next_run_at = None
        elif stop:
            pipeline.next_run_at = now if run.woken else self._wake_time(run, now)
        elif pipeline.next_run_at is None:
            pipeline.next_run_at = now  # a crash before the last commit must leave it due
        if stop:
            pipeline.lease_owner = None
            pipeline.lease_expires_at = None
            pipeline.claims = 0  # released cleanly: not a crash
        elif pipeline.lease_owner is not None:
            pipeline.lease_expires_at = now + timedelta(seconds=self.lease_seconds)
        for index, event in enumerate(run.events):  # order within one commit, for history()
            event.seq = (pipeline.revision + 1) * 1000 + index
        added: list[Record] = list(run.events)
        if self.registry.reactions:
            from prorch.reactions import reaction_tasks

            added += reaction_tasks(self.registry, pipeline.name, run.events, now)
        try:
            self.store.commit([*steps, pipeline], added, run.consumed)
        except ConcurrentUpdateError:
            if not self._on_conflict(run, steps, added):
                raise
        run.events = []
        run.consumed = []
        return not stop

    def _on_conflict(self, run: Run, steps: list[StepRecord], added: list[Record]) -> bool:
        """Our write was refused because someone else wrote the pipeline. If we still hold the
        lease, it was an outside request: a cancel (applied now, our transition dropped) or a
        message's wake-up (merged: the write is made again). Otherwise the lease was lost: False."""
        fresh = self.store.get_pipeline(run.pipeline.uuid)
        if fresh is None or fresh.status in TERMINAL or self.owner is None or fresh.lease_owner != self.owner:
            return False
        if not fresh.cancel_requested:
            run.woken = True
            run.pipeline.revision = fresh.revision
            if run.pipeline.status not in TERMINAL and run.pipeline.lease_owner is None:
                run.pipeline.next_run_at = self.clock.now()
            self.store.commit([*steps, run.pipeline], added, run.consumed)
            return True
        logger.info("pipeline %s: cancel requested while running; cancelling", fresh.uuid)
        fresh_run = self._load(fresh)
        self._cancel(fresh_run)
        run.pipeline = fresh_run.pipeline
        run.steps = fresh_run.steps
        raise _Stop()

    def _park(self, run: Run, until: datetime) -> None:
        """Stop for now without running a hook: release the lease, be due again at ``until``."""
        pipeline = run.pipeline
        if pipeline.lease_owner is None and pipeline.next_run_at == until:
            return
        pipeline.next_run_at = until
        self._commit(run, [], stop=True)

    def _blocked(self, pipeline: PipelineRecord, reason: str) -> Outcome:
        """Code for this record is not deployed: touch nothing but our own lease."""
        logger.warning("pipeline %s is blocked: %s", pipeline.uuid, reason, extra={"pipeline_uuid": pipeline.uuid})
        if pipeline.lease_owner is not None:
            now = self.clock.now()
            pipeline.lease_owner = None
            pipeline.lease_expires_at = None
            pipeline.claims = 0
            pipeline.next_run_at = now + timedelta(seconds=self.lease_seconds)
            self.store.commit([pipeline])
        return Outcome(pipeline.uuid, pipeline.status, blocked=reason)

    def _outcome(self, run: Run) -> Outcome:
        pipeline = run.pipeline
        waiting = pipeline.next_run_at if pipeline.status == Status.PENDING else None
        if waiting is not None and waiting <= self.clock.now():
            waiting = None
        return Outcome(pipeline.uuid, pipeline.status, run.transitions, waiting_until=waiting)

    def make_event(self, run: Run, kind: EventType, step: StepRecord | None, now: datetime, **data: Any) -> EventRecord:
        if step is not None:
            data.setdefault("step", step.name)
        # Built from values the engine holds in the right types (``now`` is aware UTC): the
        # record is not validated again, which matters on the hot path. It is validated on load.
        return EventRecord.model_construct(
            uuid=new_uuid(),
            pipeline_uuid=run.pipeline.uuid,
            step_uuid=step.uuid if step else None,
            type=kind,
            at=now,
            seq=0,
            data=data,
        )
