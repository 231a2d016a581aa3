"""What the orchestrator reports: a pass's summary and one pipeline's state."""

from __future__ import annotations

from dataclasses import dataclass, field

from prorch.records import PipelineRecord, StepRecord
from prorch.runner import Outcome
from prorch.status import Status


@dataclass
class PassSummary:
    """What one pass did. ``errors`` maps a pipeline uuid to the error that stopped its advance;
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
