"""Rerun from a step (a fork): a new pipeline of the same class and version that reuses the
outputs of the original's finished steps before the named step and runs from that step on.

The original is never changed: it only gains a ``pipeline.rerun`` event naming the new
pipeline, written in the same transaction as the new pipeline's records, so both histories
say where the work went, or neither does. The new pipeline carries the original's search
attributes as they stand (it does the same work for the same customer, say), so filtering by
them finds both."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prorch.model import trace_context
from prorch.model.clock import Clock
from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import InvalidParamsError, InvalidStateError, LeaseLostError, PipelineNotFoundError
from prorch.model.records import EventRecord, JSONDict, PipelineRecord, Record, StepRecord, new_uuid
from prorch.model.registry import Registry
from prorch.model.status import EventType, Status
from prorch.storage.creation import build_records, store_new
from prorch.storage.store import Store

FORKED_FROM = "forked_from"
"""The new pipeline's metadata key: ``{"uuid": original, "step": the step it reran from}``."""


@dataclass(frozen=True)
class RerunPlan:
    """A checked rerun, not stored yet: what ``plan_rerun`` found valid."""

    original: PipelineRecord
    definition: type[PipelineDefinition]
    from_step: str
    params: JSONDict
    reused: list[StepRecord]


def plan_rerun(
    original: PipelineRecord,
    original_steps: Sequence[StepRecord],
    from_step: str,
    *,
    registry: Registry,
    params: JSONDict | None = None,
) -> RerunPlan:
    """Check a rerun without storing anything: the step exists, the steps before it finished,
    and the params are valid. ``params`` are changes: the fields given replace the original's,
    the others are kept, and the result is validated like a create's."""
    definition = registry.pipeline(original.name, original.version)
    names = [step.name or "" for step in definition.steps]
    if from_step not in names:
        raise InvalidParamsError(
            f"pipeline {original.name} v{original.version} has no step {from_step!r}; "
            f"rerun from one of: {', '.join(names)}"
        )
    reused = _reused_steps(original, original_steps, definition, names.index(from_step), from_step)
    return RerunPlan(original, definition, from_step, _params(definition, original, params), reused)


def store_rerun(
    store: Store, plan: RerunPlan, clock: Clock, registry: Registry, note: dict[str, str] | None = None
) -> PipelineRecord:
    """Store the new pipeline (pending, due now) and the original's ``pipeline.rerun`` event in
    one transaction, while the original is stored (a purge meanwhile: ``PipelineNotFoundError``,
    and no event is left of a deleted pipeline); return the new pipeline's record. ``note`` (an
    operator's actor and reason) goes into both events."""
    note = note or {}
    original, now = plan.original, clock.now()
    records = build_records(
        plan.definition,
        plan.params,
        now=now,
        context=dict(original.context),
        priority=original.priority,
        trace=trace_context.new_carrier(plan.definition.name),
        attributes=original.attributes,
    )
    pipeline = next(record for record in records if isinstance(record, PipelineRecord))
    pipeline.metadata[FORKED_FROM] = {"uuid": original.uuid, "step": plan.from_step}
    _copy_outputs(records, plan.reused)
    for record in records:
        if isinstance(record, EventRecord) and record.type == EventType.PIPELINE_CREATED:
            record.data.update(
                {
                    FORKED_FROM: original.uuid,
                    "from_step": plan.from_step,
                    "reused": [s.name for s in plan.reused],
                    **note,
                }
            )
    told = EventRecord(
        uuid=new_uuid(),
        pipeline_uuid=original.uuid,
        type=EventType.PIPELINE_RERUN,
        at=now,
        seq=(original.revision + 1) * 1000,
        data={"rerun_uuid": pipeline.uuid, "from_step": plan.from_step, **note},
    )
    try:
        with store.engine.while_leased(original.uuid, None):  # the original stays stored until this commits
            store_new(store, [records], now, registry)
            store.insert_all([told])
    except LeaseLostError:
        raise PipelineNotFoundError(
            f"pipeline {original.uuid} was deleted (purged) while it was rerun; nothing stored", uuid=original.uuid
        ) from None
    return pipeline


def _reused_steps(
    original: PipelineRecord,
    steps: Sequence[StepRecord],
    definition: type[PipelineDefinition],
    position: int,
    from_step: str,
) -> list[StepRecord]:
    """The original's steps before ``from_step``, in order; each must have finished."""
    ordered = _in_order(steps, definition)
    reused = ordered[:position]
    for step in reused:
        if step.status != Status.FINISHED:
            raise InvalidStateError(
                f"step {step.name} of pipeline {original.uuid} is {step.status.value}, not finished, so its "
                f"output cannot be reused: rerun from {step.name} or an earlier step instead of {from_step}"
            )
    return reused


def _in_order(steps: Sequence[StepRecord], definition: type[PipelineDefinition]) -> list[StepRecord]:
    """The stored steps in the class's order (a prorch 1.0.1 store has no positions)."""
    if all(step.position is not None for step in steps):
        return sorted(steps, key=lambda step: step.position or 0)
    by_name = {step.name: step for step in steps}
    return [by_name[step.name] for step in definition.steps if step.name in by_name]


def _params(definition: type[PipelineDefinition], original: PipelineRecord, changes: JSONDict | None) -> JSONDict:
    if changes is None:
        return dict(original.params)
    if not isinstance(changes, dict):
        raise InvalidParamsError(f"rerun params must be a dict of the fields to change, got {type(changes).__name__}")
    return definition.validate_params({**original.params, **changes})


def _copy_outputs(records: list[Record], reused: list[StepRecord]) -> None:
    """The new pipeline's first steps take the original's results; they count as finished."""
    new_steps = [record for record in records if isinstance(record, StepRecord)]
    for new, old in zip(new_steps, reused, strict=False):
        new.status = Status.FINISHED
        new.output = old.output
        new.metadata = dict(old.metadata)
        new.attempt = old.attempt
        new.started_at = old.started_at
        new.finished_at = old.finished_at
