"""What the orchestrator reports: a pass's summary (``prorch.engine.passes``, kept importable
from here) and one pipeline's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from prorch.engine.passes import PassSummary
from prorch.model.records import EventRecord, PipelineRecord, StepRecord
from prorch.model.status import TERMINAL, EventType

__all__ = ["PassSummary", "PipelineState"]


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
