"""Advancing one pipeline: run its current step's hooks, persist each transition, start the next
step when one finishes, roll finished steps back when one fails for good, and stop at a wait, a
verdict, or the per-pass bound.

Each transition is one ``Store.commit``: the changed step, the pipeline record (status derived
from the steps, lease renewed or released) and the transition's events, together, by
compare-and-set on the pipeline's revision. A worker that lost its lease has its write refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from prorch.clock import Clock
from prorch.config import StepOverride
from prorch.exceptions import (
    ConcurrentUpdateError,
    HookTimeoutError,
    InvalidStateError,
    NotRegisteredError,
    RepositoryError,
    StepTimeoutError,
    UnstorableResultError,
    UnstorableValueError,
)
from prorch.hooks import HookCaller
from prorch.jsonvalue import check_json, copy_json
from prorch.leases import LeaseKeeper
from prorch.mixins import defines_hook
from prorch.policy import Policies
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
"""How many workers in a row may die while one of a pipeline's hooks runs before it is quarantined."""
STORE_ATTEMPTS = 10
"""Attempts a step gets, at least, when the store fails to take its results (it may be a blip)."""
MAX_MERGES = 1000
"""Outside writes merged into one transition before giving up (a safety net, never reached)."""


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
    token: str | None = None  # the lease token we claimed the pipeline with (None: no leases)
    keeper: LeaseKeeper | None = None  # renews our lease; told to stop when a hook overruns
    crashed_hook_at: datetime | None = None  # a worker died while a hook that began then ran
    dirty: bool = False  # changed in memory without a transition (a crash charged)

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


class Runner:
    """Advances pipelines against one store with one clock."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        clock: Clock,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_turns: int = DEFAULT_MAX_TURNS_PER_PASS,
        max_crashes: int = DEFAULT_MAX_CRASHES,
        step_overrides: Mapping[str, StepOverride] | None = None,
        hook_timeout: float | None = None,
        hooks: HookCaller | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        request_stop: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.max_turns = max_turns
        self.max_crashes = max_crashes
        self.policies = Policies(step_overrides)
        self.hook_timeout = hook_timeout
        self.hooks = hooks or HookCaller()
        self.should_stop = should_stop
        self.request_stop = request_stop

    # --- settings: configuration overrides class attributes ----------------------------------

    def _timeout(self, cls: type[Step]) -> float | None:
        return self.policies.of(cls).timeout

    def _max_attempts(self, cls: type[Step]) -> int:
        return self.policies.of(cls).max_attempts

    def _deadline(self, run: Run, step: StepRecord) -> datetime | None:
        """When the step must have a verdict: ``timeout`` after its start. A step whose
        ``on_start`` was running when its worker died started when that hook did."""
        if step.status == Status.PENDING:
            started = step.started_at
        elif step.status == Status.CREATED:
            started = run.crashed_hook_at
        else:
            return None
        return self.policies.of(run.classes[step.uuid]).deadline(started)

    def _bound(self, run: Run, step: StepRecord, now: datetime, *, own_hook: bool) -> float | None:
        """Seconds one hook call may take: until the step's deadline for ``on_start`` and
        ``on_continue``, the step's ``timeout`` for its other hooks, else the default."""
        timeout = self._timeout(run.classes[step.uuid])
        if timeout is None:
            return self.hook_timeout
        deadline = self._deadline(run, step) if own_hook else None
        return (deadline - now).total_seconds() if deadline is not None else timeout

    # --- entry points ----------------------------------------------------------------------

    def advance(self, pipeline: PipelineRecord, keeper: LeaseKeeper | None = None) -> Outcome:
        """Run the pipeline's due work now. The record must be claimed by this runner (its
        ``lease_owner`` is our lease token), or the store must be one without claims, used by a
        single orchestrator."""
        try:
            run = self._load(pipeline)
        except NotRegisteredError as exc:
            return self._blocked(pipeline, str(exc))
        run.token, run.keeper = pipeline.lease_owner, keeper
        try:
            self._charge_crash(run)
            if pipeline.status not in TERMINAL and pipeline.crashes >= self.max_crashes:
                self._quarantine(run)
            elif pipeline.cancel_requested and pipeline.status not in TERMINAL:
                self._cancel(run)
            else:
                if self._settle(run):
                    self._commit(run, [], stop=run.pipeline.status in TERMINAL)
                self._loop(run)
        except KeyboardInterrupt:
            self._interrupted(run)
        return self._outcome(run)

    def cancel(self, pipeline: PipelineRecord) -> Outcome:
        """Cancel a pipeline that has not ended; the current step's ``on_cancel`` runs."""
        run = self._load(pipeline)
        run.token = pipeline.lease_owner
        self._cancel(run)
        return self._outcome(run)

    def retry(self, pipeline: PipelineRecord) -> Outcome:
        """Put a failed pipeline back to pending from its failed step, with fresh attempts: the
        step runs again the hook that failed. Steps that were rolled back run again; the others
        keep their results."""
        run = self._load(pipeline)
        now = self.clock.now()
        changed = []
        for step in run.steps:
            if step.status == Status.FAILED:
                if self._failed_in_on_start(run, step):
                    self._move(step, Status.CREATED)
                    step.started_at = None
                else:
                    self._move(step, Status.PENDING)
                    step.started_at = now  # a fresh `timeout` window for the retried attempts
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
        run.pipeline.crashes = 0
        run.pipeline.hook_started_at = None
        run.events.append(self.make_event(run, EventType.PIPELINE_RETRIED, None, now, steps=[s.name for s in changed]))
        self._commit(run, changed, stop=True)
        return self._outcome(run)

    def _failed_in_on_start(self, run: Run, step: StepRecord) -> bool:
        """Whether a retry of this failed step starts it again (``on_start``) rather than going
        on with ``on_continue``: when it failed in ``on_start``, has no ``on_continue``, never
        started, or timed out (a timeout restarts a step)."""
        if not defines_hook(run.classes[step.uuid], "on_continue") or step.started_at is None:
            return True
        error = step.error
        if error is None:
            return False
        if error.hook is not None:
            return error.hook == "on_start"
        return error.type in ("StepTimeoutError", "HookTimeoutError")  # recorded before hooks were named

    # --- the loop --------------------------------------------------------------------------

    def _loop(self, run: Run) -> None:
        while run.pipeline.status not in TERMINAL:
            if run.pipeline.cancel_requested:  # merged from an outside write while we ran
                self._cancel(run)
                return
            now = self.clock.now()
            rollbacks = run.pending_rollbacks()
            step = rollbacks[0] if rollbacks else run.current_step()
            if step is None:  # pragma: no cover - derive_pipeline_status makes this terminal
                return
            deadline = None if rollbacks else self._deadline(run, step)
            if deadline is not None and deadline <= now:
                timeout = self._timeout(run.classes[step.uuid]) or 0
                error = StepTimeoutError(f"step {step.name} timed out: no verdict within {timeout:g}s of its start")
                if not self._time_out(run, step, now, error):
                    return
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
        params: Any = pipeline.params
        if pipeline_cls.Params is not None:
            params = pipeline_cls.Params.model_validate(pipeline.params)
        outputs = {s.name: s.output for s in steps if s.status == Status.FINISHED}
        return Run(pipeline=pipeline, steps=steps, classes=classes, params=params, outputs=outputs)

    def _instance(self, run: Run, step: StepRecord, now: datetime, runtime: HookRuntime | None = None) -> Step:
        """A step object for one hook call. It gets its own copies of the params and outputs,
        so a hook that changes them changes nothing stored."""
        cls = run.classes[step.uuid]
        params = run.params.model_copy(deep=True) if isinstance(run.params, BaseModel) else copy_json(run.params)
        outputs = copy_json(run.outputs)
        return cls(record=step, pipeline=run.pipeline, params=params, outputs=outputs, now=now, runtime=runtime)

    # --- calling hooks -------------------------------------------------------------------------

    def _call_hook(self, run: Run, step: StepRecord, now: datetime, hook: Callable[[], object], name: str) -> None:
        """Call one hook of ``step``: marked as running in the store first (so that a worker
        dying in it is charged to this pipeline alone), bounded in time, and the lease no longer
        renewed past that bound. Raises what the hook raises, or ``HookTimeoutError``. The
        caller marks the hook running first (``_mark_hook_running``), outside its ``try``: a
        store error there is not the hook's."""
        bound = self._bound(run, step, now, own_hook=name in ("on_start", "on_continue"))
        keeper = run.keeper
        if keeper is not None and bound is not None:
            keeper.limit(run.pipeline.uuid, self.clock.now() + timedelta(seconds=bound))
        what = f"{name} of step {step.name} in pipeline {run.pipeline.uuid}"
        ended = False  # returned or raised: whatever its result, the worker did not die in it
        try:
            self.hooks.call(hook, bound, what)
            ended = True
        except KeyboardInterrupt:
            raise
        except BaseException:
            ended = True
            raise
        finally:
            if ended:
                run.pipeline.crashes = 0
            if keeper is not None and bound is not None:
                keeper.limit(run.pipeline.uuid, None)

    def _mark_hook_running(self, run: Run) -> None:
        """Store that a hook is about to run, unless the last write already did (it does when
        the pass goes on with this pipeline): one write per advance, not per hook."""
        if run.pipeline.hook_started_at is None:
            self._commit(run, [], stop=False)

    def _charge_crash(self, run: Run) -> None:
        """A hook was marked running and its result never recorded: the worker running it died
        or vanished. Charge this pipeline (and no other one of that worker's batch)."""
        pipeline = run.pipeline
        if pipeline.hook_started_at is None or pipeline.status in TERMINAL:
            return
        run.crashed_hook_at = pipeline.hook_started_at
        pipeline.hook_started_at = None
        pipeline.crashes += 1
        run.dirty = True
        logger.warning(
            "pipeline %s: a worker died or vanished while one of its hooks was running (since %s); "
            "crash %d of %d before quarantine",
            pipeline.uuid,
            run.crashed_hook_at.isoformat(),
            pipeline.crashes,
            self.max_crashes,
            extra={"pipeline_uuid": pipeline.uuid},
        )

    def _interrupted(self, run: Run) -> None:
        """A hook raised KeyboardInterrupt: stop the worker as SIGINT does, and put this
        pipeline back, due now, without blame (its hook runs again: at least once)."""
        logger.warning(
            "pipeline %s: a hook raised KeyboardInterrupt; stopping the worker as on SIGINT",
            run.pipeline.uuid,
            extra={"pipeline_uuid": run.pipeline.uuid},
        )
        run.events, run.consumed = [], []
        self._park(run, self.clock.now())
        if self.request_stop is None:
            raise KeyboardInterrupt
        self.request_stop()

    # --- one turn: one hook call and its transition --------------------------------------------

    def _turn(self, run: Run, step: StepRecord, now: datetime) -> bool:
        """Run the step's next hook and persist the result; True to go on in this pass."""
        cls = run.classes[step.uuid]
        first_run = step.status == Status.CREATED
        has_continue = defines_hook(cls, "on_continue")
        # on_start when the step starts (or, for a step without on_continue, whenever it runs)
        name = "on_start" if (first_run or not has_continue) else "on_continue"
        run.transitions += 1
        step.attempt = max(step.attempt, 1)
        runtime = HookRuntime(self, run, now)
        self._mark_hook_running(run)
        try:
            instance = self._instance(run, step, now, runtime)
            if defines_hook(cls, name):
                self._call_hook(run, step, now, getattr(instance, name), name)
            if instance.verdict is None and not has_continue:
                instance.finish()  # its only hook returned: done, its Output model still applies
            check_json(instance.metadata, "metadata")
        except HookTimeoutError as exc:
            return self._time_out(run, step, now, exc)
        except UnstorableValueError as exc:
            error = UnstorableResultError(f"the results of {name} of step {step.name} cannot be stored: {exc}")
            return self._hook_failed(run, step, error, now, name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a failure of this step, not of the worker
            return self._hook_failed(run, step, exc, now, name)
        runtime.merge()
        try:
            return self._record_turn(run, step, instance, now, name, first_run=first_run)
        except ConcurrentUpdateError:
            raise
        except RepositoryError as exc:
            return self._unstorable(run, step, exc, name)

    def _record_turn(
        self,
        run: Run,
        step: StepRecord,
        instance: Step,
        now: datetime,
        hook: str,
        *,
        first_run: bool,
    ) -> bool:
        step.metadata = instance.metadata
        if first_run:
            if not any(s.started_at for s in run.steps):
                run.events.append(self.make_event(run, EventType.PIPELINE_STARTED, None, now))
            self._move(step, Status.PENDING)
            step.started_at = now
            run.pipeline.metadata["current_step"] = step.uuid
            run.events.append(self.make_event(run, EventType.STEP_STARTED, step, now, attempt=step.attempt))
        return self._apply(run, step, instance, instance.verdict, now, hook, first_run=first_run)

    def _unstorable(self, run: Run, step: StepRecord, exc: RepositoryError, hook: str) -> bool:
        """The store refused what a hook produced: count a failed attempt of the step, recorded
        without those results (read back from the store), instead of running the hook forever."""
        logger.error(
            "pipeline %s: the results of %s of step %s could not be stored: %s",
            run.pipeline.uuid, hook, step.name, exc, extra={"pipeline_uuid": run.pipeline.uuid},
        )  # fmt: skip
        fresh = self.store.get_pipeline(run.pipeline.uuid)
        if fresh is None or (run.token is not None and fresh.lease_owner != run.token):
            raise ConcurrentUpdateError(f"pipeline {run.pipeline.uuid}: lease lost", uuid=run.pipeline.uuid) from exc
        reloaded = self._load(fresh)
        run.pipeline, run.steps, run.outputs = reloaded.pipeline, reloaded.steps, reloaded.outputs
        run.events, run.consumed = [], []
        run.pipeline.crashes = 0
        current = next(s for s in run.steps if s.uuid == step.uuid)
        current.attempt = max(current.attempt, 1)
        error = UnstorableResultError(f"the results of {hook} of step {step.name} could not be stored: {exc}")
        return self._hook_failed(run, current, error, self.clock.now(), hook, attempts=STORE_ATTEMPTS)

    def _apply(
        self,
        run: Run,
        step: StepRecord,
        instance: Step,
        verdict: Verdict | None,
        now: datetime,
        hook: str,
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
            step.error = ErrorInfo(type="StepFailed", message=verdict.reason or "failed", hook=hook)
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

    def _hook_failed(
        self, run: Run, step: StepRecord, exc: BaseException, now: datetime, hook: str, *, attempts: int = 1
    ) -> bool:
        """Count a failed attempt: retry with backoff while the step has attempts left (at
        least ``attempts``), else fail the step."""
        cls = run.classes[step.uuid]
        step.error = ErrorInfo.from_exception(exc, hook=hook)
        context = {"pipeline_uuid": run.pipeline.uuid, "step_uuid": step.uuid}
        policy = self.policies.of(cls)
        max_attempts = max(policy.max_attempts, attempts)
        if policy.retries(exc, step.attempt, at_least=attempts):
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

    def _time_out(self, run: Run, step: StepRecord, now: datetime, error: StepTimeoutError) -> bool:
        """The step, or one hook call of it, ran out of time: ``on_timeout`` runs, then the step
        is retried from ``on_start`` per its attempts, or fails. True to go on in this pass."""
        cls = run.classes[step.uuid]
        run.transitions += 1
        step.attempt = max(step.attempt, 1)
        if cls.on_timeout is not Step.on_timeout:
            self._mark_hook_running(run)
            try:
                self._call_hook(run, step, now, self._instance(run, step, now).on_timeout, "on_timeout")
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # the timeout stands; keep what on_timeout raised in the log
                logger.error("on_timeout of step %s in pipeline %s raised %s", step.name, run.pipeline.uuid, exc)
        run.pipeline.crashes = 0
        step.error = ErrorInfo(type=type(error).__name__, message=str(error))
        logger.error("pipeline %s: %s", run.pipeline.uuid, error, extra={"pipeline_uuid": run.pipeline.uuid})
        if step.attempt < self._max_attempts(cls):
            step.attempt += 1
            if step.status == Status.PENDING:  # a new attempt starts the step again
                self._move(step, Status.CREATED)
            step.started_at = None
            run.crashed_hook_at = None
            self._schedule_retry(run, step, step.attempt - 1, error, now, timeout=True)
            return False
        self._end_step(run, step, Status.FAILED, EventType.STEP_FAILED, now, error=step.error.message, timeout=True)
        return self._commit(run, [step], stop=False)

    def _schedule_retry(
        self, run: Run, step: StepRecord, attempt: int, exc: BaseException, now: datetime, **data: Any
    ) -> float:
        """Back off before attempt ``attempt + 1``: record when, say so in the history, stop."""
        delay = self.policies.of(run.classes[step.uuid]).delay(attempt)
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
        self._mark_hook_running(run)
        try:
            self._call_hook(run, step, now, self._instance(run, step, now).on_rollback, "on_rollback")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            error = ErrorInfo.from_exception(exc, hook="on_rollback")
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
        if step is not None:
            self._run_on_cancel(run, step, now)
            self._end_step(run, step, Status.CANCELLED, EventType.STEP_CANCELLED, now)
        run.pipeline.cancel_requested = False  # only now: a crash in on_cancel leaves the request
        self._commit(run, [step] if step else [], stop=True)

    def _run_on_cancel(self, run: Run, step: StepRecord, now: datetime, instance: Step | None = None) -> None:
        cls = run.classes[step.uuid]
        if cls.on_cancel is Step.on_cancel:
            return
        self._mark_hook_running(run)
        try:
            target = instance or self._instance(run, step, now)
            self._call_hook(run, step, now, target.on_cancel, "on_cancel")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the cancel stands; the hook's error is kept for a look
            step.error = ErrorInfo.from_exception(exc, hook="on_cancel")
            logger.error("on_cancel of step %s in pipeline %s raised %s", step.name, run.pipeline.uuid, exc)

    def _quarantine(self, run: Run) -> None:
        """Workers died again and again while this pipeline's hooks ran: fail it instead of
        running its hooks once more (no rollback either: a rollback hook may be what kills them)."""
        now = self.clock.now()
        error = ErrorInfo(
            type="WorkerCrashed",
            message=(
                f"quarantined: a worker died {run.pipeline.crashes} times in a row while a hook of this "
                f"pipeline was running (limit {self.max_crashes}); fix the cause, then retry it "
                f"(prorch retry {run.pipeline.uuid})"
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
        """Persist one transition; returns whether the pass goes on with this pipeline. A write
        refused while we still hold the lease (by its token) was an outside request (a message's
        wake-up, a cancel request, a priority change): it is merged and the write made again."""
        self._settle(run)
        pipeline = run.pipeline
        stop = stop or pipeline.status in TERMINAL
        for _ in range(MAX_MERGES):
            now = self.clock.now()
            self._prepare(run, stop, now)
            added: list[Record] = list(run.events)
            if self.registry.reactions:
                from prorch.reactions import reaction_tasks

                added += reaction_tasks(self.registry, pipeline.name, run.events, now)
            try:
                self.store.commit([*steps, pipeline], added, run.consumed)
                break
            except ConcurrentUpdateError:
                if not self._merge_outside_write(run):
                    raise
        else:  # pragma: no cover - MAX_MERGES outside writes during one transition
            raise ConcurrentUpdateError(f"pipeline {pipeline.uuid} kept changing; giving up this transition")
        run.events = []
        run.consumed = []
        run.dirty = False
        return not stop

    def _prepare(self, run: Run, stop: bool, now: datetime) -> None:
        """The pipeline's scheduling fields for this write: due time, lease, hook mark."""
        pipeline = run.pipeline
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
            pipeline.claims = 0
            pipeline.hook_started_at = None
        else:
            if pipeline.lease_owner is not None:
                pipeline.lease_expires_at = now + timedelta(seconds=self.lease_seconds)
            pipeline.hook_started_at = now  # the pass goes on: the next hook starts now
        for index, event in enumerate(run.events):  # order within one commit, for history()
            event.seq = (pipeline.revision + 1) * 1000 + index

    def _merge_outside_write(self, run: Run) -> bool:
        """Our write was refused. If our lease token still holds the pipeline, someone wrote it
        from outside: take their changes (revision, cancel request, priority) and return True
        to write again. Otherwise the lease was lost: False."""
        if run.token is None or not self.store.has_transaction:
            return False
        fresh = self.store.get_pipeline(run.pipeline.uuid)
        if fresh is None or fresh.status in TERMINAL or fresh.lease_owner != run.token:
            return False
        pipeline = run.pipeline
        pipeline.revision = fresh.revision
        pipeline.priority = fresh.priority
        pipeline.cancel_requested = pipeline.cancel_requested or fresh.cancel_requested
        run.woken = True  # a message may have arrived: be due again at once
        return True

    def _park(self, run: Run, until: datetime) -> None:
        """Stop for now without running a hook: release the lease, be due again at ``until``."""
        pipeline = run.pipeline
        unchanged = pipeline.lease_owner is None and pipeline.hook_started_at is None and not run.dirty
        if unchanged and pipeline.next_run_at == until:
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
