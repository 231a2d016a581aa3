"""LeaseKeeper (prorch/storage/leases.py): held leases are renewed by their token, a lost one is
dropped (logged and counted), a hook past its time limit is renewed no more, a hook starts only
on a lease known to be live, and no error stops the keeper."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator, Pipeline, Status, Step
from prorch.engine import Outcome, Runner, Writing, passes, write_in_rounds
from prorch.engine.extension import Extension
from prorch.model import clock as clock_module
from prorch.model.clock import ServerAlignedClock, SystemClock
from prorch.model.exceptions import ConcurrentUpdateError, LeaseLostError, RepositoryError
from prorch.model.records import EventRecord, PipelineRecord, Record
from prorch.model.registry import Registry
from prorch.observability.metrics import WorkerMetrics
from prorch.storage import outside
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Store
from prorch.testing import Harness
from repositories import from_url
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of, quick, step_of
from tests.support.faults import FaultyBackend


def test_lease_keeper_renews_held_leases_and_notices_lost_ones(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry)
    mine = harness.create(pipeline_of(quick("A")))
    theirs = harness.create(pipeline_of(quick("B"), name="Q"))
    store = Store(backend)
    now = harness.clock.now()
    claimed = store.claim_due(now, "me", now + timedelta(seconds=30), 10)
    keeper = LeaseKeeper(store, 30, harness.clock)
    keeper.hold(claimed, time.monotonic())
    store.claim_one(theirs.uuid, now + timedelta(seconds=31), "other", now + timedelta(seconds=90))
    harness.clock.advance(20)
    keeper.renew_all()
    record = store.get_pipeline(mine.uuid)
    assert record is not None and record.lease_expires_at == harness.clock.now() + timedelta(seconds=30)
    other = store.get_pipeline(theirs.uuid)
    assert other is not None and other.lease_owner == "other"
    assert list(keeper._held) == [mine.uuid]


def test_lease_keeper_stops_renewing_past_a_hook_limit(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry)
    mine = harness.create(pipeline_of(quick("A")))
    store = Store(backend)
    now = harness.clock.now()
    keeper = LeaseKeeper(store, 30, harness.clock)
    keeper.hold(store.claim_due(now, "me", now + timedelta(seconds=30), 10), time.monotonic())
    keeper.limit(mine.uuid, now + timedelta(seconds=10))  # a hook that must be done in 10 s
    harness.clock.advance(5)
    keeper.renew_all()
    renewed = store.get_pipeline(mine.uuid)
    assert renewed is not None and renewed.lease_expires_at == now + timedelta(seconds=35)
    harness.clock.advance(10)  # the hook is past its limit: its lease is left to run out
    keeper.renew_all()
    left = store.get_pipeline(mine.uuid)
    assert left is not None and left.lease_expires_at == now + timedelta(seconds=35)


# --- #25: a hook starts only on a lease known to be live; no error stops the keeper ------------


def sqlite_store(tmp_path: Path) -> tuple[str, Store]:
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    return url, Store(from_url(url))


def claim(store: Store, lease: float, owner: str = "me#1") -> tuple[list[PipelineRecord], float]:
    since = time.monotonic()
    now = datetime.now(timezone.utc)
    return store.claim_due(now, owner, now + timedelta(seconds=lease), 10), since


def guarded(writing: Writing[Outcome]) -> Writing[Outcome | Exception]:
    """A pipeline's advance as the orchestrator drives it: a refused lease ends it, alone."""
    try:
        return (yield from writing)
    except ConcurrentUpdateError as exc:
        return exc


def test_a_hook_waiting_its_turn_does_not_start_on_a_lease_that_ran_out(registry: Registry, tmp_path: Path) -> None:
    """Two pipelines marked in one round of group commit; the first one's hook outlasts the
    lease while the keeper could renew nothing (a starved worker), and another worker claims
    the second. Its hook must not start here (it did: the round's write was the last check)."""
    url, store = sqlite_store(tmp_path)
    ran: list[str] = []
    stolen: list[PipelineRecord | None] = []
    thief = Store(from_url(url))

    def on_start(step: Step) -> None:
        ran.append(step.pipeline_uuid)
        if len(ran) == 1:
            time.sleep(0.8)  # past the 0.6 s lease
            other = next(u for u in uuids if u != step.pipeline_uuid)
            now = datetime.now(timezone.utc)
            stolen.append(thief.claim_one(other, now, "thief#1", now + timedelta(seconds=60)))

    flow = pipeline_of(step_of("Slow", on_start=on_start))
    uuids = [flow.create(store.backend).uuid for _ in range(2)]
    claimed, since = claim(store, 0.6)
    keeper = LeaseKeeper(store, 0.6, SystemClock())  # not started: its renewals never get through
    keeper.hold(claimed, since)
    runner = Runner(store, registry, SystemClock(), lease_seconds=0.6)
    results = write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in claimed], group=100)

    assert stolen and stolen[0] is not None, "the other worker should have claimed the second pipeline"
    assert len(ran) == 1, f"a hook started on a lost lease: {ran}"
    assert any(isinstance(r, LeaseLostError) for r in results), results


def test_the_keeper_thread_renews_a_claimed_pipeline_whose_hook_has_not_started(tmp_path: Path) -> None:
    """Fails if ``renew_all`` is removed or does nothing: without it the lease runs out."""
    url, store = sqlite_store(tmp_path)
    pipeline_of(quick("A")).create(store.backend)
    claimed, since = claim(store, 0.3)
    with LeaseKeeper(store, 0.3, SystemClock()) as keeper:
        keeper.hold(claimed, since)
        time.sleep(1.0)
        now = datetime.now(timezone.utc)
        assert Store(from_url(url)).claim_one(claimed[0].uuid, now, "thief#1", now + timedelta(seconds=60)) is None
    stored = store.get_pipeline(claimed[0].uuid)
    assert stored is not None and stored.lease_owner == "me#1"
    assert stored.lease_expires_at is not None and stored.lease_expires_at > now


def test_no_error_stops_the_keeper_a_clock_recheck_during_a_store_blip_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server-aligned clock re-checks its offset while the server is down: the keeper goes
    on with the last offset (its thread died, and the lease ran out)."""
    monkeypatch.setattr(clock_module, "SERVER_CLOCK_RECHECK_SECONDS", 0.05)
    down = threading.Event()

    def server_time() -> datetime:
        if down.is_set():
            raise RepositoryError("could not read the server's clock: connection refused")
        return datetime.now(timezone.utc)

    url, store = sqlite_store(tmp_path)
    pipeline_of(quick("A")).create(store.backend)
    aligned = ServerAlignedClock(server_time)
    aligned.now()
    claimed, since = claim(store, 0.3)
    with LeaseKeeper(store, 0.3, aligned) as keeper:
        keeper.hold(claimed, since)
        down.set()
        time.sleep(0.4)  # the blip: re-checks fail
        down.clear()
        time.sleep(0.8)
        now = datetime.now(timezone.utc)
        assert Store(from_url(url)).claim_one(claimed[0].uuid, now, "thief#1", now + timedelta(seconds=60)) is None


def test_a_failed_clock_recheck_keeps_the_last_offset_and_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock_module, "SERVER_CLOCK_RECHECK_SECONDS", 0.0)
    monkeypatch.setattr(clock_module, "SERVER_CLOCK_RETRY_SECONDS", 0.0, raising=False)
    offsets: list[float | None] = [5.0, None, 7.0]

    def server_time() -> datetime:
        offset = offsets.pop(0) if len(offsets) > 1 else offsets[0]
        if offset is None:
            raise RepositoryError("the server is down")
        return datetime.now(timezone.utc) + timedelta(seconds=offset)

    aligned = ServerAlignedClock(server_time)
    assert abs((aligned.now() - datetime.now(timezone.utc)).total_seconds() - 5) < 0.5
    assert abs((aligned.now() - datetime.now(timezone.utc)).total_seconds() - 5) < 0.5  # the blip: last offset
    assert abs((aligned.now() - datetime.now(timezone.utc)).total_seconds() - 7) < 0.5  # tried again


def test_a_refused_renewal_is_logged_and_counted_and_that_pipeline_starts_no_hook(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another worker (its clock ahead) claims a pipeline this worker holds: the keeper's next
    renewal is refused; the loss is logged and counted in prorch_leases_lost_total."""
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    ran: list[str] = []
    thief = Store(from_url(url))

    def on_start(step: Step) -> None:
        ran.append(step.pipeline_uuid)
        if len(ran) == 1:
            other = next(u for u in uuids if u != step.pipeline_uuid)
            ahead = datetime.now(timezone.utc) + timedelta(seconds=30)
            assert thief.claim_one(other, ahead, "thief#1", ahead + timedelta(seconds=60)) is not None
            time.sleep(0.5)  # the keeper renews every 0.2 s

    flow = pipeline_of(step_of("Slow", on_start=on_start))
    orchestrator = Orchestrator(url, lease_seconds=0.6, concurrency=1, group_commit=1, registry=registry)
    uuids = [flow.create(orchestrator.store.backend).uuid for _ in range(2)]
    metrics = WorkerMetrics(orchestrator).attach()
    with caplog.at_level(logging.WARNING, logger="prorch.storage.leases"):
        summary = orchestrator.execute_pipelines()

    lost = next(u for u in uuids if u not in ran)
    assert ran == [next(u for u in uuids if u != lost)]
    assert summary.errors[lost].startswith(("LeaseLostError", "ConcurrentUpdateError")), summary.errors
    assert any(f"lease of pipeline {lost} was lost" in r.getMessage() for r in caplog.records)
    assert metrics.registry.get_sample_value("prorch_leases_lost_total", {"pipeline": "P"}) == 1


def test_an_engine_error_releases_the_lease_and_clears_the_hook_mark(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An error in the engine (here an extension's ``on_transition``, whose records a commit
    needs), after a hook was marked running: the error is kept on the pipeline, its lease
    released and its mark cleared, so that the next pass neither waits for the lease nor
    charges a crash."""
    failing = threading.Event()

    def on_start(step: Step) -> None:
        failing.set()

    class Breaking(Extension):
        on = True

        def on_transition(self, name: str, events: Sequence[EventRecord], now: datetime) -> list[Record]:
            if self.on and failing.is_set():
                raise RuntimeError("event hook broke")
            return []

    flow = pipeline_of(step_of("A", on_start=on_start), step_of("B", on_start=on_start))
    orchestrator = Orchestrator(
        f"sqlite:///{tmp_path / 'e.db'}", lease_seconds=60, registry=registry, extensions=[breaking := Breaking()]
    )
    uuid = flow.create(orchestrator.store.backend).uuid
    summary = orchestrator.execute_pipelines()
    assert "event hook broke" in summary.errors[uuid]
    stored = orchestrator.store.get_pipeline(uuid)
    assert stored is not None and stored.last_error is not None and "event hook broke" in stored.last_error.message
    assert stored.lease_owner is None and stored.lease_expires_at is None
    assert stored.hook_started_at is None
    breaking.on = False
    with caplog.at_level(logging.WARNING):
        orchestrator.execute_pipelines()
    assert orchestrator.get(uuid).pipeline.status == Status.FINISHED
    assert not [r for r in caplog.records if "died or vanished" in r.getMessage()]


# --- confirm() and the keeper's bookkeeping, on the in-memory store and a fake clock ----------


def held(registry: Registry, age: float, lease: float = 30, **keeper: Any) -> tuple[Harness, Store, LeaseKeeper, str]:
    """One pipeline claimed with a ``lease`` s lease, whose lease time was written ``age`` s ago
    (on the monotonic clock), held by a keeper that was not started."""
    harness = Harness(MemoryBackend(), registry=registry)
    uuid = harness.create(pipeline_of(quick("A"))).uuid
    store = Store(harness.orchestrator.store.backend)
    now = harness.clock.now()
    claimed = store.claim_due(now, "me#1", now + timedelta(seconds=lease), 10)
    lease_keeper = LeaseKeeper(store, lease, harness.clock, **keeper)
    lease_keeper.hold(claimed, time.monotonic() - age)
    return harness, store, lease_keeper, uuid


def expires(store: Store, uuid: str) -> datetime | None:
    record = store.get_pipeline(uuid)
    assert record is not None
    return record.lease_expires_at


def test_confirm_renews_a_lease_only_once_it_is_within_a_third_of_its_end(registry: Registry) -> None:
    """30 s lease: written 19 s ago (11 s left) it passes as is; written 21 s ago (9 s left) it
    is renewed first, and passes without renewal again right after."""
    harness, store, keeper, uuid = held(registry, age=19)
    first = expires(store, uuid)
    harness.clock.advance(19)
    keeper.confirm(uuid)
    assert expires(store, uuid) == first
    harness, store, keeper, uuid = held(registry, age=21)
    harness.clock.advance(21)
    keeper.confirm(uuid)
    assert expires(store, uuid) == harness.clock.now() + timedelta(seconds=30)
    harness.clock.advance(1)
    keeper.confirm(uuid)
    assert expires(store, uuid) == harness.clock.now() - timedelta(seconds=1) + timedelta(seconds=30)


def test_a_renewal_stored_by_a_write_counts_and_never_moves_the_lease_back(registry: Registry) -> None:
    harness, store, keeper, uuid = held(registry, age=25)
    keeper.renewed(uuid, time.monotonic() - 40)  # older than what we hold: ignored
    keeper.renewed(uuid, time.monotonic())  # just written: 30 s left
    first = expires(store, uuid)
    harness.clock.advance(1)  # a renewal now would store a later time
    keeper.confirm(uuid)
    assert expires(store, uuid) == first
    keeper.renewed("not-held", time.monotonic())  # a pipeline not held: nothing to note


def test_a_lease_refused_at_confirm_is_lost_told_once_and_refused_after(registry: Registry) -> None:
    lost: list[str] = []
    harness, store, keeper, uuid = held(registry, age=25, on_lost=lost.append)
    now = harness.clock.now() + timedelta(seconds=31)
    assert store.claim_one(uuid, now, "thief#1", now + timedelta(seconds=60)) is not None
    with pytest.raises(LeaseLostError, match="ran out and another worker took it") as refused:
        keeper.confirm(uuid)
    assert refused.value.context == {"uuid": uuid} and lost == ["P"]
    with pytest.raises(LeaseLostError, match="lost its lease; not starting its hook") as again:
        keeper.confirm(uuid)
    assert again.value.context == {"uuid": uuid} and lost == ["P"]
    keeper.drop(uuid)  # its advance is over: nothing is held, nothing lost
    keeper.confirm(uuid)


def test_a_renewal_refused_after_our_own_release_is_no_loss(registry: Registry) -> None:
    lost: list[str] = []
    harness, store, keeper, uuid = held(registry, age=0, on_lost=lost.append)
    keeper.releasing(uuid)
    keeper.releasing("not-held")
    now = harness.clock.now() + timedelta(seconds=31)
    assert store.claim_one(uuid, now, "thief#1", now + timedelta(seconds=60)) is not None
    keeper.renew_all()
    assert lost == [] and keeper._held == {} and keeper._lost == set()


def test_a_store_error_at_confirm_is_a_repository_error_naming_the_pipeline(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _harness, store, keeper, uuid = held(registry, age=25)

    def down(*args: Any) -> bool:
        raise RepositoryError("connection refused")

    monkeypatch.setattr(store, "renew_lease", down)
    with pytest.raises(RepositoryError, match=f"pipeline {uuid}: could not renew its lease before a hook") as error:
        keeper.confirm(uuid)
    assert not isinstance(error.value, LeaseLostError)


def test_a_hook_limit_exactly_now_is_still_renewed_and_lifting_it_renews_again(registry: Registry) -> None:
    harness, store, keeper, uuid = held(registry, age=0)
    keeper.limit(uuid, harness.clock.now() + timedelta(seconds=10))
    harness.clock.advance(10)
    keeper.renew_all()
    assert expires(store, uuid) == harness.clock.now() + timedelta(seconds=30)
    harness.clock.advance(5)
    keeper.renew_all()  # past the limit: not renewed
    assert expires(store, uuid) == harness.clock.now() + timedelta(seconds=25)
    keeper.limit(uuid, None)
    keeper.renew_all()
    assert expires(store, uuid) == harness.clock.now() + timedelta(seconds=30)


def test_a_failing_loss_observer_does_not_stop_the_keeper(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str) -> None:
        raise RuntimeError("metrics down")

    harness, store, keeper, uuid = held(registry, age=0, on_lost=broken)
    now = harness.clock.now() + timedelta(seconds=31)
    assert store.claim_one(uuid, now, "thief#1", now + timedelta(seconds=60)) is not None
    with caplog.at_level(logging.WARNING, logger="prorch.storage.leases"):
        keeper.renew_all()
    assert [r.getMessage() for r in caplog.records][-1] == f"telling a lost lease of pipeline {uuid} failed"
    assert keeper._lost == {uuid}


def test_a_renewal_by_the_keeper_counts_for_confirm_and_a_dropped_lease_is_not_renewed(registry: Registry) -> None:
    harness, store, keeper, uuid = held(registry, age=25)
    harness.clock.advance(1)
    keeper.renew_all()
    renewed = expires(store, uuid)
    assert renewed == harness.clock.now() + timedelta(seconds=30)
    harness.clock.advance(1)
    keeper.confirm(uuid)  # renewed just now: no second renewal
    assert expires(store, uuid) == renewed
    keeper.limit(uuid, harness.clock.now() + timedelta(seconds=5))
    keeper.drop(uuid)
    keeper.hold([store.get_pipeline(uuid)], time.monotonic() - 25)  # type: ignore[list-item]
    harness.clock.advance(10)  # past the dropped limit
    keeper.renew_all()
    assert expires(store, uuid) == harness.clock.now() + timedelta(seconds=30)
    keeper.drop(uuid)
    harness.clock.advance(1)
    keeper.confirm(uuid)  # not held: passes, nothing renewed
    keeper.renew_all()
    assert expires(store, uuid) == harness.clock.now() - timedelta(seconds=1) + timedelta(seconds=30)
    keeper.limit(uuid, None)  # no limit to lift: nothing happens


def test_a_refused_renewal_by_an_older_token_keeps_the_lease(registry: Registry) -> None:
    lost: list[str] = []
    _harness, _store, keeper, uuid = held(registry, age=0, on_lost=lost.append)
    assert keeper._renew(uuid, "me#0", time.monotonic()) is False  # a claim before this one
    assert list(keeper._held) == [uuid] and keeper._lost == set() and lost == []


def test_lost_leases_and_failed_renewals_are_logged_with_the_pipeline(
    registry: Registry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, store, keeper, uuid = held(registry, age=0)
    original = store.renew_leases

    def down(*args: Any) -> bool:
        raise RepositoryError("connection refused")

    monkeypatch.setattr(store, "renew_leases", down)
    with caplog.at_level(logging.WARNING, logger="prorch.storage.leases"):
        keeper.renew_all()
        monkeypatch.setattr(store, "renew_leases", original)
        now = harness.clock.now() + timedelta(seconds=31)
        assert store.claim_one(uuid, now, "thief#1", now + timedelta(seconds=60)) is not None
        keeper.renew_all()
    failed, lost = caplog.records
    assert failed.getMessage() == f"could not renew the lease of pipeline {uuid}: connection refused"
    assert lost.getMessage() == (
        f"lease of pipeline {uuid} was lost: it ran out and another worker claimed it; this worker starts none of "
        "its hooks from now on and its writes are refused (a hook already running goes on)"
    )
    assert lost.pipeline_uuid == uuid  # type: ignore[attr-defined]


def test_a_renewal_too_slow_to_leave_the_margin_is_an_error(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0.3 s lease renewed in 0.25 s leaves less than its third (0.1 s) when the hook would start."""
    _harness, store, keeper, uuid = held(registry, age=0.3, lease=0.3)
    original = store.renew_lease

    def slow(*args: Any) -> bool:
        time.sleep(0.25)
        return original(*args)

    monkeypatch.setattr(store, "renew_lease", slow)
    with pytest.raises(RepositoryError, match=f"^pipeline {uuid}: renewing its lease took too long to start a hook"):
        keeper.confirm(uuid)


def test_the_keeper_thread_logs_a_failed_turn_and_goes_on(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    _harness, store, _keeper, _uuid = held(registry, age=0)
    turns: list[int] = []

    class Broken:
        def now(self) -> datetime:
            turns.append(1)
            raise RuntimeError("no clock")

    with caplog.at_level(logging.WARNING, logger="prorch.storage.leases"), LeaseKeeper(store, 0.3, Broken()):
        deadline = time.monotonic() + 10
        while len(turns) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(turns) >= 2
    assert caplog.records[0].getMessage() == "lease keeper: renewing failed, trying again in 0.1s: no clock"


def test_a_lease_given_back_after_an_outage_expires_ours_and_leaves_a_taken_over_one_alone(registry: Registry) -> None:
    """``give_back_later`` then ``give_back``: our stored lease expires at once (claimable by
    any worker); one taken over meanwhile keeps its new owner; a store still failing keeps the
    lease for the next call."""
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry)
    mine = harness.create(pipeline_of(quick("A")))
    taken = harness.create(pipeline_of(quick("B"), name="Q"))
    store = Store(backend)
    keeper = LeaseKeeper(store, 30, harness.clock)

    def claim(uuid: str, owner: str) -> PipelineRecord | None:
        now = harness.clock.now()
        return store.claim_one(uuid, now, owner, now + timedelta(seconds=30))

    keeper.hold([claim(taken.uuid, "token-1")], time.monotonic())  # type: ignore[list-item]
    harness.clock.advance(31)  # its lease ran out: another worker takes it over
    assert claim(taken.uuid, "other") is not None
    keeper.hold([claim(mine.uuid, "token-2")], time.monotonic())  # type: ignore[list-item]
    for uuid in (mine.uuid, taken.uuid):
        keeper.give_back_later(uuid)
        keeper.drop(uuid)  # the advance ended on the store's error
    working = store.renew_lease

    def unreachable(*args: Any) -> bool:
        raise RepositoryError("store unreachable")

    store.renew_lease = unreachable  # type: ignore[method-assign]
    keeper.give_back()
    store.renew_lease = working  # type: ignore[method-assign]
    assert claim(mine.uuid, "next") is None  # still ours: the failed call gave nothing back
    keeper.give_back()
    assert claim(mine.uuid, "next") is not None  # within what was its lease: given back
    assert store.get_pipeline(taken.uuid).lease_owner == "other"  # type: ignore[union-attr]
    assert keeper._unsettled == {}


# --- a keeper's turn is one write, whatever the number of leases held ----------------------------


def count_writes(backend: Any, kind: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per whole-file rewrite (TinyDB) or per committed transaction (SQLite)."""
    writes: list[int] = []
    if kind == "tinydb":
        replace = backend.storage._replace

        def counted(data: Any) -> None:
            writes.append(1)
            replace(data)

        monkeypatch.setattr(backend.storage, "_replace", counted)
    else:
        from sqlalchemy import event

        event.listen(backend.engine, "commit", lambda _connection: writes.append(1))
    return writes


@pytest.mark.parametrize("kind", ["tinydb", "sqlite"])
def test_a_keeper_turn_renews_every_lease_held_in_one_write(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """32 leases held: a turn of the keeper rewrites (and fsyncs) the TinyDB file once, and
    commits one transaction on SQLite. It was one per lease: 32 rewrites of the whole file every
    third of the lease, which fell behind under load until live workers lost their leases."""
    backend = from_url(f"{kind}:///{tmp_path / 'leases.store'}")
    harness = Harness(backend, registry=registry)
    uuids = {harness.create(pipeline_of(quick("A"))).uuid for _ in range(32)}
    store = Store(backend)
    now = harness.clock.now()
    keeper = LeaseKeeper(store, 30, harness.clock)
    keeper.hold(store.claim_due(now, "me#1", now + timedelta(seconds=30), 100), time.monotonic())
    harness.clock.advance(10)
    writes = count_writes(backend, kind, monkeypatch)
    keeper.renew_all()
    assert len(writes) == 1
    assert {uuid: expires(store, uuid) for uuid in uuids} == dict.fromkeys(uuids, now + timedelta(seconds=40))
    assert set(keeper._held) == uuids and keeper._lost == set()


def test_a_repository_without_batches_renews_each_lease_alone_and_an_error_keeps_out_that_one(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's repository with claims but no batch renewal (``SeedAdapter``): the keeper's turn
    renews each lease by its own ``renew_lease``, as before; the one whose call fails is logged
    and neither renewed nor lost, the others are renewed, a refused one is lost."""
    backend = FaultyBackend(MemoryBackend(), rate=0.0)
    harness = Harness(backend, registry=registry)
    ok, failing, taken = (harness.create(pipeline_of(quick("A"))).uuid for _ in range(3))
    store = Store(backend)
    assert store.can_claim and not store.engine.batch_renewal  # type: ignore[attr-defined]
    now = harness.clock.now()
    keeper = LeaseKeeper(store, 30, harness.clock)
    keeper.hold(store.claim_due(now, "me#1", now + timedelta(seconds=30), 10), time.monotonic())
    harness.clock.advance(31)
    assert store.claim_one(taken, harness.clock.now(), "other#1", harness.clock.now() + timedelta(seconds=30))
    claims = store.engine.claims  # type: ignore[attr-defined]
    working = claims.renew_lease

    def renew(uuid: str, owner: str, until: datetime) -> bool:
        if uuid == failing:
            raise OSError("disk full")
        return bool(working(uuid, owner, until))

    claims.renew_lease = renew
    with caplog.at_level(logging.WARNING, logger="prorch.storage.leases"):
        keeper.renew_all()
    assert expires(store, ok) == harness.clock.now() + timedelta(seconds=30)
    assert expires(store, failing) == now + timedelta(seconds=30)
    assert set(keeper._held) == {ok, failing} and keeper._lost == {taken}
    messages = sorted(record.getMessage() for record in caplog.records if record.name == "prorch.storage.leases")
    failed = f"could not renew the lease of pipeline {failing}: repository failed to renew a lease: OSError: disk full"
    assert len(messages) == 2 and messages[0] == failed
    assert messages[1].startswith(f"lease of pipeline {taken} was lost")


def test_a_write_refused_because_another_worker_took_the_lease_is_a_lost_lease(
    registry: Registry, tmp_path: Path
) -> None:
    """The hook outlasts the lease and ends before the keeper's next turn (a frozen worker
    resumed): its write is refused, and that is the loss the keeper tells (it was dropped
    uncounted, so ``prorch_leases_lost_total`` missed it)."""
    url, store = sqlite_store(tmp_path)
    lost: list[str] = []
    thief = Store(from_url(url))

    def on_start(step: Step) -> None:
        ahead = datetime.now(timezone.utc) + timedelta(seconds=30)  # past our lease
        assert thief.claim_one(step.pipeline_uuid, ahead, "thief#1", ahead + timedelta(seconds=60)) is not None

    flow = pipeline_of(step_of("Slow", on_start=on_start))
    flow.create(store.backend)
    claimed, since = claim(store, 30)
    keeper = LeaseKeeper(store, 30, SystemClock(), on_lost=lost.append)  # not started: no turn sees it
    keeper.hold(claimed, since)
    runner = Runner(store, registry, SystemClock(), lease_seconds=30)
    results = write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in claimed], group=1)

    assert isinstance(results[0], ConcurrentUpdateError), results
    assert lost == ["P"]  # told once
    keeper.renew_all()  # nothing left to renew or to tell again
    assert lost == ["P"] and keeper._held == {}


def _outside_cancel(store: Store, uuid: str) -> None:
    outside.request_cancel(store, SystemClock(), uuid)


def _outside_send(store: Store, uuid: str) -> None:
    outside.send(store, SystemClock(), uuid, "nudge")


def _outside_priority(store: Store, uuid: str) -> None:
    def change(record: PipelineRecord, now: datetime) -> list[EventRecord]:
        record.priority = 9
        return []

    assert outside.change_pipeline(store, SystemClock(), uuid, change)


@pytest.mark.parametrize("act", [_outside_cancel, _outside_send, _outside_priority], ids=["cancel", "send", "priority"])
def test_a_write_refused_by_an_outside_change_while_we_hold_the_lease_is_no_loss(
    registry: Registry, tmp_path: Path, act: Any
) -> None:
    """An operator's cancel request, a message or a priority change while our lease holds the
    pipeline refuses our write: it is merged and written again, and no lease is told lost."""
    url, store = sqlite_store(tmp_path)
    lost: list[str] = []
    operator = Store(from_url(url))
    flow = pipeline_of(step_of("Slow", on_start=lambda step: act(operator, step.pipeline_uuid)))
    flow.create(store.backend)
    claimed, since = claim(store, 30)
    keeper = LeaseKeeper(store, 30, SystemClock(), on_lost=lost.append)
    keeper.hold(claimed, since)
    before = claimed[0].revision
    runner = Runner(store, registry, SystemClock(), lease_seconds=30)
    results = write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in claimed], group=1)

    assert not isinstance(results[0], Exception), results
    assert lost == [] and keeper._lost == set()
    stored = store.get_pipeline(claimed[0].uuid)
    assert stored is not None and stored.revision >= before + 2  # the outside write, then ours


# --- a refused write tells a loss only when another worker holds the lease --------------------


def faulty_store(
    registry: Registry, flow: type[Pipeline], count: int = 1, **faults: Any
) -> tuple[FaultyBackend, Store, list[PipelineRecord], LeaseKeeper, list[str]]:
    """``count`` pipelines of ``flow`` claimed on a fault-injecting store, held by a keeper
    (not started: no turn of it sees anything) that tells its losses into the list returned."""
    backend = FaultyBackend(MemoryBackend(), rate=0.0, **faults)
    harness = Harness(backend, registry=registry)
    for _ in range(count):
        harness.create(flow)
    store = Store(backend)
    lost: list[str] = []
    since, now = time.monotonic(), harness.clock.now()
    claimed = store.claim_due(now, "me#1", now + timedelta(seconds=30), 10)
    keeper = LeaseKeeper(store, 30, harness.clock, on_lost=lost.append)
    keeper.hold(claimed, since)
    return backend, store, claimed, keeper, lost


def test_a_release_stored_but_reported_failed_is_no_lost_lease(registry: Registry) -> None:
    """A round of two releasing writes is stored, but the COMMIT's answer is lost (the
    connection dropped after it): each write, tried again alone, is refused, and the fresh
    record shows the lease released, by us. That is no loss (it was told as one)."""
    backend: FaultyBackend

    def on_start(step: Step) -> None:
        backend.plan("commit", after=True)  # the round of both pipelines' last writes

    backend, store, claimed, keeper, lost = faulty_store(registry, pipeline_of(step_of("Last", on_start=on_start)), 2)
    runner = Runner(store, registry, keeper.clock, lease_seconds=30)
    results = write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in claimed], group=2)

    assert backend.faults == 1 and all(isinstance(r, ConcurrentUpdateError) for r in results), results
    for pipeline in claimed:
        stored = store.get_pipeline(pipeline.uuid)
        assert stored is not None and stored.status == Status.FINISHED and stored.lease_owner is None
    assert lost == [] and keeper._lost == set()


def taken_over(store: Store, keeper: LeaseKeeper, uuid: str) -> None:
    """Another worker claims ``uuid``, our lease having run out (as seen from past its end)."""
    ahead = keeper.clock.now() + timedelta(seconds=31)
    assert store.claim_one(uuid, ahead, "thief#1", ahead + timedelta(seconds=30)) is not None


def test_a_failed_write_whose_pipeline_another_worker_took_is_a_lost_lease(registry: Registry) -> None:
    """The hook's results fail to be stored (a store error, not a refusal) and, read again, the
    pipeline is another worker's: a lost lease, told once (``Journal.reload`` said only False)."""
    backend: FaultyBackend
    store: Store
    keeper: LeaseKeeper

    def on_start(step: Step) -> None:
        taken_over(store, keeper, step.pipeline_uuid)
        backend.plan("compare_and_set")  # the first statement of the hook's write

    backend, store, claimed, keeper, lost = faulty_store(registry, pipeline_of(step_of("Last", on_start=on_start)))
    runner = Runner(store, registry, keeper.clock, lease_seconds=30)
    results = write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in claimed], group=1)

    assert backend.faults == 1 and isinstance(results[0], ConcurrentUpdateError), results
    assert lost == ["P"] and keeper._lost == {claimed[0].uuid}
    keeper.renew_all()
    assert lost == ["P"]


def test_a_write_refused_on_a_store_without_transactions_tells_a_lost_lease(registry: Registry) -> None:
    """Without transactions a refused write is not merged and made again (its steps may be
    written already), but when another worker holds the lease it is still a loss, told once."""
    store: Store
    keeper: LeaseKeeper

    def on_start(step: Step) -> None:
        taken_over(store, keeper, step.pipeline_uuid)

    flow = pipeline_of(step_of("Last", on_start=on_start))
    _, store, claimed, keeper, lost = faulty_store(registry, flow, transactions=False)
    assert not store.has_transaction
    runner = Runner(store, registry, keeper.clock, lease_seconds=30)
    results = write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in claimed], group=1)

    assert isinstance(results[0], ConcurrentUpdateError), results
    assert lost == ["P"] and keeper._lost == {claimed[0].uuid}


def test_a_release_stored_whose_answer_was_lost_is_no_loss_without_transactions_either(registry: Registry) -> None:
    """The pipeline's statement, the last of a write without a transaction, stores the release
    but fails after: read again, the lease is released (by us), not another's: no loss."""
    backend: FaultyBackend

    def on_start(step: Step) -> None:
        backend.plan("PIPELINE.compare_and_set", after=True)

    flow = pipeline_of(step_of("Last", on_start=on_start))
    backend, store, claimed, keeper, lost = faulty_store(registry, flow, transactions=False)
    runner = Runner(store, registry, keeper.clock, lease_seconds=30)
    results = write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in claimed], group=1)

    assert backend.faults == 1 and isinstance(results[0], ConcurrentUpdateError), results
    stored = store.get_pipeline(claimed[0].uuid)
    assert stored is not None and stored.status == Status.FINISHED and stored.lease_owner is None
    assert lost == [] and keeper._lost == set()


def test_a_transition_stored_but_reported_failed_is_not_merged_a_thousand_times(registry: Registry) -> None:
    """A round of two transitions that keep their leases (``on_start`` without a verdict) is
    stored, its COMMIT's answer lost. Each write, tried alone, is refused: the pipeline moved
    (by our own write), so it is merged and written again, and refused again, now by its step
    (written by us too), which no merge can change. That went on ``MAX_MERGES`` (1000) times,
    a read and a write each; it stops once the pipeline, read again, has not moved."""
    backend: FaultyBackend

    def on_start(step: Step) -> None:
        backend.plan("commit", after=True)

    flow = pipeline_of(step_of("Two", on_start=on_start, on_continue=lambda step: step.finish()))
    backend, store, claimed, keeper, lost = faulty_store(registry, flow, 2)
    reads = backend.calls.get("get", 0)
    runner = Runner(store, registry, keeper.clock, lease_seconds=30)
    results = write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in claimed], group=2)

    assert backend.faults == 1 and all(isinstance(r, ConcurrentUpdateError) for r in results), results
    assert backend.calls["get"] - reads <= 2 * 3, backend.calls  # per pipeline: its steps, then two merges
    assert lost == [] and keeper._lost == set()


def test_a_transition_stored_but_reported_failed_gives_its_lease_back(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """The same lost answer ends both advances with their leases and hook marks stored as ours,
    nothing of them running here. They were left to run out (a lease later), and the marks made
    the next claim run them alone, as after a crash. Given back at the next claim (``give_back``,
    as after an outage), they are claimable at once, without a mark, and finish."""
    backend: FaultyBackend

    def on_start(step: Step) -> None:
        backend.plan("commit", after=True)

    flow = pipeline_of(step_of("Two", on_start=on_start, on_continue=lambda step: step.finish()))
    backend, store, claimed, keeper, lost = faulty_store(registry, flow, 2)
    runner = Runner(store, registry, keeper.clock, lease_seconds=30)
    results = write_in_rounds(store, [passes.advancing(runner, p, keeper, None) for p in claimed], group=2)
    assert backend.faults == 1 and all(str(r).startswith("UnconfirmedWriteError") for r in results), results
    assert "another orchestrator holds it" not in caplog.text
    backend.planned.clear()  # the second hook's plan: the round had failed already

    keeper.give_back()  # the worker's next claim
    now = keeper.clock.now()
    again = store.claim_due(now, "me#2", now + timedelta(seconds=30), 10)
    assert sorted(p.uuid for p in again) == sorted(p.uuid for p in claimed)
    assert all(p.hook_started_at is None and p.crashes == 0 for p in again), again
    keeper.hold(again, time.monotonic())
    write_in_rounds(store, [guarded(runner.advancing(p, keeper)) for p in again], group=2)
    for pipeline in again:
        stored = store.get_pipeline(pipeline.uuid)
        assert stored is not None and stored.status == Status.FINISHED and stored.crashes == 0
    assert lost == []


def test_a_pass_gives_back_the_lease_of_a_transition_stored_but_reported_failed(registry: Registry) -> None:
    """A pass (``execute_pipelines``, ``prorch run`` from cron) never gave back the leases that
    ``give_back_later`` set aside (a worker does at its next claim): a transition stored with
    its COMMIT's answer lost left the pipeline leased, with its hook mark, until the lease ran
    out, and the next claim then ran it alone as a crash suspect. The pass now gives them back
    as it ends: the next pass resumes it at once, with no crash charged."""
    backend: FaultyBackend

    def on_start(step: Step) -> None:
        if not backend.faults and not backend.planned:  # the round's COMMIT: stored, answer lost
            backend.plan("commit", after=True)

    flow = pipeline_of(step_of("Two", on_start=on_start, on_continue=lambda step: step.finish()))
    backend = FaultyBackend(MemoryBackend(), rate=0.0)  # (a COMMIT's answer lost: planned on its transaction)
    harness = Harness(backend, registry=registry)
    uuids = [harness.create(flow).uuid for _ in range(2)]  # a round of two: one COMMIT for both
    orchestrator = Orchestrator(
        backend, registry=registry, clock=harness.clock, lease_seconds=30, concurrency=1, batch_size=2
    )
    orchestrator.execute_pipelines()
    assert backend.faults == 1
    now = orchestrator.clock.now()
    for uuid in uuids:
        stored = orchestrator.store.get_pipeline(uuid)
        assert stored is not None and stored.hook_started_at is None, stored
        assert stored.lease_expires_at is None or stored.lease_expires_at <= now, stored
    orchestrator.execute_pipelines()
    for uuid in uuids:
        finished = orchestrator.store.get_pipeline(uuid)
        assert finished is not None and finished.status == Status.FINISHED and finished.crashes == 0, finished
