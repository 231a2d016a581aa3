"""The Store over a repository with the seed's four methods only: every optional capability
falls back (due query, claim, transaction, batch insert, compare-and-set), so the engine still
works in one process; and over one with all of them, each is used through its Protocol."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from prorch import IRepository, Metadata
from prorch.model.limit_rules import ClaimLimit
from prorch.model.records import JSONDict
from prorch.model.registry import Registry
from prorch.storage.creation import build_records, store_new
from prorch.storage.seed_adapter import SeedAdapter
from prorch.storage.store import Store
from repositories.memory import MemoryBackend, MemoryRepository
from tests.support.builders import pipeline_of, quick

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


def seed_style() -> type[IRepository]:
    """A repository class with get/save/update/search over dicts, nothing more."""
    tables: dict[str, dict[str, JSONDict]] = {name: {} for name in Metadata.TABLE_NAMES}

    class Plain(IRepository):
        def __init__(self, model: str) -> None:
            super().__init__(model)
            self.rows = tables[model]

        def get(self, uuid: str) -> JSONDict | None:
            return self.rows.get(uuid)

        def save(self, data: JSONDict) -> str:
            self.rows[data["uuid"]] = dict(data)
            return str(data["uuid"])

        def update(self, uuid: str, data: JSONDict) -> None:
            self.rows[uuid] = {**self.rows[uuid], **data}

        def search(self, filter: list[Any]) -> list[JSONDict]:  # noqa: A002
            field, value = filter
            return [dict(row) for row in self.rows.values() if row.get(field) == value]

    return Plain


def test_a_seed_style_repository_offers_no_capability() -> None:
    store = Store(seed_style())
    adapter = store.engine
    assert isinstance(adapter, SeedAdapter)  # wrapped once, with the fallbacks
    assert (adapter.claims, adapter.due_query, adapter.transactions, adapter.compare_and_set) == (None,) * 4
    assert adapter.batches == {} and not store.guards_concurrency and not store.thread_safe


def test_the_fallbacks_find_claim_and_write_without_capabilities(registry: Registry) -> None:
    store = Store(seed_style())
    low = pipeline_of(quick("A"), name="Low")
    high = pipeline_of(quick("B"), name="High", priority=5)
    later = build_records(low, {}, now=NOW)
    for group in (later, build_records(high, {}, now=NOW), build_records(low, {}, now=NOW + timedelta(hours=1))):
        store_new(store, [group], NOW, registry)
    due = store.due(NOW, 10)
    assert [p.name for p in due] == ["High", "Low"]  # priority first; the later one is not due
    claimed = store.claim_due(NOW, "me", NOW + timedelta(seconds=30), 10)
    assert [p.uuid for p in claimed] == [p.uuid for p in due]  # no claim: the due list, unleased
    assert store.renew_lease(due[0].uuid, "me", NOW) is False
    with store.transaction():  # no transaction: each write stands alone
        record = due[0]
        record.priority = 9
        store.commit([record])
    stored = store.get_pipeline(record.uuid)
    assert stored is not None and stored.priority == 9 and stored.revision == 1


def test_a_full_backend_is_used_through_each_capability(registry: Registry) -> None:
    memory = MemoryBackend()
    store = Store(memory)
    assert store.engine is memory  # a shipped backend implements the contract itself: no adapter
    assert store.guards_concurrency and store.has_transaction and store.partial_update
    pipeline = pipeline_of(quick("A"))
    (record,) = store_new(store, [build_records(pipeline, {}, now=NOW)], NOW, registry)
    (claimed,) = store.claim_due(NOW, "me", NOW + timedelta(seconds=30), 10)
    assert claimed.uuid == record.uuid and claimed.lease_owner == "me"
    assert store.claim_due(NOW, "other", NOW + timedelta(seconds=30), 10) == []


@pytest.mark.parametrize("bad", ["not a url", 42])
def test_a_store_of_something_that_is_no_repository_is_one_clear_error(bad: Any) -> None:
    from prorch import ConfigurationError

    with pytest.raises(ConfigurationError):
        Store(bad)


def test_the_fallback_claims_only_the_classes_the_worker_has(registry: Registry) -> None:
    """Issue #25 on a prorch 1.0.1-style repository (no claim): the due list is filtered by the
    (name, version) pairs given, with and without limits, and those behind are not starved."""
    store = Store(seed_style())
    old = pipeline_of(quick("A"), name="Job")
    new = pipeline_of(quick("B"), name="Job", version=2, priority=5)
    for cls in (new, new, old):
        store_new(store, [build_records(cls, {}, now=NOW)], NOW, registry)
    until = NOW + timedelta(seconds=30)
    assert [p.version for p in store.claim_due(NOW, "me", until, 1, runnable=frozenset({("Job", 1)}))] == [1]
    limits = {"Job": ClaimLimit(max_running=5)}
    claimed = store.claim_due(NOW, "me", until, 5, limits, runnable=frozenset({("Job", 1)}))
    assert [p.version for p in claimed] == [1]
    assert store.claim_due(NOW, "me", until, 5, runnable=frozenset()) == []


def test_a_claim_written_before_runnable_still_claims_and_says_so(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's ``SupportsClaim`` without the ``runnable`` argument keeps working (claiming
    every class, as before), with one warning naming the fix."""
    memory = MemoryBackend()

    class OldClaim(MemoryRepository):
        def claim_due(self, now: datetime, owner: str, lease_expires_at: datetime, limit: int) -> list[JSONDict]:
            return super().claim_due(now, owner, lease_expires_at, limit)

    store = Store(lambda model: OldClaim(model, memory) if model == "PIPELINE" else memory(model))
    pipeline = pipeline_of(quick("A"), name="Fresh")
    store_new(store, [build_records(pipeline, {}, now=NOW)], NOW, registry)
    claimed = store.claim_due(NOW, "me", NOW + timedelta(seconds=30), 10, runnable=frozenset({("Job", 1)}))
    assert [p.name for p in claimed] == ["Fresh"]
    assert "takes no `runnable`" in caplog.text and "add runnable=None" in caplog.text


def test_a_repository_with_the_old_protocols_works_and_is_told_what_to_implement_once(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's repository with some ``Supports*`` protocols (prorch 2) keeps working through
    the seed adapter for one deprecation cycle, with one warning per class saying what to do."""
    memory = MemoryBackend()

    class Mine(MemoryRepository):  # every Supports* of the memory repository, not the contract
        pass

    def factory(model: str) -> Mine:
        return Mine(model, memory)

    store = Store(factory)
    Store(factory)
    assert isinstance(store.engine, SeedAdapter) and store.guards_concurrency
    warnings = [r.message for r in caplog.records if "deprecated" in r.message]
    assert len(warnings) == 1 and "SupportsClaim" in warnings[0] and "RepositoryBackend" in warnings[0]
    (record,) = store_new(store, [build_records(pipeline_of(quick("A")), {}, now=NOW)], NOW, registry)
    (claimed,) = store.claim_due(NOW, "me", NOW + timedelta(seconds=30), 10)
    assert claimed.uuid == record.uuid and claimed.lease_owner == "me"
