"""The state of one advance of one pipeline (``Run``), what it did (``Outcome``), and the shape
of the runner's work (``Writing``)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

from prorch.model.records import EventRecord, MessageRecord, PipelineRecord, StepRecord, StreamRecord
from prorch.model.status import Status
from prorch.model.step import Step
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Snapshots, Write

T = TypeVar("T")

Writing: TypeAlias = Generator[Write, None, T]
"""The runner's work on one pipeline, as a generator: it yields each transition to store and
is resumed once that is stored (with nothing), or with the store's error thrown in. The runner
never commits by itself, so that whoever drives it chooses: one commit per transition
(``rounds.write_each``) or several pipelines' transitions per commit (``rounds.write_in_rounds``)."""


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
    stream: list[StreamRecord] = field(default_factory=list)  # entries emitted, to store with the next transition
    stream_seq: int | None = None  # the last stored entry's seq, once read (None: not read yet)
    transitions: int = 0
    woken: bool = False  # a message arrived while we held the pipeline: be due again at once
    token: str | None = None  # the lease token we claimed the pipeline with (None: no leases)
    keeper: LeaseKeeper | None = None  # renews our lease; told to stop when a hook overruns
    crashed_hook_at: datetime | None = None  # a worker died while a hook that began then ran
    dirty: bool = False  # changed in memory without a transition (a crash charged)
    hooks_left: int | None = None  # hooks this claim may still start (1 for a rate-limited pipeline)
    definition: Any = None  # the pipeline's registered class (its declared patches: self.patched)
    note: dict[str, str] = field(default_factory=dict)  # an operator's actor and reason, for the ending's event
    stored: Snapshots | None = None  # what the store holds of pipeline and steps (None: writes are whole)

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

    def next_step(self) -> tuple[StepRecord | None, bool]:
        """The step whose hook runs next, and whether that hook is a rollback."""
        rollbacks = self.pending_rollbacks()
        return (rollbacks[0], True) if rollbacks else (self.current_step(), False)

    def forget_pending(self) -> None:
        """Drop what was to be written with the next transition (events, consumed messages)."""
        self.events, self.consumed = [], []
        if self.stream:  # not stored: the next emit reads the last stored seq again
            self.stream, self.stream_seq = [], None
