"""Streams: what a hook appends with ``self.emit(value)`` to its pipeline's durable stream, read
in order by ``Orchestrator.stream`` (``prorch stream``, the dashboard's SSE endpoint).

An entry is stored with the transition that records the hook's outcome, all or nothing with it,
as its step logs and search attributes are: a hook that raises, or whose worker dies before its
transition is stored, leaves no entry, and its rerun emits them again. Each entry of a pipeline
has a sequence number (its cursor), 1, 2, 3... without gaps: the worker that holds the pipeline's
lease numbers them after the last stored one, and the transition's compare-and-set on the
pipeline's revision (with the table's primary key) refuses any other writer's.

``emit(value, now=True)`` stores an entry at once instead (live progress), in a transaction that
checks the lease; it is numbered ahead of the hook's entries still waiting for the transition,
and kept whatever the hook does next (at least once)."""

from __future__ import annotations

from typing import Any

import orjson

from prorch.model.exceptions import StepUsageError, UnstorableValueError
from prorch.model.jsonvalue import check_json, copy_json

MAX_ENTRY_BYTES = 64 * 1024
"""Bytes of one entry's JSON at most: a stream carries progress and tokens, not documents (store
those elsewhere and emit their reference)."""
MAX_HOOK_ENTRIES = 10_000
"""Entries one hook call may emit at most: a hook emitting in a runaway loop fails at once
instead of growing its transition without bound."""


def checked_entry(value: Any) -> Any:
    """A copy of ``value`` if it can be a stream entry; else ``StepUsageError`` saying what is wrong."""
    try:
        check_json(value, "value")
    except UnstorableValueError as exc:
        raise StepUsageError(f"emit(): {exc}; emit a JSON value (dict, list, str, number, bool or None)") from None
    size = len(orjson.dumps(value))
    if size > MAX_ENTRY_BYTES:
        raise StepUsageError(
            f"emit(): the value is {size} bytes of JSON, more than the {MAX_ENTRY_BYTES} an entry may hold; "
            "store large data elsewhere and emit a reference to it"
        )
    return copy_json(value)  # what the hook changes afterwards changes nothing emitted
