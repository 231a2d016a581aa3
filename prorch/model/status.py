"""The state machine: statuses, the moves allowed between them, and event types.

Pipeline status is never set freely: it is derived from the statuses of its steps, which are
the source of truth (a crash between two writes is repaired by deriving again).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum


class Status(str, Enum):
    """Status of a pipeline or of a step. The values are the seed's strings."""

    CREATED = "created"  # stored, no hook has run yet (a step not started, a seed pipeline not started)
    PENDING = "pending"  # in progress: the orchestrator resumes it when it is due
    FINISHED = "finished"  # done for good (terminal)
    FAILED = "failed"  # gave up after its attempts, or fail() was called (terminal until retry)
    CANCELLED = "cancelled"  # stopped by cancel() (terminal)

    def __str__(self) -> str:
        return self.value


class RollbackState(str, Enum):
    """How a finished step's compensation (``on_rollback``) ended, once a later step failed for good."""

    DONE = "done"  # on_rollback ran to its end: the step's effect is undone
    FAILED = "failed"  # on_rollback raised on every attempt: the step's effect may remain
    SKIPPED = "skipped"  # not run: the pipeline was quarantined (a rollback hook may be what kills workers)

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({Status.FINISHED, Status.FAILED, Status.CANCELLED})

#: The moves a step or a pipeline may make (a pipeline's status follows its steps').
#: Anything else is a bug and is refused loudly.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.CREATED: frozenset({Status.PENDING, Status.FINISHED, Status.FAILED, Status.CANCELLED}),
    # CREATED: a step timed out with attempts left starts again from on_start (restart_after_timeout)
    Status.PENDING: frozenset({Status.CREATED, Status.FINISHED, Status.FAILED, Status.CANCELLED}),
    Status.FINISHED: frozenset({Status.CREATED}),  # Orchestrator.retry() of a step that was rolled back
    Status.FAILED: frozenset({Status.PENDING, Status.CREATED}),  # Orchestrator.retry()
    Status.CANCELLED: frozenset(),
}


def can_move(old: Status, new: Status) -> bool:
    """True when ``old -> new`` is an allowed move (staying put is always allowed)."""
    return old == new or new in TRANSITIONS[old]


def derive_pipeline_status(step_statuses: Iterable[Status]) -> Status:
    """The seed's rule: any failed -> failed, any cancelled -> cancelled, all finished -> finished."""
    statuses = list(step_statuses)
    if Status.FAILED in statuses:
        return Status.FAILED
    if Status.CANCELLED in statuses:
        return Status.CANCELLED
    if statuses and all(status == Status.FINISHED for status in statuses):
        return Status.FINISHED
    return Status.PENDING


class EventType(str, Enum):
    """Types of the append-only history records, one per transition."""

    PIPELINE_CREATED = "pipeline.created"
    PIPELINE_STARTED = "pipeline.started"
    PIPELINE_FINISHED = "pipeline.finished"
    PIPELINE_FAILED = "pipeline.failed"
    PIPELINE_CANCELLED = "pipeline.cancelled"
    PIPELINE_RETRIED = "pipeline.retried"
    PIPELINE_RERUN = "pipeline.rerun"  # Orchestrator.rerun(): data names the new pipeline
    STEP_STARTED = "step.started"
    STEP_FINISHED = "step.finished"
    STEP_RETRYING = "step.retrying"
    STEP_FAILED = "step.failed"
    STEP_CANCELLED = "step.cancelled"
    STEP_ROLLED_BACK = "step.rolled_back"
    STEP_ROLLBACK_FAILED = "step.rollback_failed"
    PIPELINE_CANCEL_REQUESTED = "pipeline.cancel_requested"
    PIPELINE_PAUSED = "pipeline.paused"  # Orchestrator.pause(uuid=...): data has the actor and reason
    PIPELINE_RESUMED = "pipeline.resumed"
    MESSAGE_RECEIVED = "message.received"

    def __str__(self) -> str:
        return self.value


#: The pipeline event that records reaching each terminal status.
PIPELINE_EVENT_FOR: dict[Status, EventType] = {
    Status.FINISHED: EventType.PIPELINE_FINISHED,
    Status.FAILED: EventType.PIPELINE_FAILED,
    Status.CANCELLED: EventType.PIPELINE_CANCELLED,
}
