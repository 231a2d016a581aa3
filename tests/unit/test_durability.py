"""Durable execution on the in-memory backend with a fake clock: retries and backoff, timeouts,
rollback, quarantine of poison runs, cancel while held, lease renewal. No sleeps."""

from __future__ import annotations

from datetime import timedelta

import pytest

from prorch import OnContinueMixin, OnStartMixin, Orchestrator, Status, Step, register_step
from prorch.engine import transitions
from prorch.engine.policy import backoff_delay
from prorch.engine.state import Run
from prorch.model.registry import Registry
from prorch.storage.store import Store
from prorch.testing import Harness
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of

LOG: list[str] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOG.clear()


def compensable(name: str, *, rollback_fails: int = 0, max_attempts: int = 1) -> type[Step]:
    """A step that finishes at once and logs its rollback."""
    failures = {"left": rollback_fails}

    def on_start(self: Step) -> None:
        LOG.append(f"{name}.start")

    def on_rollback(self: Step) -> None:
        LOG.append(f"{name}.rollback")
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("storage unreachable")

    attrs = {"name": name, "on_start": on_start, "on_rollback": on_rollback, "max_attempts": max_attempts}
    return register_step(type(name, (OnStartMixin, Step), attrs))


def failing(name: str = "Boom") -> type[Step]:
    def on_start(self: Step) -> None:
        LOG.append(f"{name}.start")
        raise RuntimeError("payment declined")

    return register_step(type(name, (OnStartMixin, Step), {"name": name, "on_start": on_start}))


# --- retries ----------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    delays = [backoff_delay(attempt, base=2.0, cap=20.0) for attempt in range(1, 8)]
    assert 1.0 <= delays[0] <= 2.0 and 2.0 <= delays[1] <= 4.0 and 4.0 <= delays[2] <= 8.0
    assert all(d <= 20.0 for d in delays) and delays[-1] >= 10.0


def test_retry_delay_and_cap_come_from_the_step(harness: Harness, registry: Registry) -> None:
    class Slow(OnStartMixin, Step):
        name = "Slow"
        max_attempts = 3
        retry_delay = 100.0
        retry_max_delay = 150.0

        def on_start(self) -> None:
            raise ConnectionError("later")

    register_step(Slow)
    run = harness.create(pipeline_of(Slow))
    start = harness.clock.now()
    harness.run_pass()
    first = harness.orchestrator.get(run.uuid).steps[0].next_run_at
    assert first is not None and timedelta(seconds=50) <= first - start <= timedelta(seconds=100)
    harness.clock.set(first)
    harness.run_pass()
    second = harness.orchestrator.get(run.uuid).steps[0].next_run_at
    assert second is not None and timedelta(seconds=75) <= second - first <= timedelta(seconds=150)


def test_never_retry_exceptions_fail_at_once(harness: Harness, registry: Registry) -> None:
    class Strict(OnStartMixin, Step):
        name = "Strict"
        max_attempts = 5
        never_retry = (PermissionError,)

        def on_start(self) -> None:
            LOG.append("try")
            raise PermissionError("forbidden")

    register_step(Strict)
    run = harness.create(pipeline_of(Strict))
    harness.run_pass()
    assert harness.status(run.uuid) == "failed" and LOG == ["try"]
    assert "step.retrying" not in harness.event_types(run.uuid)


# --- timeouts ---------------------------------------------------------------------------------


class Forever(OnStartMixin, OnContinueMixin, Step):
    name = "Forever"
    timeout = 300

    def on_start(self) -> None:
        LOG.append("start")

    def on_continue(self) -> None:
        LOG.append("continue")
        self.wait(seconds=3600)  # waits longer than its timeout

    def on_timeout(self) -> None:
        LOG.append("on_timeout")


def test_timeout_makes_a_waiting_pipeline_due_and_fails_the_step(harness: Harness, registry: Registry) -> None:
    register_step(Forever)
    run = harness.create(pipeline_of(Forever))
    start = harness.clock.now()
    harness.run_pass()
    assert harness.orchestrator.get(run.uuid).pipeline.next_run_at == start + timedelta(seconds=300)
    harness.clock.advance(299)
    assert harness.run_pass().claimed == 0
    harness.clock.advance(1)
    assert harness.run_pass().failed == 1
    step = harness.orchestrator.get(run.uuid).steps[0]
    assert step.status == Status.FAILED
    assert step.error is not None and step.error.type == "StepTimeoutError" and "300s" in step.error.message
    assert LOG == ["start", "continue", "on_timeout"]


# --- rollback ---------------------------------------------------------------------------------


def test_rollback_runs_in_reverse_order_then_the_pipeline_fails(harness: Harness, registry: Registry) -> None:
    a, b = compensable("A"), compensable("B")
    plain = register_step(type("Plain", (OnStartMixin, Step), {"name": "Plain", "on_start": lambda self: None}))
    run = harness.create(pipeline_of(a, plain, b, failing(), compensable("Never")))
    summary = harness.run_pass()
    assert summary.failed == 1
    assert LOG == ["A.start", "B.start", "Boom.start", "B.rollback", "A.rollback"]
    state = harness.orchestrator.get(run.uuid)
    assert state.pipeline.status == Status.FAILED
    assert state.pipeline.last_error is not None and state.pipeline.last_error.message == "payment declined"
    assert [s.rollback for s in state.steps] == ["done", None, "done", None, None]
    types = harness.event_types(run.uuid)
    assert types[-4:] == ["step.failed", "step.rolled_back", "step.rolled_back", "pipeline.failed"]


def test_rollback_is_retried_then_given_up_and_the_first_error_is_kept(harness: Harness, registry: Registry) -> None:
    flaky = compensable("Flaky", rollback_fails=1, max_attempts=2)
    broken = compensable("Broken", rollback_fails=5, max_attempts=2)
    run = harness.create(pipeline_of(flaky, broken, failing()))
    assert harness.run_until_done(run.uuid) == "failed"
    assert LOG.count("Broken.rollback") == 2 and LOG.count("Flaky.rollback") == 2
    state = harness.orchestrator.get(run.uuid)
    assert [s.rollback for s in state.steps[:2]] == ["done", "failed"]
    assert state.pipeline.last_error is not None and state.pipeline.last_error.message == "payment declined"
    assert "step.rollback_failed" in harness.event_types(run.uuid)


def test_rollback_survives_a_crash_midway(registry: Registry) -> None:
    backend = MemoryBackend()
    first = Harness(backend, registry=registry)
    a, b = compensable("A"), compensable("B", rollback_fails=1, max_attempts=2)
    run = first.create(pipeline_of(a, b, failing()))
    first.run_pass()  # B's rollback failed once and is scheduled again
    assert LOG == ["A.start", "B.start", "Boom.start", "B.rollback"]
    # a new process (a new orchestrator on the same store) finishes the rollback
    second = Harness(backend, clock=first.clock, registry=registry)
    assert second.run_until_done(run.uuid) == "failed"
    assert LOG[-2:] == ["B.rollback", "A.rollback"]


def test_retry_after_rollback_runs_compensated_steps_again(harness: Harness, registry: Registry) -> None:
    attempts = {"n": 0}

    class Once(OnStartMixin, Step):
        name = "Once"

        def on_start(self) -> None:
            attempts["n"] += 1
            if attempts["n"] == 1:
                raise RuntimeError("first time")

    register_step(Once)
    run = harness.create(pipeline_of(compensable("A"), Once))
    harness.run_pass()
    assert LOG == ["A.start", "A.rollback"]
    harness.orchestrator.retry(run.uuid)
    assert harness.run_until_done(run.uuid) == "finished"
    assert LOG == ["A.start", "A.rollback", "A.start"]


# --- poison runs ------------------------------------------------------------------------------


def die_in_a_hook(store: Store, harness: Harness, uuid: str) -> None:
    """What a worker SIGKILLed inside one of the pipeline's hooks leaves: its claim, and the mark
    written before the hook. Then its lease runs out."""
    now = harness.clock.now()
    (claimed,) = store.claim_due(now, "doomed", now + timedelta(seconds=30), 10)
    assert claimed.uuid == uuid
    # the runner's own rule charges the previous worker's death (not a copy of it here)
    transitions.charge_crash(Run(pipeline=claimed, steps=[], classes={}, params=None, outputs={}))
    claimed.hook_started_at = now
    store.commit([claimed])
    harness.clock.advance(31)


def test_a_pipeline_whose_workers_keep_dying_is_quarantined(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry, max_crashes=2, lease_seconds=30)
    run = harness.create(pipeline_of(compensable("A"), failing("Never")))
    store = Store(backend)
    for _ in range(2):  # two workers claim it and die inside its hook
        die_in_a_hook(store, harness, run.uuid)
    summary = harness.run_pass()
    assert summary.failed == 1
    state = harness.orchestrator.get(run.uuid)
    assert state.pipeline.status == Status.FAILED
    assert state.pipeline.last_error is not None
    assert "died 2 times in a row while a hook of this pipeline was running (limit 2)" in (
        state.pipeline.last_error.message
    )
    assert LOG == []  # no hook ran, not even a rollback
    assert state.steps[0].status == Status.FAILED and state.steps[0].error is not None


def test_claims_without_a_running_hook_are_not_crashes(registry: Registry) -> None:
    """Regression: every claim used to count as a crash, so the pipelines a dead worker had
    claimed but not started were quarantined with the one whose hook was running."""
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry, max_crashes=1, lease_seconds=30)
    run = harness.create(pipeline_of(compensable("A")))
    store = Store(backend)
    for _ in range(5):  # five workers claim it and die before starting any of its hooks
        now = harness.clock.now()
        store.claim_due(now, "doomed", now + timedelta(seconds=30), 10)
        harness.clock.advance(31)
    assert harness.run_pass().finished == 1
    assert harness.status(run.uuid) == "finished" and LOG == ["A.start"]
    assert harness.orchestrator.get(run.uuid).pipeline.crashes == 0


def test_deaths_below_the_limit_do_not_quarantine(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry, max_crashes=2, lease_seconds=30)
    run = harness.create(pipeline_of(compensable("A")))
    store = Store(backend)
    die_in_a_hook(store, harness, run.uuid)  # one death
    assert harness.run_pass().finished == 1
    assert harness.status(run.uuid) == "finished" and LOG == ["A.start"]
    assert harness.orchestrator.get(run.uuid).pipeline.crashes == 0  # the hook then ended: reset


def test_a_clean_release_resets_the_crash_count(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry, max_crashes=1, lease_seconds=30)

    class Waits(OnContinueMixin, Step):
        name = "Waits"

        def on_continue(self) -> None:
            LOG.append("continue")
            self.wait(seconds=10)

    register_step(Waits)
    run = harness.create(pipeline_of(Waits))
    for _ in range(5):
        harness.run_pass()
        assert harness.orchestrator.get(run.uuid).pipeline.claims == 0
        harness.clock.advance(10)
    assert harness.status(run.uuid) == "pending" and len(LOG) == 5


# --- cancel while held -------------------------------------------------------------------------


def test_cancel_while_another_worker_holds_the_pipeline(registry: Registry) -> None:
    backend = MemoryBackend()
    holder = Harness(backend, registry=registry)
    admin = Orchestrator(backend, clock=holder.clock, registry=registry)

    class Long(OnStartMixin, OnContinueMixin, Step):
        name = "Long"

        def on_start(self) -> None:
            LOG.append("start")
            # the operator cancels while this hook runs in the holder's pass
            state = admin.cancel(self.pipeline_uuid)
            LOG.append(f"requested:{state.pipeline.cancel_requested}:{state.pipeline.status.value}")

        def on_continue(self) -> None:
            LOG.append("continue")

        def on_cancel(self) -> None:
            LOG.append("on_cancel")

    register_step(Long)
    run = holder.create(pipeline_of(Long, compensable("B")))
    holder.run_pass()
    assert LOG == ["start", "requested:True:pending", "on_cancel"]
    state = holder.orchestrator.get(run.uuid)
    assert state.pipeline.status == Status.CANCELLED and not state.pipeline.cancel_requested
    assert state.pipeline.lease_owner is None
    types = holder.event_types(run.uuid)
    assert "pipeline.cancel_requested" in types and types.count("step.cancelled") == 1
    # the holder's transition is kept (outside writes never cost it), then the cancel is applied
    assert types.index("step.started") < types.index("step.cancelled")
    assert "continue" not in LOG


def test_cancel_a_seed_style_created_pipeline(registry: Registry) -> None:
    backend = MemoryBackend()
    p = pipeline_of(compensable("A"))
    created = p(repository_class=backend)
    state = Orchestrator(backend, registry=registry).cancel(created.uuid)
    assert state.pipeline.status == Status.CANCELLED and LOG == []


# --- leases -------------------------------------------------------------------------------------


def test_a_worker_that_lost_its_lease_cannot_record_a_finish(registry: Registry) -> None:
    backend = MemoryBackend()
    harness = Harness(backend, registry=registry, lease_seconds=30)
    thief = Store(backend)

    class Slow(OnStartMixin, Step):
        name = "Slow"

        def on_start(self) -> None:
            LOG.append("start")
            if len(LOG) == 1:  # the first time, the lease expires during this hook and is taken
                later = harness.clock.advance(31)
                thief.claim_due(later, "thief", later + timedelta(seconds=30), 10)

    register_step(Slow)
    run = harness.create(pipeline_of(Slow))
    summary = harness.run_pass()
    assert "ConcurrentUpdateError" in summary.errors[run.uuid]
    state = harness.orchestrator.get(run.uuid)
    assert state.steps[0].status == Status.CREATED  # our finish was refused
    assert state.pipeline.lease_owner == "thief"
    assert "step.finished" not in harness.event_types(run.uuid)
    # the thief died too; after its lease, a worker finishes the step: one finish in all
    harness.clock.advance(31)
    assert harness.run_until_done(run.uuid) == "finished"
    assert harness.event_types(run.uuid).count("step.finished") == 1
    assert LOG == ["start", "start"]  # at least once: the refused run, then the recorded one


def test_configured_step_overrides_replace_class_attributes(registry: Registry) -> None:
    from prorch.config import StepOverride

    class Flaky(OnStartMixin, OnContinueMixin, Step):
        name = "Flaky"
        max_attempts = 1

        def on_start(self) -> None:
            LOG.append("start")
            if len(LOG) < 3:
                raise ConnectionError("later")

        def on_continue(self) -> None:
            self.wait(seconds=3600)

    register_step(Flaky)
    overrides = {"Flaky": StepOverride(max_attempts=3, timeout=60)}
    harness = Harness(registry=registry, step_overrides=overrides)
    run = harness.create(pipeline_of(Flaky))
    harness.drive(run.uuid)
    harness.clock.set(harness.orchestrator.get(run.uuid).pipeline.next_run_at)  # backoff 1
    harness.run_pass()
    harness.clock.set(harness.orchestrator.get(run.uuid).pipeline.next_run_at)  # backoff 2
    harness.run_pass()
    assert LOG == ["start", "start", "start"]  # retried: max_attempts 3 from configuration
    started = harness.clock.now()
    assert harness.orchestrator.get(run.uuid).pipeline.next_run_at == started + timedelta(seconds=60)
    harness.clock.advance(60)
    harness.run_pass()
    error = harness.orchestrator.get(run.uuid).steps[0].error
    assert error is not None and "within 60s" in error.message  # timeout 60 from configuration
