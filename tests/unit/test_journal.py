"""The journal: loading a run and committing transitions, and the merge of an outside write
(an explicit result, not an exception from deep inside)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import msgspec
import pytest
from pydantic import BaseModel

from prorch import ConcurrentUpdateError, FakeClock, OnStartMixin, Status, Step
from prorch.engine import journal as journal_module
from prorch.engine import transitions
from prorch.engine.extension import Extension, Extensions
from prorch.engine.journal import Journal, Merge
from prorch.engine.policy import Policies
from prorch.engine.rounds import write_each
from prorch.engine.state import Run
from prorch.model.exceptions import RepositoryError, UnconfirmedWriteError
from prorch.model.records import EventRecord, Record
from prorch.model.registry import Registry
from prorch.model.status import EventType
from prorch.storage.creation import build_records, store_new
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Store
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of, step_of

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def journal(registry: Registry) -> Journal:
    return Journal(Store(MemoryBackend()), registry, FakeClock(NOW), Policies(), lease_seconds=30)


def claimed(journal: Journal, token: str = "me") -> str:
    """A stored pipeline of two steps, claimed by ``token``; returns its uuid."""
    pipeline = pipeline_of(step_of("A", on_start=lambda self: None), step_of("B", on_start=lambda self: None))
    (record,) = store_new(journal.store, [build_records(pipeline, {}, now=NOW)], NOW, journal.registry)
    assert journal.store.claim_one(record.uuid, NOW, token, NOW + timedelta(seconds=30)) is not None
    return record.uuid


def test_load_orders_the_steps_and_finds_their_classes(journal: Journal) -> None:
    uuid = claimed(journal)
    pipeline = journal.store.get_pipeline(uuid)
    assert pipeline is not None
    run = journal.load(pipeline)
    assert [s.name for s in run.steps] == ["A", "B"]
    assert all(issubclass(run.classes[s.uuid], OnStartMixin) for s in run.steps)


def test_an_outside_write_under_our_lease_is_merged_and_the_commit_goes_through(journal: Journal) -> None:
    uuid = claimed(journal)
    run = journal.load(journal.store.get_pipeline(uuid))  # type: ignore[arg-type]
    run.token = "me"
    outside = journal.store.get_pipeline(uuid)
    assert outside is not None
    outside.cancel_requested = True
    outside.priority = 7
    journal.store.commit([outside])  # e.g. Orchestrator.cancel from another process

    assert journal.merge(run) is Merge.MERGED
    assert (run.pipeline.cancel_requested, run.pipeline.priority, run.woken) == (True, 7, True)
    assert write_each(journal.store, journal.commit(run, [], stop=True)) is False
    stored = journal.store.get_pipeline(uuid)
    assert stored is not None and stored.cancel_requested and stored.lease_owner is None


def test_a_lost_lease_is_reported_as_such_and_the_commit_refused(journal: Journal) -> None:
    uuid = claimed(journal)
    run = journal.load(journal.store.get_pipeline(uuid))  # type: ignore[arg-type]
    run.token = "me"
    later = NOW + timedelta(minutes=5)  # our lease expired; another worker claims the pipeline
    assert journal.store.claim_one(uuid, later, "other", later + timedelta(seconds=30)) is not None
    assert journal.merge(run) is Merge.LEASE_LOST
    with pytest.raises(ConcurrentUpdateError):
        write_each(journal.store, journal.commit(run, [], stop=True))


def test_without_a_lease_token_nothing_is_merged(journal: Journal) -> None:
    uuid = claimed(journal)
    run = journal.load(journal.store.get_pipeline(uuid))  # type: ignore[arg-type]
    assert run.token is None
    assert journal.merge(run) is Merge.LEASE_LOST


def test_a_parked_run_is_due_again_at_its_wake_time_and_unleased(journal: Journal) -> None:
    uuid = claimed(journal)
    run = journal.load(journal.store.get_pipeline(uuid))  # type: ignore[arg-type]
    run.token = "me"
    run.steps[0].next_run_at = NOW + timedelta(seconds=9)  # e.g. its wait
    write_each(journal.store, journal.park(run))
    stored = journal.store.get_pipeline(uuid)
    assert stored is not None
    assert (stored.next_run_at, stored.lease_owner, stored.status) == (
        NOW + timedelta(seconds=9), None, Status.PENDING,
    )  # fmt: skip


def test_a_pipeline_whose_code_is_missing_keeps_everything_but_our_lease(journal: Journal) -> None:
    uuid = claimed(journal)
    pipeline = journal.store.get_pipeline(uuid)
    assert pipeline is not None
    outcome = write_each(journal.store, journal.leave_blocked(pipeline, "not deployed"))
    stored = journal.store.get_pipeline(uuid)
    assert stored is not None and stored.lease_owner is None and stored.status == Status.PENDING
    assert outcome.blocked == "not deployed"
    assert stored.next_run_at == NOW + timedelta(seconds=30)


def test_instance_gets_copies_a_hook_cannot_change_stored_values(journal: Journal) -> None:
    uuid = claimed(journal)
    run = journal.load(journal.store.get_pipeline(uuid))  # type: ignore[arg-type]
    run.params = {"nested": {"n": 1}}
    step = journal.instance(run, run.steps[0], NOW)
    assert isinstance(step, Step)
    step.params["nested"]["n"] = 2
    assert run.params == {"nested": {"n": 1}}


# --- #25 item 20: what mutation testing found untested -----------------------------------------


def loaded(journal: Journal, token: str | None = "me") -> Run:
    uuid = claimed(journal)
    run = journal.load(journal.store.get_pipeline(uuid))  # type: ignore[arg-type]
    run.token = token
    return run


def held_keeper(journal: Journal, run: Run) -> LeaseKeeper:
    """A keeper (thread not started) holding the run's lease as written long ago."""
    keeper = LeaseKeeper(journal.store, journal.lease_seconds, journal.clock)
    keeper.hold([run.pipeline], time.monotonic() - 1000)
    run.keeper = keeper
    return keeper


def test_a_commit_going_on_tells_the_keeper_its_lease_was_renewed(journal: Journal) -> None:
    run = loaded(journal)
    keeper = held_keeper(journal, run)
    before = time.monotonic()
    assert write_each(journal.store, journal.commit(run, [], stop=False)) is True
    lease = keeper._held[run.pipeline.uuid]
    assert lease.live_until >= before + journal.lease_seconds and not lease.releasing
    keeper.confirm(run.pipeline.uuid)  # live: no renewal needed, none refused


def test_a_commit_that_stops_tells_the_keeper_it_gives_the_lease_up(journal: Journal) -> None:
    run = loaded(journal)
    keeper = held_keeper(journal, run)
    assert write_each(journal.store, journal.commit(run, [], stop=True)) is False
    lease = keeper._held[run.pipeline.uuid]
    assert lease.releasing and lease.live_until < time.monotonic()  # released: not renewed


def test_a_commit_clears_dirty_and_marks_the_next_hook_only_when_asked(journal: Journal) -> None:
    run = loaded(journal)
    run.dirty = True
    write_each(journal.store, journal.commit(run, [], stop=False, mark=False))
    stored = journal.store.get_pipeline(run.pipeline.uuid)
    assert stored is not None and stored.hook_started_at is None and run.dirty is False
    write_each(journal.store, journal.commit(run, [], stop=False))
    stored = journal.store.get_pipeline(run.pipeline.uuid)
    assert stored is not None and stored.hook_started_at == NOW


def test_an_extension_sees_a_commit_that_keeps_its_own_events(journal: Journal) -> None:
    seen: list[tuple[str, list[EventType], datetime]] = []

    class Watcher(Extension):
        def on_transition(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> list[Record]:
            seen.append((pipeline_name, [e.type for e in events], now))
            return []

    journal.extensions = Extensions([Watcher()])
    run = loaded(journal)
    run.events.append(transitions.new_event(run, EventType.PIPELINE_STARTED, None, NOW))
    write_each(journal.store, journal.commit(run, [], stop=False))
    assert seen == [("P", [EventType.PIPELINE_STARTED], NOW)]
    assert [e.type for e in journal.store.events_of(run.pipeline.uuid)][-1] == EventType.PIPELINE_STARTED


def test_a_transition_refused_time_after_time_gives_up_with_a_clear_error(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "MAX_MERGES", 3)
    run = loaded(journal)
    writing = journal.commit(run, [], stop=False)
    next(writing)
    store = journal.store
    with pytest.raises(ConcurrentUpdateError, match=f"pipeline {run.pipeline.uuid} kept changing; giving up"):
        while True:  # every write refused by an outside write under our lease: merged, written again
            outside = store.get_pipeline(run.pipeline.uuid)
            assert outside is not None
            stored = store.tracking([outside])
            outside.priority += 1
            store.commit([outside], snapshots=stored)
            writing.throw(ConcurrentUpdateError("refused"))


def test_a_write_refused_while_the_pipeline_has_not_moved_is_not_written_again(journal: Journal) -> None:
    """Refused, and the pipeline read again is still ours at the revision we wrote against:
    another record of the write (a step) refused it, which no merge changes."""
    run = loaded(journal)
    writing = journal.commit(run, [], stop=False)
    next(writing)
    with pytest.raises(UnconfirmedWriteError, match="still ours and unchanged") as raised:
        writing.throw(ConcurrentUpdateError("a step refused"))
    assert str(raised.value.__cause__) == "a step refused"


class Order(BaseModel):
    items: list[int]


def test_a_hook_gets_its_own_copy_of_typed_params(journal: Journal) -> None:
    run = loaded(journal)
    run.params = Order(items=[1])
    step = journal.instance(run, run.steps[0], NOW)
    step.params.items.append(2)
    assert run.params == Order(items=[1])


def test_a_blocked_pipeline_is_reported_with_its_status(journal: Journal) -> None:
    uuid = claimed(journal)
    pipeline = journal.store.get_pipeline(uuid)
    assert pipeline is not None
    outcome = write_each(journal.store, journal.leave_blocked(pipeline, "not deployed"))
    assert (outcome.uuid, outcome.status) == (uuid, Status.PENDING)


def test_load_uses_the_steps_read_with_the_claim(journal: Journal) -> None:
    run = loaded(journal)
    given = [msgspec.structs.replace(s) for s in run.steps]
    again = journal.load(run.pipeline, given)
    assert all(a is b for a, b in zip(again.steps, given, strict=True))


def test_load_orders_steps_by_position_else_by_the_pipelines_order_unknown_ones_last(journal: Journal) -> None:
    registered = step_of("Retired", on_start=lambda self: None)  # a step the pipeline no longer has
    run = loaded(journal)
    a, b = run.steps
    retired = msgspec.structs.replace(b, uuid="retired", name=registered.name or "")
    a.position, b.position = 1, 0
    assert [s.name for s in journal.load(run.pipeline, [a, b]).steps] == ["B", "A"]
    a.position = b.position = retired.position = None
    assert [s.name for s in journal.load(run.pipeline, [retired, b, a]).steps] == ["A", "B", "Retired"]


def test_load_reads_the_records_own_version_and_its_rate_limit(journal: Journal) -> None:
    old = pipeline_of(step_of("A", on_start=lambda self: None), name="R", version=1, rate_limit="5/s")
    pipeline_of(step_of("A", on_start=lambda self: None), name="R", version=2)
    (record,) = store_new(journal.store, [build_records(old, {}, now=NOW)], NOW, journal.registry)
    assert journal.load(record).hooks_left == 1  # one claim, one hook
    assert loaded(journal).hooks_left is None


def test_merge_refuses_without_a_lease_an_ended_pipeline_or_one_taken(journal: Journal) -> None:
    unleased = journal.load(journal.store.get_pipeline(claimed(journal)))  # type: ignore[arg-type]
    unleased.pipeline.lease_owner = None
    journal.store.commit([unleased.pipeline])
    assert unleased.token is None and journal.merge(unleased) is Merge.LEASE_LOST
    ended = loaded(journal)
    outside = journal.store.get_pipeline(ended.pipeline.uuid)
    assert outside is not None
    outside.status = Status.CANCELLED  # ended from outside, our lease still on it
    journal.store.commit([outside])
    assert journal.merge(ended) is Merge.LEASE_LOST


def test_park_writes_nothing_when_the_stored_record_says_so_already(journal: Journal) -> None:
    run = loaded(journal)
    write_each(journal.store, journal.park(run))  # released, due now (nothing to wait for)
    parked = journal.store.get_pipeline(run.pipeline.uuid)
    assert parked is not None and parked.next_run_at == NOW and parked.lease_owner is None
    run = journal.load(parked)
    assert list(journal.park(run)) == []
    run.dirty = True  # a crash charged: must be written
    assert len(list(journal.park(journal.load(parked)))) == 0 and len(list(journal.park(run))) == 1
    marked = journal.load(parked)
    marked.pipeline.hook_started_at = NOW  # unleased, but a hook mark to take off
    assert len(list(journal.park(marked))) == 1
    leased = journal.load(parked)
    leased.pipeline.lease_owner = "me"
    assert len(list(journal.park(leased))) == 1


def test_an_engine_error_is_recorded_but_another_workers_lease_is_left(journal: Journal) -> None:
    run = loaded(journal)
    claimed_record = msgspec.structs.replace(run.pipeline)
    later = NOW + timedelta(minutes=5)  # our lease ran out; another worker claimed it
    assert journal.store.claim_one(run.pipeline.uuid, later, "other", later + timedelta(seconds=30)) is not None
    journal.record_error(claimed_record, RuntimeError("engine broke"))
    stored = journal.store.get_pipeline(run.pipeline.uuid)
    assert stored is not None and stored.last_error is not None and "engine broke" in stored.last_error.message
    assert stored.lease_owner == "other"


def test_an_engine_error_on_an_ended_pipeline_changes_nothing(journal: Journal) -> None:
    run = loaded(journal)
    run.pipeline.status = Status.FINISHED
    journal.store.commit([run.pipeline])
    journal.record_error(run.pipeline, RuntimeError("late"))
    stored = journal.store.get_pipeline(run.pipeline.uuid)
    assert stored is not None and stored.last_error is None


def test_an_error_that_cannot_be_recorded_is_logged(
    journal: Journal, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = loaded(journal)

    def down(uuid: str) -> None:
        raise RepositoryError("connection refused")

    monkeypatch.setattr(journal.store, "get_pipeline", down)
    with caplog.at_level(logging.WARNING, logger="prorch.orchestrator"):
        journal.record_error(run.pipeline, RuntimeError("engine broke"))
    assert [r.getMessage() for r in caplog.records] == [
        f"pipeline {run.pipeline.uuid}: could not record the error: connection refused"
    ]


def test_reload_reads_again_unless_the_lease_was_lost(journal: Journal) -> None:
    run = loaded(journal)
    run.events.append(transitions.new_event(run, EventType.PIPELINE_STARTED, None, NOW))
    run.steps[0].status = Status.FINISHED  # not written: dropped
    assert journal.reload(run) is True
    assert run.events == [] and run.steps[0].status == Status.CREATED
    later = NOW + timedelta(minutes=5)
    assert journal.store.claim_one(run.pipeline.uuid, later, "other", later + timedelta(seconds=30)) is not None
    assert journal.reload(run) is False
