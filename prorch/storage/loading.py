"""Records from the rows a backend returns, validated: a row that is not a valid record is one
``CorruptRecordError`` naming it. ``Store`` loads every record it returns here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from prorch.model.exceptions import CorruptRecordError
from prorch.model.records import Record, RecordError, StepRecord

__all__ = ["load", "steps_by_pipeline"]

RecordT = TypeVar("RecordT", bound=Record)


def load(record_type: type[RecordT], data: Any) -> RecordT:
    """A record from a row."""
    try:
        record = record_type.from_dict(data)
    except (RecordError, TypeError, ValueError) as exc:
        uuid = data.get("uuid") if isinstance(data, dict) else None
        raise CorruptRecordError(f"stored {record_type.MODEL} record {uuid!r} is not valid: {exc}", uuid=uuid) from exc
    return record


def steps_by_pipeline(rows: Sequence[Any], pipeline_uuids: Sequence[str]) -> dict[str, list[StepRecord]]:
    """The steps of ``rows`` by pipeline; a pipeline with an invalid step is left out (its
    steps are read again on their own, which reports the error)."""
    found: dict[str, list[StepRecord]] = {uuid: [] for uuid in pipeline_uuids}
    unreadable: set[str] = set()
    for row in rows:
        try:
            step = load(StepRecord, row)
        except CorruptRecordError:
            unreadable.add(str(row.get("pipeline_uuid")))
            continue
        if step.pipeline_uuid in found:
            found[step.pipeline_uuid].append(step)
    return {uuid: steps for uuid, steps in found.items() if uuid not in unreadable}
