"""The journal: loading a run and committing transitions, and the merge of an outside write
(an explicit result, not an exception from deep inside)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from prorch import ConcurrentUpdateError, FakeClock, OnStartMixin, Status, Step
from prorch.engine.journal import Journal, Merge
from prorch.engine.policy import Policies
from prorch.engine.rounds import write_each
from prorch.model.registry import Registry
from prorch.storage.creation import build_records, store_new
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
