"""Driving the runner's writes in rounds, with hand-made writings on the in-memory store."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from prorch.registry import Registry
from prorch.runner.rounds import write_in_rounds
from prorch.runner.state import Writing
from prorch.store import Store, Write
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of, step_of

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_writes_left_when_a_round_breaks_off_are_stored_with_shared_marks(registry: Registry) -> None:
    """Regression: the writes waiting in the queue when an engine error ended the rounds were
    stored with exact marks, so each of those pipelines was later charged a crash that never
    happened (their hooks had not run)."""
    backend = MemoryBackend()
    uuid = pipeline_of(step_of("A", lambda self: None)).create(backend, registry=registry).uuid
    store = Store(backend)
    record = store.get_pipeline(uuid)
    assert record is not None
    record.hook_started_at = NOW  # the write marks its next hook running

    def marks() -> Writing[None]:
        yield Write([record], [], [])

    def breaks() -> Writing[None]:
        raise KeyboardInterrupt
        yield  # pragma: no cover - a generator

    with pytest.raises(KeyboardInterrupt):
        write_in_rounds(store, [marks(), breaks()], group=100)
    stored = store.get_pipeline(uuid)
    assert stored is not None and stored.hook_started_at == NOW and stored.hook_shared
