"""LeaseKeeper (prorch/leases.py): held leases are renewed by their token, a lost one is
dropped, and a hook past its time limit is renewed no more."""

from __future__ import annotations

from datetime import timedelta

from prorch.leases import LeaseKeeper
from prorch.registry import Registry
from prorch.store import Store
from prorch.testing import Harness
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of, quick


def test_lease_keeper_renews_held_leases_and_notices_lost_ones(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry)
    mine = harness.create(pipeline_of(quick("A")))
    theirs = harness.create(pipeline_of(quick("B"), name="Q"))
    store = Store(backend)
    now = harness.clock.now()
    claimed = store.claim_due(now, "me", now + timedelta(seconds=30), 10)
    keeper = LeaseKeeper(store, 30, harness.clock)
    keeper.hold(claimed)
    store.claim_one(theirs.uuid, now + timedelta(seconds=31), "other", now + timedelta(seconds=90))
    harness.clock.advance(20)
    keeper.renew_all()
    record = store.get_pipeline(mine.uuid)
    assert record is not None and record.lease_expires_at == harness.clock.now() + timedelta(seconds=30)
    other = store.get_pipeline(theirs.uuid)
    assert other is not None and other.lease_owner == "other"
    assert keeper._held == {mine.uuid: "me"}


def test_lease_keeper_stops_renewing_past_a_hook_limit(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry)
    mine = harness.create(pipeline_of(quick("A")))
    store = Store(backend)
    now = harness.clock.now()
    keeper = LeaseKeeper(store, 30, harness.clock)
    keeper.hold(store.claim_due(now, "me", now + timedelta(seconds=30), 10))
    keeper.limit(mine.uuid, now + timedelta(seconds=10))  # a hook that must be done in 10 s
    harness.clock.advance(5)
    keeper.renew_all()
    renewed = store.get_pipeline(mine.uuid)
    assert renewed is not None and renewed.lease_expires_at == now + timedelta(seconds=35)
    harness.clock.advance(10)  # the hook is past its limit: its lease is left to run out
    keeper.renew_all()
    left = store.get_pipeline(mine.uuid)
    assert left is not None and left.lease_expires_at == now + timedelta(seconds=35)
