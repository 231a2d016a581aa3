"""Which writes wake an idle worker (``prorch.storage.wakeups``), the in-process bell, and how
long an idle worker waits (``prorch.engine.idle``): on the memory backend, with the system
clock (a write makes work when the pipeline is due by the wall clock)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from prorch import OnContinueMixin, OnStartMixin, Orchestrator, Step, register_step
from prorch.engine.idle import idle_seconds
from prorch.model.clock import FakeClock
from prorch.model.registry import Registry
from prorch.storage.wakeups import Bell
from repositories import MemoryBackend
from tests.support.builders import pipeline_of, quick, step_of


def rung(backend: MemoryBackend) -> bool:
    """Whether the backend's bell rang since this thread last asked."""
    return backend.wake_bell().wait(0)


def parked_pipeline() -> type:
    """A pipeline whose step waits an hour for a message ``go``."""

    class Parked(OnStartMixin, OnContinueMixin, Step):
        name = "Parked"

        def on_start(self) -> None:
            self.wait(seconds=3600)

        def on_continue(self) -> None:
            if self.receive("go") is None:
                self.wait(seconds=3600)
                return
            self.finish()

    return pipeline_of(register_step(Parked), name="Parks")


def test_each_write_that_makes_work_rings_and_the_others_do_not(registry: Registry) -> None:
    backend = MemoryBackend()
    orchestrator = Orchestrator(backend, registry=registry)
    rung(backend)
    created = parked_pipeline().create(backend, {})
    assert rung(backend), "a create"
    orchestrator.execute_pipelines()  # claims (no ring), parks for an hour (released, not due: no ring)
    assert not rung(backend), "a claim and a park"
    orchestrator.send(created.uuid, "go")
    assert rung(backend), "a send"
    orchestrator.execute_pipelines()
    assert orchestrator.get(created.uuid).pipeline.status == "finished"
    assert not rung(backend), "a pipeline's end"

    failing = pipeline_of(step_of("Breaks", on_start=lambda step: step.fail("no")), name="Fails")
    broken = failing.create(backend, {})
    orchestrator.execute_pipelines()
    rung(backend)
    orchestrator.retry(broken.uuid)
    assert rung(backend), "a retry"

    held = parked_pipeline().create(backend, {})
    now = datetime.now(timezone.utc)
    assert orchestrator.store.claim_one(held.uuid, now, "elsewhere#1", now + timedelta(minutes=1)) is not None
    rung(backend)
    orchestrator.cancel(held.uuid)  # held elsewhere: a cancel request for its holder
    assert rung(backend), "a cancel request"


def test_a_group_commit_of_many_creates_rings_once_and_a_ring_during_a_pass_is_not_lost(registry: Registry) -> None:
    backend = MemoryBackend()
    bell = backend.wake_bell()
    bell.wait(0)
    pipeline_of(quick("Only")).create_many(backend, [{}] * 5)
    assert bell.wait(0) and not bell.wait(0)  # rung (at least once); seen once by this thread
    bell.ring()  # while "a pass" runs: the next wait returns at once
    assert bell.wait(10.0)


def test_the_bell_wakes_a_waiting_thread_and_each_thread_sees_each_ring() -> None:
    bell = Bell()
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(bell.wait(30.0)))
    waiter.start()
    bell.ring()
    waiter.join(5)
    assert woke == [True]
    assert bell.wait(0)  # this thread had not seen it
    assert not bell.wait(0.01)


def test_an_idle_worker_waits_until_the_next_timer_or_the_interval(registry: Registry) -> None:
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
    orchestrator = Orchestrator(MemoryBackend(), registry=registry, clock=clock)
    assert idle_seconds(orchestrator.store, orchestrator.extensions, clock, 30.0) == 30.0  # nothing stored
    backend = MemoryBackend()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    store, extensions = orchestrator.store, orchestrator.extensions
    parked_pipeline().create(backend, {}, clock=clock)
    orchestrator.execute_pipelines()  # parked until 2030-01-01 01:00
    assert idle_seconds(store, extensions, clock, 30.0) == 30.0
    assert idle_seconds(store, extensions, clock, 7200.0) == 3600.0
    clock.advance(3599)
    assert idle_seconds(store, extensions, clock, 30.0) == 1.0


def test_a_schedule_wakes_an_idle_worker_at_its_next_tick(registry: Registry) -> None:
    clock = FakeClock(datetime(2030, 1, 1, 0, 0, 50, tzinfo=timezone.utc))
    pipeline_of(quick("Tick"), name="Minutely", schedule="* * * * *")
    orchestrator = Orchestrator(MemoryBackend(), registry=registry, clock=clock)
    assert idle_seconds(orchestrator.store, orchestrator.extensions, clock, 30.0) == 10.0


def test_a_pipeline_due_since_the_last_claim_is_claimed_at_once(registry: Registry) -> None:
    """A pipeline whose due time fell between the last claim and the wait (another process's
    clock a few milliseconds ahead) is no timer to wait for: the worker passes again at once
    (it waited for the interval, seen as a send picked up after 30 s, 2 in 200)."""
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
    backend = MemoryBackend()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    orchestrator.execute_pipelines()  # claims nothing
    claimed_at = orchestrator.claimed_at
    assert claimed_at == clock.now()
    clock.advance(0.5)
    pipeline_of(quick("Late")).create(backend, {}, clock=clock)  # due at +0.5 s: after the claim
    clock.advance(0.5)
    store, extensions = orchestrator.store, orchestrator.extensions
    assert idle_seconds(store, extensions, clock, 30.0, since=claimed_at) == 0.0
    assert idle_seconds(store, extensions, clock, 30.0) == 30.0  # what the worker did


def test_a_pipeline_another_worker_holds_is_no_timer(registry: Registry) -> None:
    """A held pipeline's due time is its holder's business: taken for a timer, it made idle
    workers pass again and again while others ran it (claims contending on SQLite's write lock,
    seen as 5 rate-limited starts in a window of 4 in test_limit_workers)."""
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=timezone.utc))
    backend = MemoryBackend()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    created = pipeline_of(quick("Held")).create(backend, {}, clock=clock)
    before = clock.now() - timedelta(seconds=1)
    assert orchestrator.store.next_due_at(before) == clock.now()
    assert orchestrator.store.claim_one(created.uuid, clock.now(), "elsewhere#1", clock.now() + timedelta(minutes=1))
    assert orchestrator.store.next_due_at(before) is None
