"""A pipeline's result: its last step's output, checked against the pipeline's own ``Output``
model when it declares one. Read by ``self.child_result``, ``Orchestrator.result`` / ``wait``
and ``prorch wait``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from prorch.model.exceptions import InvalidOutputError, PipelineFailedError, ProrchError
from prorch.model.records import PipelineRecord, StepRecord
from prorch.model.registry import Registry
from prorch.model.status import Status

CHILD_ENDED = "prorch.child_ended"
"""The message a child's end sends its parent, ``{"child": uuid, "status": ...}``: it wakes the
parent at once, even in the middle of a ``wait()``."""


def result_of(record: PipelineRecord, steps: list[StepRecord], registry: Registry) -> Any:
    """The result of a finished pipeline; ``PipelineFailedError`` for a failed or cancelled
    one; None while it runs."""
    if record.status in (Status.FAILED, Status.CANCELLED):
        error = record.last_error.message if record.last_error else None
        why = f": {error}" if error else ""
        raise PipelineFailedError(
            f"pipeline {record.uuid} ({record.name}) {record.status.value}{why}",
            uuid=record.uuid,
            status=record.status.value,
            error=error,
        )
    if record.status != Status.FINISHED:
        return None
    ordered = sorted(steps, key=lambda s: (s.position is None, s.position or 0))
    output = ordered[-1].output if ordered else None
    try:
        model = registry.pipeline(record.name, record.version).Output
    except ProrchError:
        return output  # its code is not loaded here: the stored output as it is
    if model is None:
        return output
    try:
        return model.model_validate(output).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidOutputError(
            f"the result of pipeline {record.uuid} does not match {record.name}.Output: {exc.errors()[0]['msg']}"
        ) from exc
