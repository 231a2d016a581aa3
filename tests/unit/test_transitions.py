"""The state machine's pure functions (prorch/engine/transitions.py): records in memory, no
store, no hooks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from prorch import InvalidStateError, OnContinueMixin, OnStartMixin, Step
from prorch.engine import transitions
from prorch.engine.policy import Policies, StepOverride
from prorch.engine.state import Run
from prorch.model.records import ErrorInfo, PipelineRecord, StepRecord, new_uuid
from prorch.model.status import EventType, RollbackState, Status

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


class Plain(OnStartMixin, Step):
    name = "Plain"

    def on_start(self) -> None: ...


class Polling(OnStartMixin, OnContinueMixin, Step):
    name = "Polling"
    timeout = 60

    def on_start(self) -> None: ...

    def on_continue(self) -> None: ...


class Compensated(OnStartMixin, Step):
    name = "Compensated"

    def on_start(self) -> None: ...

    def on_rollback(self) -> None: ...


def make_run(*classes: type[Step], **pipeline: Any) -> Run:
    record = PipelineRecord(uuid=new_uuid(), name="P", status=Status.PENDING, revision=4, **pipeline)
    steps = [
        StepRecord(
            uuid=new_uuid(), pipeline_uuid=record.uuid, name=cls.name or "", position=index, status=Status.CREATED
        )
        for index, cls in enumerate(classes)
    ]
    return Run(
        pipeline=record,
        steps=steps,
        classes={s.uuid: cls for s, cls in zip(steps, classes, strict=True)},
        params={},
        outputs={},
    )


def kinds(run: Run) -> list[EventType]:
    return [event.type for event in run.events]


def test_the_first_start_starts_the_pipeline_too() -> None:
    run = make_run(Plain, Plain)
    first, second = run.steps
    transitions.start_step(run, first, NOW)
    transitions.start_step(run, second, NOW)
    assert kinds(run) == [EventType.PIPELINE_STARTED, EventType.STEP_STARTED, EventType.STEP_STARTED]
    assert run.pipeline.metadata["current_step"] == second.uuid
    assert first.status == Status.PENDING and first.started_at == NOW


def test_a_forbidden_move_is_refused_loudly() -> None:
    run = make_run(Plain)
    (step,) = run.steps
    transitions.finish_step(run, step, {"ok": 1}, NOW)
    with pytest.raises(InvalidStateError, match="cannot move from finished to pending"):
        transitions.move(step, Status.PENDING)


def test_settle_derives_the_pipeline_from_its_steps() -> None:
    run = make_run(Plain, Plain)
    assert transitions.settle(run, NOW) is False  # created steps: still pending
    for step in run.steps:
        transitions.finish_step(run, step, None, NOW)
    assert transitions.settle(run, NOW) is True
    assert run.pipeline.status == Status.FINISHED
    assert kinds(run)[-1] == EventType.PIPELINE_FINISHED
    assert run.outputs == {"Plain": None}


def test_a_failed_pipeline_stays_pending_until_its_rollbacks_ran() -> None:
    run = make_run(Compensated, Plain)
    done, failing = run.steps
    transitions.finish_step(run, done, None, NOW)
    transitions.fail_step(run, failing, ErrorInfo(type="Boom", message="boom"), NOW)
    assert transitions.settle(run, NOW) is False and run.pipeline.status == Status.PENDING
    assert run.next_step() == (done, True)
    transitions.rolled_back(run, done, NOW, None)
    assert done.rollback == RollbackState.DONE
    assert transitions.settle(run, NOW) is True
    assert run.pipeline.status == Status.FAILED and run.pipeline.last_error is not None
    assert run.pipeline.last_error.message == "boom"


def test_the_deadline_counts_from_the_start_or_from_the_crashed_hook() -> None:
    run = make_run(Polling)
    (step,) = run.steps
    policies = Policies()
    assert transitions.deadline(run, step, policies) is None  # not started, no crash
    run.crashed_hook_at = NOW
    assert transitions.deadline(run, step, policies) == NOW + timedelta(seconds=60)
    transitions.start_step(run, step, NOW + timedelta(seconds=5))
    assert transitions.deadline(run, step, policies) == NOW + timedelta(seconds=65)
    overridden = Policies({"Polling": StepOverride(timeout=10)})
    assert transitions.deadline(run, step, overridden) == NOW + timedelta(seconds=15)


def test_the_wake_time_is_the_wait_or_the_timeout_whichever_is_sooner() -> None:
    run = make_run(Polling)
    (step,) = run.steps
    transitions.start_step(run, step, NOW)
    step.next_run_at = NOW + timedelta(seconds=30)
    assert transitions.wake_time(run, NOW, Policies()) == NOW + timedelta(seconds=30)
    step.next_run_at = NOW + timedelta(seconds=600)
    assert transitions.wake_time(run, NOW, Policies()) == NOW + timedelta(seconds=60)


def test_schedule_keeps_the_lease_while_the_pass_goes_on_and_releases_it_at_a_stop() -> None:
    run = make_run(Plain, lease_owner="token", lease_expires_at=NOW, claims=2)
    run.events.append(transitions.new_event(run, EventType.STEP_STARTED, run.steps[0], NOW))
    transitions.schedule(run, stop=False, now=NOW, lease_seconds=30, policies=Policies())
    assert run.pipeline.lease_expires_at == NOW + timedelta(seconds=30)
    assert run.pipeline.hook_started_at == NOW and run.pipeline.next_run_at == NOW
    assert run.events[0].seq == 5000  # (revision + 1) * 1000 + index
    transitions.schedule(run, stop=True, now=NOW, lease_seconds=30, policies=Policies())
    assert (run.pipeline.lease_owner, run.pipeline.claims, run.pipeline.hook_started_at) == (None, 0, None)


def test_a_retry_is_planned_with_its_time_and_an_event() -> None:
    run = make_run(Plain)
    (step,) = run.steps
    transitions.plan_retry(run, step, 1, "boom", NOW, 2.5, rollback=True)
    assert step.next_run_at == NOW + timedelta(seconds=2.5)
    (event,) = run.events
    assert event.type == EventType.STEP_RETRYING
    assert event.data == {"step": "Plain", "attempt": 2, "error": "boom", "retry_at": step.next_run_at.isoformat(),
                          "rollback": True}  # fmt: skip


def test_a_crash_is_charged_once_and_only_while_a_hook_was_marked() -> None:
    run = make_run(Plain)
    assert transitions.charge_crash(run) is False
    run.pipeline.hook_started_at = NOW
    assert transitions.charge_crash(run) is True
    assert (run.pipeline.crashes, run.crashed_hook_at, run.pipeline.hook_started_at) == (1, NOW, None)
    assert transitions.charge_crash(run) is False


def test_a_mark_shared_by_a_round_charges_nothing_but_is_taken_off() -> None:
    run = make_run(Plain)
    run.pipeline.hook_started_at, run.pipeline.hook_shared = NOW, True
    assert transitions.charge_crash(run) is False
    assert (run.pipeline.crashes, run.pipeline.hook_started_at, run.pipeline.hook_shared) == (0, None, False)
    assert run.crashed_hook_at == NOW and run.dirty  # the step's deadline still counts from then


def test_only_a_round_shares_marks_and_every_other_write_unshares_them() -> None:
    run = make_run(Plain)
    transitions.schedule(run, stop=False, now=NOW, lease_seconds=30, policies=Policies())
    transitions.share_hook_mark(run.pipeline)
    assert run.pipeline.hook_shared
    transitions.schedule(run, stop=False, now=NOW, lease_seconds=30, policies=Policies())
    assert not run.pipeline.hook_shared and run.pipeline.hook_started_at == NOW
    transitions.schedule(run, stop=True, now=NOW, lease_seconds=30, policies=Policies())
    transitions.share_hook_mark(run.pipeline)  # no mark: nothing to share
    assert not run.pipeline.hook_shared and run.pipeline.hook_started_at is None


def test_a_charge_write_marks_no_hook() -> None:
    run = make_run(Plain)
    transitions.schedule(run, stop=False, now=NOW, lease_seconds=30, policies=Policies(), mark=False)
    assert run.pipeline.hook_started_at is None


def test_quarantine_fails_the_current_step_and_skips_the_rollbacks() -> None:
    run = make_run(Compensated, Plain)
    done, current = run.steps
    transitions.finish_step(run, done, None, NOW)
    error = ErrorInfo(type="WorkerCrashed", message="quarantined")
    changed = transitions.quarantine(run, NOW, error)
    assert changed == [done, current]
    assert done.rollback == RollbackState.SKIPPED and current.status == Status.FAILED
    assert run.pipeline.last_error == error


def test_a_retry_restarts_the_failed_step_and_redoes_the_compensated_ones() -> None:
    run = make_run(Compensated, Polling)
    done, failed = run.steps
    transitions.finish_step(run, done, {"id": 1}, NOW)
    transitions.start_step(run, failed, NOW)
    transitions.fail_step(run, failed, ErrorInfo(type="Boom", message="x", hook="on_continue"), NOW)
    transitions.rolled_back(run, done, NOW, None)
    transitions.settle(run, NOW)
    run.events.clear()
    changed = transitions.reset_for_retry(run, NOW)
    assert changed == [done, failed]
    assert done.status == Status.CREATED and done.output is None  # its effect was undone: again
    assert failed.status == Status.PENDING  # failed in on_continue: goes on with on_continue
    assert run.pipeline.status == Status.PENDING and kinds(run) == [EventType.PIPELINE_RETRIED]


@pytest.mark.parametrize(
    ("cls", "started", "hook", "type_", "expected"),
    [
        (Plain, True, "on_start", "Boom", True),  # no on_continue: always from on_start
        (Polling, False, None, "Boom", True),  # never started
        (Polling, True, "on_start", "Boom", True),
        (Polling, True, "on_continue", "Boom", False),
        (Polling, True, None, "StepTimeoutError", True),  # a timeout restarts the step
        (Polling, True, None, "HookTimeoutError", True),  # as recorded before hooks were named
        (Polling, True, None, "Boom", False),
        (Polling, True, None, None, False),  # no error kept: it goes on with on_continue
    ],
)
def test_which_hook_a_retried_step_runs_again(
    cls: type[Step], started: bool, hook: str | None, type_: str | None, expected: bool
) -> None:
    run = make_run(cls)
    (step,) = run.steps
    step.started_at = NOW if started else None
    step.error = None if type_ is None else ErrorInfo(type=type_, message="x", hook=hook)
    assert transitions.failed_in_on_start(run, step) is expected


def test_the_outcome_reports_a_future_wait_only() -> None:
    run = make_run(Plain, next_run_at=NOW + timedelta(seconds=5))
    assert transitions.outcome(run, NOW).waiting_until == NOW + timedelta(seconds=5)
    assert transitions.outcome(run, NOW + timedelta(seconds=5)).waiting_until is None


def test_a_retry_starts_afresh_with_no_stale_crash_error_mark_window_or_metadata() -> None:
    """A retry kept crashes, last_error, the hook mark, the old start time (a stale timeout
    window) or the redone step's metadata without any test noticing."""
    old, later = NOW - timedelta(hours=1), NOW + timedelta(hours=2)
    run = make_run(Compensated, Polling, Plain)
    done, failed, untouched = run.steps
    transitions.start_step(run, done, old)
    done.metadata = {"charged": "card-1"}
    transitions.finish_step(run, done, {"id": 1}, old)
    transitions.start_step(run, failed, old)
    failed.attempt, failed.rollback_attempt = 3, 1
    failed.metadata = {"polls": 7}
    transitions.plan_retry(run, failed, 3, "x", old, 5)
    transitions.fail_step(run, failed, ErrorInfo(type="Boom", message="x", hook="on_continue"), old)
    done.rollback_attempt = 2
    transitions.rolled_back(run, done, old, None)
    transitions.settle(run, old)
    run.pipeline.crashes, run.pipeline.hook_started_at = 2, old
    assert run.pipeline.status == Status.FAILED and run.pipeline.last_error is not None
    run.events.clear()

    changed = transitions.reset_for_retry(run, later)

    assert changed == [done, failed] and untouched.status == Status.CREATED
    pipeline = run.pipeline
    assert (pipeline.status, pipeline.crashes, pipeline.last_error, pipeline.hook_started_at) == (
        Status.PENDING, 0, None, None,
    )  # fmt: skip
    assert failed.started_at == later  # its timeout window starts again now
    assert failed.metadata == {"polls": 7}  # it goes on with on_continue, with what it kept
    assert done.metadata == {} and done.output is None and done.started_at is None  # done again from scratch
    for step in changed:
        assert (step.attempt, step.rollback_attempt, step.error, step.rollback, step.finished_at, step.next_run_at) == (
            0, 0, None, None, None, None,
        )  # fmt: skip
    (event,) = run.events
    assert event.type == EventType.PIPELINE_RETRIED and event.data["steps"] == ["Compensated", "Polling"]
    error = {"type": "Boom", "message": "x", "traceback": None, "hook": "on_continue"}
    assert event.data["errors"] == [{"step": "Polling", "attempt": 3, **error}]  # kept in the history
    assert event.at == later and event.step_uuid is None


def test_a_retry_of_a_step_that_failed_in_on_start_starts_it_again() -> None:
    run = make_run(Polling)
    (step,) = run.steps
    transitions.start_step(run, step, NOW)
    transitions.fail_step(run, step, ErrorInfo(type="Boom", message="x", hook="on_start"), NOW)
    transitions.settle(run, NOW)
    transitions.reset_for_retry(run, NOW + timedelta(minutes=1))
    assert step.status == Status.CREATED and step.started_at is None


def test_a_verdict_records_when_the_step_ended() -> None:
    run = make_run(Plain, Plain)
    first, second = run.steps
    transitions.start_step(run, first, NOW)
    first.next_run_at = NOW + timedelta(seconds=9)
    first.error = ErrorInfo(type="Old", message="x")
    transitions.finish_step(run, first, {"ok": 1}, NOW + timedelta(seconds=3))
    assert first.finished_at == NOW + timedelta(seconds=3) and first.next_run_at is None
    assert first.error is None and first.output == {"ok": 1} and run.outputs["Plain"] == {"ok": 1}
    transitions.start_step(run, second, NOW)
    transitions.fail_step(run, second, ErrorInfo(type="Boom", message="bad"), NOW + timedelta(seconds=4), extra=1)
    assert second.finished_at == NOW + timedelta(seconds=4) and second.status == Status.FAILED
    assert run.events[-1].data == {"step": "Plain", "error": "bad", "extra": 1}


def test_a_steps_events_name_the_step_and_a_pipelines_events_none() -> None:
    run = make_run(Plain)
    (step,) = run.steps
    transitions.start_step(run, step, NOW)
    started_pipeline, started_step = run.events
    assert (started_pipeline.step_uuid, started_pipeline.data) == (None, {})
    assert (started_step.step_uuid, started_step.data) == (step.uuid, {"step": "Plain", "attempt": 0})
    assert started_step.pipeline_uuid == run.pipeline.uuid and started_step.at == NOW


def test_a_rollback_records_its_verdict_on_the_step_and_in_the_history() -> None:
    run = make_run(Compensated, Compensated, Plain)
    undone, unrecoverable, failing = run.steps
    for step in (undone, unrecoverable):
        transitions.finish_step(run, step, None, NOW)
    transitions.fail_step(run, failing, ErrorInfo(type="Boom", message="boom"), NOW)
    run.events.clear()
    unrecoverable.next_run_at = undone.next_run_at = NOW + timedelta(seconds=5)  # a rollback's backoff
    error = ErrorInfo(type="Refund", message="refund refused", hook="on_rollback")
    transitions.rolled_back(run, unrecoverable, NOW, error)
    transitions.rolled_back(run, undone, NOW, None)
    assert (unrecoverable.rollback, unrecoverable.error, unrecoverable.next_run_at) == (
        RollbackState.FAILED, error, None,
    )  # fmt: skip
    assert (undone.rollback, undone.error, undone.next_run_at) == (RollbackState.DONE, None, None)
    failed_event, done_event = run.events
    assert (failed_event.type, failed_event.step_uuid) == (EventType.STEP_ROLLBACK_FAILED, unrecoverable.uuid)
    assert failed_event.data == {"step": "Compensated", "error": "refund refused"}
    assert (done_event.type, done_event.step_uuid, done_event.data) == (
        EventType.STEP_ROLLED_BACK, undone.uuid, {"step": "Compensated"},
    )  # fmt: skip


def test_quarantine_records_when_and_that_the_step_was_quarantined() -> None:
    run = make_run(Plain)
    (current,) = run.steps
    transitions.quarantine(run, NOW, ErrorInfo(type="WorkerCrashed", message="quarantined"))
    assert current.finished_at == NOW
    (event,) = run.events
    assert (event.type, event.at, event.step_uuid) == (EventType.STEP_FAILED, NOW, current.uuid)
    assert event.data == {"step": "Plain", "error": "quarantined", "quarantined": True}


def test_a_stop_with_nothing_to_wait_for_leaves_the_pipeline_due_now() -> None:
    """A created step with no backoff and no timeout: no wake time but now (not None, which
    would leave a pending pipeline never due)."""
    run = make_run(Plain, next_run_at=NOW - timedelta(hours=1))
    transitions.schedule(run, stop=True, now=NOW, lease_seconds=30, policies=Policies())
    assert run.pipeline.next_run_at == NOW


def test_the_outcome_names_its_pipeline_and_reports_no_wait_once_it_ended() -> None:
    run = make_run(Plain, next_run_at=NOW + timedelta(seconds=5))
    assert transitions.outcome(run, NOW).uuid == run.pipeline.uuid
    run.pipeline.status = Status.FINISHED  # a stale due time on an ended pipeline is no wait
    assert transitions.outcome(run, NOW).waiting_until is None
