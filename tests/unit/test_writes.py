"""A write is a value (issue #26): building and committing it leaves the records as they are;
only a stored write is applied to them, afterwards."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from prorch.model.exceptions import ConcurrentUpdateError
from prorch.model.records import JSONDict, PipelineRecord, StepRecord
from prorch.model.registry import Registry
from prorch.storage.store import Store
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of, step_of


class WatchedBackend(MemoryBackend):
    """The in-memory backend, noting each record as it is when the backend writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, JSONDict]] = []  # (record's revision, expected, data)

    def write_record(self, record: PipelineRecord | StepRecord, expected: int, data: JSONDict) -> None:
        self.seen.append((record.revision, expected, dict(data)))
        super().write_record(record, expected, data)


def _stored(registry: Registry) -> tuple[WatchedBackend, Store, str]:
    backend = WatchedBackend()
    uuid = pipeline_of(step_of("A", lambda self: None)).create(backend, registry=registry).uuid
    return backend, Store(backend), uuid


def test_a_backend_writes_records_as_they_were_read(registry: Registry) -> None:
    """The revision to write travels in the write; the record keeps the one it was read with
    until the write is stored (it was bumped before the write and put back after a failure)."""
    backend, store, uuid = _stored(registry)
    record = store.get_pipeline(uuid)
    assert record is not None
    read = record.revision
    record.priority = 5
    store.commit([record])
    assert backend.seen[-1][:2] == (read, read)
    assert backend.seen[-1][2]["revision"] == read + 1 and backend.seen[-1][2]["priority"] == 5
    assert record.revision == read + 1  # applied once stored


def test_a_refused_write_leaves_its_records_untouched(registry: Registry) -> None:
    backend, store, uuid = _stored(registry)
    record = store.get_pipeline(uuid)
    assert record is not None
    record.revision += 3  # read before writes that never happened: refused
    record.priority = 5
    before = msgspec.structs.asdict(record)
    with pytest.raises(ConcurrentUpdateError):
        store.commit([record])
    assert msgspec.structs.asdict(record) == before
    assert backend.seen[-1][0] == before["revision"]


def test_records_carry_no_change_tracking(registry: Registry) -> None:
    """What the store holds is the writer's explicit snapshots, never an attribute stashed on
    a record (a record copied, compared or handed to a user's code carries nothing hidden)."""
    _, store, uuid = _stored(registry)
    record = store.get_pipeline(uuid)
    assert record is not None
    snapshots = store.tracking([record])
    record.priority = 5
    store.commit([record], snapshots=snapshots)
    state: Any = getattr(record, "__dict__", {})
    assert not state
    assert snapshots is not None and record.uuid in snapshots


def test_a_write_sends_only_what_changed_since_its_snapshot(registry: Registry) -> None:
    backend, store, uuid = _stored(registry)
    record = store.get_pipeline(uuid)
    assert record is not None
    snapshots = store.tracking([record])
    record.priority = 5
    store.commit([record], snapshots=snapshots)
    assert backend.seen[-1][2] == {"priority": 5, "revision": record.revision}
    record.context["seen"] = 1  # in place
    store.commit([record], snapshots=snapshots)
    assert backend.seen[-1][2] == {"context": {"seen": 1}, "revision": record.revision}
