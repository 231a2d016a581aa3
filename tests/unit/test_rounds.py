"""Driving the runner's writes in rounds, with hand-made writings on the in-memory store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import pytest

from prorch.engine.rounds import _shared, write_each, write_in_rounds
from prorch.engine.state import Writing
from prorch.model.exceptions import ConcurrentUpdateError, StoreUnreachableError
from prorch.model.records import PipelineRecord, StepRecord
from prorch.model.registry import Registry
from prorch.model.status import Status
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
        yield Write.of([record])

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
    error = yield Write.of([record])
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


def _writes(*records: PipelineRecord, ends: str = "") -> Writing[list[str]]:
    """One write per record, noting what became of each; ``ends`` returns it before any write."""
    if ends:
        return [ends]
    seen = []
    for record in records:
        try:
            yield Write.of([record])
        except ConcurrentUpdateError:
            seen.append("refused")
        else:
            seen.append("stored")
    return seen


def _stale(store: Store, record: PipelineRecord) -> PipelineRecord:
    """A copy of ``record`` that another write makes stale: writing it is refused."""
    copy = store.get_pipeline(record.uuid)
    assert copy is not None
    store.commit_write(Write.of([record]))
    return copy


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_write_refused_in_a_round_is_thrown_into_its_pipeline_which_goes_on(
    registry: Registry, concurrency: int
) -> None:
    store = CountingStore()
    records = _pipelines(store, registry, 3)
    stale = _stale(store, records[1])
    writings = [_writes(records[0]), _writes(stale, records[1]), _writes(records[2])]
    results = write_in_rounds(store, writings, group=100, concurrency=concurrency)
    assert results == [["stored"], ["refused", "stored"], ["stored"]]


def test_alone_pipelines_get_their_first_writes_refusal_held_or_stored_together(registry: Registry) -> None:
    store = CountingStore()
    records = _pipelines(store, registry, 4)
    held, together = _stale(store, records[0]), _stale(store, records[1])
    held.hook_started_at = NOW  # marks a hook: stored at its turn, alone
    store.rounds.clear()
    writings = [_writes(held, records[0]), _writes(together, records[1]), _writes(records[2]), _writes(records[3])]
    results = write_in_rounds(store, writings, group=100, alone=[0, 1, 2])
    assert results == [["refused", "stored"], ["refused", "stored"], ["stored"], ["stored"]]
    # the unmarked first writes of 1 and 2 together; 0's first, 0's second, 1's second; 3 in the rounds
    assert store.rounds == [2, 1, 1, 1, 1]


def test_a_pipeline_ending_before_its_first_write_returns_its_result(registry: Registry) -> None:
    store = CountingStore()
    records = _pipelines(store, registry, 1)
    writings = [_writes(ends="alone"), _writes(records[0]), _writes(ends="in a round")]
    results = write_in_rounds(store, writings, group=100, alone=[0])
    assert results == [["alone"], ["stored"], ["in a round"]]


def test_write_each_throws_a_refused_write_into_the_pipeline(registry: Registry) -> None:
    store = CountingStore()
    records = _pipelines(store, registry, 1)
    stale = _stale(store, records[0])
    assert write_each(store, _writes(stale, stale, records[0])) == ["refused", "refused", "stored"]


def _running_hooks(count: int) -> tuple[Callable[[], None], list[int], list[str]]:
    """A hook noting the most hooks running at once and the threads they ran in."""
    lock, active, most, threads = threading.Lock(), [0], [0], []

    def hook() -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            threads.append(threading.current_thread().name)
        time.sleep(0.05)
        with lock:
            active[0] -= 1

    return hook, most, threads


def test_hooks_in_flight_count_toward_the_group(registry: Registry) -> None:
    """A round never holds more than ``group`` writes: no more hooks run than their writes fit."""
    store = CountingStore()
    records = _pipelines(store, registry, 6)
    hook, most, threads = _running_hooks(6)
    store.rounds.clear()
    results = write_in_rounds(store, [_one_write(r, hook) for r in records], group=2, concurrency=4)
    assert results == ["stored"] * 6 and most[0] <= 2 and max(store.rounds) <= 2
    assert all(name.startswith("prorch") for name in threads)


def test_with_concurrency_one_the_hooks_run_in_the_calling_thread(registry: Registry) -> None:
    store = CountingStore()
    records = _pipelines(store, registry, 2)
    hook, _, threads = _running_hooks(2)
    write_in_rounds(store, [_one_write(r, hook) for r in records], group=100, concurrency=1)
    assert threads == [threading.current_thread().name] * 2


def test_more_hooks_than_a_default_pool_run_at_once(registry: Registry) -> None:
    """The pool has ``concurrency`` threads (not the default, at most 32)."""
    store = CountingStore()
    records = _pipelines(store, registry, 33)
    together = threading.Barrier(33, timeout=10)
    results = write_in_rounds(store, [_one_write(r, together.wait) for r in records], group=100, concurrency=33)
    assert results == ["stored"] * 33


def test_a_slow_hook_does_not_hold_back_the_others_writes(registry: Registry) -> None:
    """The fast one's write is stored while the slow hook runs, with a third pipeline still ready
    (its write and the slow one's would fill the group of 2)."""
    store = CountingStore()
    fast, slow, third = _pipelines(store, registry, 3)
    fast_stored = threading.Event()
    original = store.commit_many

    def commit_many(writes: Sequence[Write]) -> list[Exception | None]:
        if any(fast in write.changed for write in writes):
            fast_stored.set()
        return original(writes)

    store.commit_many = commit_many  # type: ignore[method-assign]
    seen: list[bool] = []
    results = write_in_rounds(
        store,
        [_one_write(fast), _one_write(slow, lambda: seen.append(fast_stored.wait(timeout=5))), _one_write(third)],
        group=2,
        concurrency=2,
    )
    assert results == ["stored"] * 3 and seen == [True]


def test_an_engine_error_waits_for_the_hooks_running_and_starts_no_other(registry: Registry) -> None:
    """The slow hook is waited for; the third pipeline, not yet started when the first broke, never starts."""
    store = CountingStore()
    record, unstarted = _pipelines(store, registry, 2)
    finished, started = threading.Event(), threading.Event()

    def slow() -> None:
        time.sleep(0.5)
        finished.set()

    def breaks() -> Writing[str]:
        raise KeyboardInterrupt
        yield  # pragma: no cover - a generator

    with pytest.raises(KeyboardInterrupt):
        write_in_rounds(
            store, [breaks(), _one_write(record, slow), _one_write(unstarted, started.set)], group=100, concurrency=2
        )
    assert finished.is_set() and not started.is_set()


def test_the_engine_error_is_raised_when_the_waiting_writes_cannot_be_stored(registry: Registry) -> None:
    store = CountingStore()
    (record,) = _pipelines(store, registry, 1)

    def unreachable(writes: Sequence[Write]) -> list[Exception | None]:
        raise StoreUnreachableError("the store is down")

    store.commit_many = unreachable  # type: ignore[method-assign]

    def breaks() -> Writing[str]:
        raise KeyboardInterrupt
        yield  # pragma: no cover - a generator

    with pytest.raises(KeyboardInterrupt):
        write_in_rounds(store, [_one_write(record), breaks()], group=100)


@pytest.mark.parametrize("stored_shared", [False, True])
@pytest.mark.parametrize("tracked", [True, False])
def test_a_rounds_shared_mark_changes_the_write_as_rebuilding_it_would(stored_shared: bool, tracked: bool) -> None:
    """``_shared`` sets ``hook_shared`` after the write is built and makes only that field again:
    the same fields, in the same order, and the same snapshot as the whole write built anew."""
    record = PipelineRecord(uuid="p1", name="P", status=Status.PENDING, hook_shared=stored_shared)
    step = StepRecord(uuid="s1", pipeline_uuid="p1", name="S", status=Status.CREATED)
    snapshots = Store(MemoryBackend()).tracking([record, step]) if tracked else None
    # crashes: a field after hook_shared, so that the mark's field goes in the middle of the write
    record.hook_started_at, record.hook_shared, record.crashes = datetime.now(timezone.utc), False, 1
    record.metadata["current_step"] = step.uuid
    step.attempt = 1
    shared = _shared(Write.of([step, record], snapshots=snapshots))
    rebuilt = Write.of([step, record], snapshots=snapshots)
    assert record.hook_shared
    for got, want in zip(shared.changes, rebuilt.changes, strict=True):
        assert list(got.fields.items()) == list(want.fields.items())
        got_rest = (got.record, got.expected, got.partial, got.stored)
        assert got_rest == (want.record, want.expected, want.partial, want.stored)
    assert ("hook_shared" in shared.changes[1].fields) is (not tracked or not stored_shared)
