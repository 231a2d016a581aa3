"""Driving the runner's writes in rounds, with hand-made writings on the in-memory store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import pytest

from prorch.engine.rounds import write_in_rounds
from prorch.engine.state import Writing
from prorch.model.records import PipelineRecord
from prorch.model.registry import Registry
from prorch.storage.store import Store, Write
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


class CountingStore(Store):
    """The in-memory store, noting how many writes each group commit held."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend())
        self.rounds: list[int] = []

    def commit_many(self, writes: Sequence[Write]) -> list[Exception | None]:
        self.rounds.append(len(writes))
        return super().commit_many(writes)


def _pipelines(store: CountingStore, registry: Registry, count: int) -> list[PipelineRecord]:
    cls = pipeline_of(step_of("A", lambda self: None))
    records = []
    for _ in range(count):
        record = store.get_pipeline(cls.create(store.backend, registry=registry).uuid)
        assert record is not None
        records.append(record)
    return records


def _one_write(record: PipelineRecord, before: Callable[[], None] = lambda: None) -> Writing[str]:
    before()
    error = yield Write([record], [], [])
    return "stored" if error is None else f"refused: {error}"


@pytest.mark.parametrize(("group", "rounds"), [(1, [1] * 7), (3, [3, 3, 1]), (7, [7]), (100, [7])])
def test_a_round_stores_at_most_group_writes(registry: Registry, group: int, rounds: list[int]) -> None:
    store = CountingStore()
    records = _pipelines(store, registry, 7)
    assert write_in_rounds(store, [_one_write(r) for r in records], group=group) == ["stored"] * 7
    assert store.rounds == rounds
    assert all(store.get_pipeline(r.uuid).revision == r.revision for r in records)  # type: ignore[union-attr]


def test_hooks_run_at_most_concurrency_at_once_and_that_many_do(registry: Registry) -> None:
    store = CountingStore()
    records = _pipelines(store, registry, 6)
    lock, active, most = threading.Lock(), [0], [0]
    pairs = threading.Barrier(2, timeout=10)  # two hooks must be running together to go on

    def hook() -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        pairs.wait()
        time.sleep(0.01)
        with lock:
            active[0] -= 1

    results = write_in_rounds(store, [_one_write(r, hook) for r in records], group=100, concurrency=2)
    assert results == ["stored"] * 6 and most[0] == 2
    assert sum(store.rounds) == 6  # a round is stored when none is left ready: how many it holds is timing


def test_alone_pipelines_run_one_after_another_before_the_rounds(registry: Registry) -> None:
    store = CountingStore()
    records = _pipelines(store, registry, 4)
    for record in records[:2]:
        record.hook_started_at = NOW  # their first writes mark a hook: each held to its turn
    results = write_in_rounds(store, [_one_write(r) for r in records], group=100, alone=[0, 1])
    assert results == ["stored"] * 4
    assert store.rounds == [0, 1, 1, 2]  # the unmarked first writes of the alone ones (none), each alone, the rest
    marked = store.get_pipeline(records[0].uuid)
    assert marked is not None and not marked.hook_shared  # stored alone: a crash is its own
