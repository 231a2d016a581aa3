"""What the orchestrator reports: a pass's summary and one pipeline's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from prorch.engine import Outcome
from prorch.model.records import EventRecord, PipelineRecord, StepRecord
from prorch.model.status import TERMINAL, EventType, Status


@dataclass
class PassSummary:
    """What one pass did. ``errors`` maps a pipeline uuid to the error that stopped its advance
    (or ``schedule:NAME`` to the error that stopped a schedule creating its tick's pipeline);
    ``blocked`` maps a pipeline uuid to why its code is not available."""

    claimed: int = 0
    advanced: int = 0
    transitions: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    waiting: int = 0
    blocked: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    scheduled: int = 0  # pipelines created for schedule ticks at the start of the pass
    abandoned_hooks: int = 0  # hung hook threads of this orchestrator still running after the pass

    def add(self, outcome: Outcome) -> None:
        if outcome.blocked:
            self.blocked[outcome.uuid] = outcome.blocked
            return
        self.advanced += 1
        self.transitions += outcome.transitions
        if outcome.status == Status.FINISHED:
            self.finished += 1
        elif outcome.status == Status.FAILED:
            self.failed += 1
        elif outcome.status == Status.CANCELLED:
            self.cancelled += 1
        elif outcome.waiting_until is not None:
            self.waiting += 1

    @property
    def did_something(self) -> bool:
        return bool(self.claimed or self.errors)


@dataclass
class PipelineState:
    """A pipeline with its steps, as ``Orchestrator.get`` returns it. ``blocked`` says why its
    code is missing, when it is."""

    pipeline: PipelineRecord
    steps: list[StepRecord]
    blocked: str | None = None  # not ended, and its code is missing here: it waits for it
    code_missing: str | None = None  # ended, and its code is not loaded here (nothing waits)
    children: list[PipelineRecord] = field(default_factory=list)  # started by its hooks (start_child)

    @property
    def current_step(self) -> StepRecord | None:
        """The step the pipeline is on (``metadata["current_step"]``), or None before the first."""
        uuid = self.pipeline.metadata.get("current_step")
        return next((step for step in self.steps if step.uuid == uuid), None)

    def next_run(self, now: datetime, history: list[EventRecord] | None = None) -> tuple[datetime | None, str]:
        """When the pipeline runs next and why then: "due now", "waiting", "backoff after
        attempt N failed" (told apart by the current step's last event, from ``history``),
        "running on OWNER", "blocked: ...", or "ended"."""
        p = self.pipeline
        if p.status in TERMINAL:
            return None, "ended"
        if self.blocked:
            return None, f"blocked: {self.blocked}"
        if p.lease_owner and p.lease_expires_at is not None and p.lease_expires_at > now:
            return None, f"running on {p.lease_owner} (lease until {p.lease_expires_at.isoformat()})"
        if p.next_run_at is None or p.next_run_at <= now:
            return p.next_run_at or now, "due now"
        step = self.current_step
        last = next((e for e in reversed(history or []) if step is not None and e.step_uuid == step.uuid), None)
        if last is not None and last.type == EventType.STEP_RETRYING:
            failed = int(last.data.get("attempt", 2)) - 1
            return p.next_run_at, f"backoff after attempt {failed} failed: {last.data.get('error', '')}"
        if step is not None and step.rollback is not None:
            return p.next_run_at, "rolling back"
        return p.next_run_at, "waiting (a hook called wait())"
