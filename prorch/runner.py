"""Advancing one pipeline: run its current step's hooks, persist each transition, start the next
step when one finishes, and stop at a wait, a verdict, or the per-pass bound.

Each transition is one ``Store.commit``: the changed step, the pipeline record (status derived
from the steps, lease renewed or released) and the transition's events, together.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prorch.clock import Clock
from prorch.exceptions import InvalidOutputError, NotRegisteredError, StepUsageError
from prorch.mixins import defines_hook
from prorch.records import ErrorInfo, EventRecord, PipelineRecord, StepRecord, new_uuid
from prorch.registry import Registry
from prorch.status import PIPELINE_EVENT_FOR, TERMINAL, EventType, Status, derive_pipeline_status
from prorch.step import Step, Verdict
from prorch.store import Store

logger = logging.getLogger("prorch.runner")

DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_MAX_TURNS_PER_PASS = 100
"""How many step hooks one pipeline may run in one pass before it yields to the others."""
RETRY_BACKOFF_BASE_SECONDS = 1.0
RETRY_BACKOFF_CAP_SECONDS = 300.0
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
class _Run:
    """The state of one advance: the records as last written and what is pending to write."""

    pipeline: PipelineRecord
    steps: list[StepRecord]
    classes: dict[str, type[Step]]
    params: Any
    outputs: dict[str, Any]
    events: list[EventRecord] = field(default_factory=list)
    transitions: int = 0

    def current_step(self) -> StepRecord | None:
        return next((s for s in self.steps if s.status in (Status.CREATED, Status.PENDING)), None)


def backoff_delay(attempt: int) -> float:
    """Seconds before retry number ``attempt``: exponential, capped, with jitter (50-100%)."""
    ceiling = min(RETRY_BACKOFF_CAP_SECONDS, RETRY_BACKOFF_BASE_SECONDS * 2 ** max(attempt - 1, 0))
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
    ) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.max_turns = max_turns

    # --- entry points ----------------------------------------------------------------------

    def advance(self, pipeline: PipelineRecord) -> Outcome:
        """Run the pipeline's due work now; the record must be claimed by this runner (or the
        store must be one without claims, used by a single orchestrator)."""
        try:
            run = self._load(pipeline)
        except NotRegisteredError as exc:
            return self._blocked(pipeline, str(exc))
        if self._settle(run):
            self._commit(run, [], stop=run.pipeline.status in TERMINAL)
        while run.pipeline.status not in TERMINAL:
            step = run.current_step()
            now = self.clock.now()
            if step is None:  # pragma: no cover - derive_pipeline_status makes this terminal
                break
            if step.next_run_at is not None and step.next_run_at > now:
                self._park(run, step.next_run_at)
                break
            if run.transitions >= self.max_turns:
                self._park(run, now)
                break
            if not self._turn(run, step, now):
                break
        return self._outcome(run)

    def cancel(self, pipeline: PipelineRecord) -> Outcome:
        """Cancel a pipeline that is not finished yet; the current step's ``on_cancel`` runs."""
        run = self._load(pipeline)
        now = self.clock.now()
        step = run.current_step()
        if step is not None:
            self._run_on_cancel(run, step, now)
            self._end_step(run, step, Status.CANCELLED, EventType.STEP_CANCELLED, now)
        else:
            run.pipeline.status = Status.CANCELLED
            run.events.append(self._event(run, EventType.PIPELINE_CANCELLED, None, now))
        self._commit(run, [step] if step else [], stop=True)
        return self._outcome(run)

    def retry(self, pipeline: PipelineRecord) -> Outcome:
        """Put a failed pipeline back to pending from its failed step, with fresh attempts."""
        run = self._load(pipeline)
        now = self.clock.now()
        failed = [s for s in run.steps if s.status == Status.FAILED]
        for step in failed:
            step.status = Status.PENDING if step.started_at else Status.CREATED
            step.attempt = 0
            step.error = None
            step.finished_at = None
            step.next_run_at = None
        run.pipeline.status = Status.PENDING
        run.pipeline.last_error = None
        run.events.append(self._event(run, EventType.PIPELINE_RETRIED, None, now, steps=[s.name for s in failed]))
        self._commit(run, failed, stop=True)
        return self._outcome(run)

    # --- loading -----------------------------------------------------------------------------

    def _load(self, pipeline: PipelineRecord) -> _Run:
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
        return _Run(pipeline=pipeline, steps=steps, classes=classes, params=params, outputs=outputs)

    # --- one turn: one hook call and its transition --------------------------------------------

    def _turn(self, run: _Run, step: StepRecord, now: datetime) -> bool:
        """Run the step's next hook and persist the result; True to go on in this pass."""
        cls = run.classes[step.uuid]
        first_run = step.status == Status.CREATED
        has_continue = defines_hook(cls, "on_continue")
        run.transitions += 1
        step.attempt = max(step.attempt, 1)
        instance: Step | None = None
        try:
            instance = cls(record=step, pipeline=run.pipeline, params=run.params, outputs=run.outputs, now=now)
            if first_run and defines_hook(cls, "on_start"):
                instance.on_start()  # type: ignore[attr-defined]
            elif not first_run and has_continue:
                instance.on_continue()  # type: ignore[attr-defined]
        except Exception as exc:
            return self._hook_failed(run, step, exc, now)

        step.metadata = instance.metadata
        if first_run:
            if not any(s.started_at for s in run.steps):
                run.events.append(self._event(run, EventType.PIPELINE_STARTED, None, now))
            step.status = Status.PENDING
            step.started_at = now
            run.pipeline.metadata["current_step"] = step.uuid
            run.events.append(self._event(run, EventType.STEP_STARTED, step, now, attempt=step.attempt))
        verdict = instance.verdict
        if verdict is None and not has_continue:
            verdict = Verdict("finish")
        return self._apply(run, step, instance, verdict, now, first_run=first_run)

    def _apply(
        self,
        run: _Run,
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
            self._commit(run, [step], stop=not first_run)
            return first_run
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
            self._end_step(run, step, Status.FAILED, EventType.STEP_FAILED, now, error=step.error.message)
        else:
            self._run_on_cancel(run, step, now, instance)
            self._end_step(run, step, Status.CANCELLED, EventType.STEP_CANCELLED, now)
        return self._commit(run, [step], stop=False)

    def _hook_failed(self, run: _Run, step: StepRecord, exc: Exception, now: datetime) -> bool:
        cls = run.classes[step.uuid]
        step.error = ErrorInfo.from_exception(exc)
        name = step.name
        if step.attempt < cls.max_attempts and not isinstance(exc, NEVER_RETRIED):
            delay = backoff_delay(step.attempt)
            step.attempt += 1
            step.next_run_at = now + timedelta(seconds=delay)
            logger.warning(
                "step %s of pipeline %s raised %s: %s; retry %d/%d in %.1fs",
                name,
                run.pipeline.uuid,
                type(exc).__name__,
                exc,
                step.attempt,
                cls.max_attempts,
                delay,
                extra={"pipeline_uuid": run.pipeline.uuid, "step_uuid": step.uuid},
            )
            run.events.append(
                self._event(
                    run,
                    EventType.STEP_RETRYING,
                    step,
                    now,
                    attempt=step.attempt,
                    error=step.error.message,
                    retry_at=step.next_run_at.isoformat(),
                )
            )
            self._commit(run, [step], stop=True)
            return False
        logger.error(
            "step %s of pipeline %s failed: %s: %s",
            name,
            run.pipeline.uuid,
            type(exc).__name__,
            exc,
            extra={"pipeline_uuid": run.pipeline.uuid, "step_uuid": step.uuid},
        )
        self._end_step(run, step, Status.FAILED, EventType.STEP_FAILED, now, error=step.error.message)
        self._commit(run, [step], stop=True)
        return False

    def _run_on_cancel(self, run: _Run, step: StepRecord, now: datetime, instance: Step | None = None) -> None:
        cls = run.classes[step.uuid]
        if cls.on_cancel is Step.on_cancel:
            return
        try:
            if instance is None:
                instance = cls(record=step, pipeline=run.pipeline, params=run.params, outputs=run.outputs, now=now)
            instance.on_cancel()
        except Exception as exc:  # the cancel stands; the hook's error is kept for a look
            step.error = ErrorInfo.from_exception(exc)
            logger.error("on_cancel of step %s in pipeline %s raised %s", step.name, run.pipeline.uuid, exc)

    # --- writing -------------------------------------------------------------------------------

    def _end_step(
        self, run: _Run, step: StepRecord, status: Status, event: EventType, now: datetime, **data: Any
    ) -> None:
        step.status = status
        step.finished_at = now
        step.next_run_at = None
        run.events.append(self._event(run, event, step, now, **data))

    def _settle(self, run: _Run) -> bool:
        """Derive the pipeline's status from its steps; True when the record changed."""
        pipeline = run.pipeline
        derived = derive_pipeline_status(s.status for s in run.steps)
        if derived == pipeline.status:
            return False
        pipeline.status = derived
        if derived in TERMINAL:
            if derived == Status.FAILED:
                pipeline.last_error = next((s.error for s in run.steps if s.status == Status.FAILED), None)
            run.events.append(self._event(run, PIPELINE_EVENT_FOR[derived], None, self.clock.now()))
        return True

    def _commit(self, run: _Run, steps: list[StepRecord], *, stop: bool) -> bool:
        """Persist one transition; returns whether the pass goes on with this pipeline."""
        self._settle(run)
        pipeline = run.pipeline
        now = self.clock.now()
        stop = stop or pipeline.status in TERMINAL
        pipeline.updated_at = now
        if pipeline.status in TERMINAL:
            pipeline.next_run_at = None
        elif stop:
            current = run.current_step()
            pipeline.next_run_at = (current.next_run_at if current else None) or now
        elif pipeline.next_run_at is None:
            pipeline.next_run_at = now  # a crash before the last commit must leave it due
        if stop:
            pipeline.lease_owner = None
            pipeline.lease_expires_at = None
        elif pipeline.lease_owner is not None:
            pipeline.lease_expires_at = now + timedelta(seconds=self.lease_seconds)
        for index, event in enumerate(run.events):  # order within one commit, for history()
            event.seq = (pipeline.revision + 1) * 1000 + index
        self.store.commit([*steps, pipeline], run.events)
        run.events = []
        return not stop

    def _park(self, run: _Run, until: datetime) -> None:
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
            pipeline.next_run_at = now + timedelta(seconds=self.lease_seconds)
            self.store.commit([pipeline])
        return Outcome(pipeline.uuid, pipeline.status, blocked=reason)

    def _outcome(self, run: _Run) -> Outcome:
        pipeline = run.pipeline
        waiting = pipeline.next_run_at if pipeline.status == Status.PENDING else None
        if waiting is not None and waiting <= self.clock.now():
            waiting = None
        return Outcome(pipeline.uuid, pipeline.status, run.transitions, waiting_until=waiting)

    def _event(self, run: _Run, kind: EventType, step: StepRecord | None, now: datetime, **data: Any) -> EventRecord:
        if step is not None:
            data.setdefault("step", step.name)
        return EventRecord(
            uuid=new_uuid(),
            pipeline_uuid=run.pipeline.uuid,
            step_uuid=step.uuid if step else None,
            type=kind,
            at=now,
            data=data,
        )
