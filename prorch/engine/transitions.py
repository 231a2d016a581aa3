"""The state machine of one pipeline's records, as pure functions: each takes the ``Run`` and
``now`` and changes records and pending events in memory. No I/O and no hooks here: the journal
writes what these functions decide, and ``tests/unit/test_transitions.py`` checks them alone."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import msgspec

from prorch.engine.policy import Policies
from prorch.engine.state import Outcome, Run
from prorch.model import step_logs
from prorch.model.exceptions import InvalidStateError
from prorch.model.mixins import defines_hook
from prorch.model.records import ErrorInfo, EventRecord, PipelineRecord, StepRecord, new_uuid
from prorch.model.status import (
    PIPELINE_EVENT_FOR,
    TERMINAL,
    EventType,
    RollbackState,
    Status,
    can_move,
    derive_pipeline_status,
)


def new_event(run: Run, kind: EventType, step: StepRecord | None, now: datetime, **data: Any) -> EventRecord:
    """An event of this pipeline (of ``step`` when given), at ``now``."""
    if step is not None:
        data.setdefault("step", step.name)
    # Built from values the engine holds in the right types (``now`` is aware UTC): a Struct
    # is not validated when made, which matters on the hot path. It is validated on load.
    return EventRecord(
        uuid=new_uuid(),
        pipeline_uuid=run.pipeline.uuid,
        step_uuid=step.uuid if step else None,
        type=kind,
        at=now,
        seq=0,
        data=data,
    )


def move(record: PipelineRecord | StepRecord, status: Status) -> None:
    """Change a record's status, refusing a move the state machine does not allow."""
    if not can_move(record.status, status):
        raise InvalidStateError(
            f"{record.MODEL} {record.uuid} cannot move from {record.status.value} to {status.value}"
        )
    record.status = status


def start_step(run: Run, step: StepRecord, now: datetime) -> None:
    """The step's ``on_start`` returned: it is pending (the pipeline started with its first step)."""
    move(step, Status.PENDING)
    mark_started(run, step, now)


def mark_started(run: Run, step: StepRecord, now: datetime) -> None:
    """The step has started: its time and the history say so (the pipeline's too, with its first)."""
    if not any(s.started_at for s in run.steps):
        run.events.append(new_event(run, EventType.PIPELINE_STARTED, None, now))
    step.started_at = now
    run.pipeline.metadata["current_step"] = step.uuid
    run.events.append(new_event(run, EventType.STEP_STARTED, step, now, attempt=step.attempt))


def end_step(run: Run, step: StepRecord, status: Status, event: EventType, now: datetime, **data: Any) -> None:
    """The step reached a verdict (finished, failed, cancelled)."""
    move(step, status)
    step.finished_at = now
    step.next_run_at = None
    run.events.append(new_event(run, event, step, now, **data))


def finish_step(run: Run, step: StepRecord, output: Any, now: datetime) -> None:
    step.output = output
    step.error = None
    run.outputs[step.name] = output
    end_step(run, step, Status.FINISHED, EventType.STEP_FINISHED, now)


def fail_step(run: Run, step: StepRecord, error: ErrorInfo, now: datetime, **data: Any) -> None:
    if step.started_at is None and error.hook == "on_start":  # it did start: failing in on_start
        mark_started(run, step, now)
    step.error = error
    end_step(run, step, Status.FAILED, EventType.STEP_FAILED, now, error=error.message, **data)


def plan_retry(run: Run, step: StepRecord, attempt: int, error: str, now: datetime, delay: float, **data: Any) -> None:
    """Back off ``delay`` seconds before attempt ``attempt + 1``, and say so in the history."""
    step.next_run_at = now + timedelta(seconds=delay)
    retry_at = step.next_run_at.isoformat()
    run.events.append(
        new_event(run, EventType.STEP_RETRYING, step, now, attempt=attempt + 1, error=error, retry_at=retry_at, **data)
    )


def restart_after_timeout(run: Run, step: StepRecord) -> None:
    """A timed-out step's next attempt starts it again, from ``on_start``."""
    step.attempt += 1
    if step.status == Status.PENDING:
        move(step, Status.CREATED)
    step.started_at = None
    run.crashed_hook_at = None


def rolled_back(run: Run, step: StepRecord, now: datetime, error: ErrorInfo | None) -> None:
    """A finished step's ``on_rollback`` is done with: it ran, or failed for good (``error``)."""
    if error is None:
        step.rollback = RollbackState.DONE
        run.events.append(new_event(run, EventType.STEP_ROLLED_BACK, step, now))
    else:
        step.rollback = RollbackState.FAILED
        step.error = error
        run.events.append(new_event(run, EventType.STEP_ROLLBACK_FAILED, step, now, error=error.message))
    step.next_run_at = None


def settle(run: Run, now: datetime) -> bool:
    """Derive the pipeline's status from its steps; True when the record changed. A failed
    pipeline stays pending until its rollbacks have run."""
    pipeline = run.pipeline
    derived = derive_pipeline_status(s.status for s in run.steps)
    if derived == Status.FAILED and run.pending_rollbacks():
        derived = Status.PENDING
    if derived == pipeline.status:
        return False
    move(pipeline, derived)
    if derived in TERMINAL:
        if derived == Status.FAILED:
            pipeline.last_error = next((s.error for s in run.steps if s.status == Status.FAILED), pipeline.last_error)
        run.events.append(new_event(run, PIPELINE_EVENT_FOR[derived], None, now, **run.note))
    return True


def deadline(run: Run, step: StepRecord, policies: Policies) -> datetime | None:
    """When the step must have a verdict: ``timeout`` after its start. A step whose
    ``on_start`` was running when its worker died started when that hook did."""
    if step.status == Status.PENDING:
        started = step.started_at
    elif step.status == Status.CREATED:
        started = run.crashed_hook_at
    else:
        return None
    return policies.of(run.classes[step.uuid]).deadline(started)


def wake_time(run: Run, now: datetime, policies: Policies) -> datetime:
    """When the pipeline is next due: its step's wait or backoff, or its timeout if sooner."""
    step, rollback = run.next_step()
    if step is None:
        return now
    candidates = [t for t in (step.next_run_at, None if rollback else deadline(run, step, policies)) if t is not None]
    return min(candidates) if candidates else now


def schedule(
    run: Run, *, stop: bool, now: datetime, lease_seconds: float, policies: Policies, mark: bool = True
) -> None:
    """The pipeline's scheduling fields for the next write: due time, lease, hook mark (unless
    ``mark`` is False: the pass goes on, but no hook is starting yet)."""
    pipeline = run.pipeline
    pipeline.updated_at = now
    if pipeline.status in TERMINAL:
        pipeline.next_run_at = None
    elif stop:
        pipeline.next_run_at = now if run.woken else wake_time(run, now, policies)
    elif pipeline.next_run_at is None:
        pipeline.next_run_at = now  # a crash before the last commit must leave it due
    pipeline.hook_shared = False  # one write, one pipeline (group commit's rounds share it)
    if stop:
        release(pipeline)
        pipeline.hook_started_at = None
    else:
        if pipeline.lease_owner is not None:
            pipeline.lease_expires_at = now + timedelta(seconds=lease_seconds)
        pipeline.hook_started_at = now if mark else None  # the pass goes on: the next hook starts now
    for index, event in enumerate(run.events):  # order within one commit, for history()
        event.seq = (pipeline.revision + 1) * 1000 + index


def release(pipeline: PipelineRecord) -> None:
    """Give the lease up."""
    pipeline.lease_owner = None
    pipeline.lease_expires_at = None
    pipeline.claims = 0


def charge_crash(run: Run) -> bool:
    """A hook was marked running and its result never recorded: the worker running it died or
    vanished. Charge this pipeline (and no other one of that worker's batch); True if charged.
    A mark shared by a round of group commit charges nothing: several pipelines' hooks ran
    under it, and the crash cannot be pinned on one. Either way the mark is taken off, so that
    the next hook is marked afresh, on its own (see ``rounds``)."""
    pipeline = run.pipeline
    if pipeline.hook_started_at is None or pipeline.status in TERMINAL:
        return False
    run.crashed_hook_at = pipeline.hook_started_at
    pipeline.hook_started_at = None
    run.dirty = True
    if pipeline.hook_shared:
        pipeline.hook_shared = False
        return False
    pipeline.crashes += 1
    return True


def share_hook_mark(pipeline: PipelineRecord) -> bool:
    """The write about to be stored is part of a round of group commit: if it marks a hook
    running, so do the round's other writes, and a crash would not be this pipeline's alone.
    True when that changed the record."""
    if pipeline.hook_started_at is None or pipeline.hook_shared:
        return False
    pipeline.hook_shared = True
    return True


def quarantine(run: Run, now: datetime, error: ErrorInfo) -> list[StepRecord]:
    """Fail the pipeline without running a hook (no rollback either: a rollback hook may be what
    kills the workers). Returns the changed steps."""
    changed = [s for s in run.steps if s.status == Status.FINISHED and s.rollback is None]
    for finished in changed:
        finished.rollback = RollbackState.SKIPPED
    step = run.current_step()
    if step is not None:
        fail_step(run, step, error, now, quarantined=True)
        changed.append(step)
    run.pipeline.last_error = error
    return changed


def reset_for_retry(run: Run, now: datetime, note: dict[str, str] | None = None) -> list[StepRecord]:
    """Put a failed pipeline back to pending from its failed step, with fresh attempts: the step
    runs again the hook that failed; rolled-back steps run again; the others keep their results.
    The errors it clears are kept in the ``pipeline.retried`` event, with ``note`` (an
    operator's actor and reason). Returns the changed steps."""
    changed = []
    errors = earlier_errors(run)
    for step in run.steps:
        if step.status == Status.FAILED:
            if failed_in_on_start(run, step):
                move(step, Status.CREATED)
                step.started_at = None
            else:
                move(step, Status.PENDING)
                step.started_at = now  # a fresh `timeout` window for the retried attempts
        elif step.rollback == RollbackState.DONE:
            move(step, Status.CREATED)  # compensated: its effect is gone, do it again
            step.started_at = step.finished_at = None
            step.output = None
            step.metadata = {}
        elif step.rollback is None:
            continue
        step.attempt = step.rollback_attempt = 0
        step.logs = step_logs.closed(step.logs)  # the attempts start again: in entries of their own
        step.error = step.rollback = step.finished_at = step.next_run_at = None
        changed.append(step)
    move(run.pipeline, Status.PENDING)
    run.pipeline.last_error = None
    run.pipeline.crashes = 0
    run.pipeline.hook_started_at = None
    run.events.append(
        new_event(
            run, EventType.PIPELINE_RETRIED, None, now, steps=[s.name for s in changed], errors=errors, **(note or {})
        )
    )
    return changed


def earlier_errors(run: Run) -> list[dict[str, Any]]:
    """The errors a retry clears (each step's, with its attempt and traceback; the pipeline's
    when no step has one), so that the history keeps them."""
    errors = [
        {"step": step.name, "attempt": step.attempt, **msgspec.structs.asdict(step.error)}
        for step in run.steps
        if step.error is not None
    ]
    if not errors and run.pipeline.last_error is not None:
        errors.append({"step": None, "attempt": None, **msgspec.structs.asdict(run.pipeline.last_error)})
    return errors


def failed_in_on_start(run: Run, step: StepRecord) -> bool:
    """Whether a retry of this failed step starts it again (``on_start``) rather than going on
    with ``on_continue``: when it failed in ``on_start``, has no ``on_continue``, never started,
    or timed out (a timeout restarts a step)."""
    if not defines_hook(run.classes[step.uuid], "on_continue") or step.started_at is None:
        return True
    error = step.error
    if error is None:
        return False
    if error.hook is not None:
        return error.hook == "on_start"
    return error.type in ("StepTimeoutError", "HookTimeoutError")  # recorded before hooks were named


def outcome(run: Run, now: datetime) -> Outcome:
    pipeline = run.pipeline
    waiting = pipeline.next_run_at if pipeline.status == Status.PENDING else None
    if waiting is not None and waiting <= now:
        waiting = None
    return Outcome(pipeline.uuid, pipeline.status, run.transitions, waiting_until=waiting)
