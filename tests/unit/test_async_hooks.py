"""``async def`` hooks: awaited on the worker's own event loop, concurrently up to ``concurrency``,
cancelled when they overrun, mixed freely with sync hooks (the edges issue, item 2)."""

from __future__ import annotations

import asyncio
import functools
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from prorch import (
    OnContinueMixin,
    OnStartMixin,
    Orchestrator,
    Status,
    Step,
    on_event,
    register_step,
)
from prorch.engine.bounded_calls import HookCaller
from prorch.model.registry import Registry
from prorch.testing import Harness
from tests.support.builders import pipeline_of

CALLS: list[Any] = []


@pytest.fixture(autouse=True)
def _clear() -> Iterator[None]:
    CALLS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited" fails the test
        yield


class Gauge:
    """How many hooks run at once, at most, counted from inside the hooks."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


def test_async_on_start_and_on_continue_are_awaited(harness: Harness, registry: Registry) -> None:
    """Regression: an async on_start was never awaited; its body never ran and the step finished."""

    @register_step
    class Fetch(OnStartMixin, OnContinueMixin, Step):
        name = "Fetch"

        async def on_start(self) -> None:
            await asyncio.sleep(0.01)
            self.metadata["job"] = "j-1"

        async def on_continue(self) -> None:
            await asyncio.sleep(0.01)
            if self.metadata.get("polls", 0) < 2:
                self.metadata["polls"] = self.metadata.get("polls", 0) + 1
                self.wait(seconds=30)
                return
            self.finish({"job": self.metadata["job"], "polls": self.metadata["polls"]})

    @register_step
    class OnlyStart(OnStartMixin, Step):
        name = "OnlyStart"

        async def on_start(self) -> None:
            await asyncio.sleep(0)
            CALLS.append(("only-start", self.outputs["Fetch"]))

    P = pipeline_of(Fetch, OnlyStart)
    run = harness.create(P)
    assert harness.drive(run.uuid) == "pending"  # waiting: the async on_continue called wait()
    state = harness.orchestrator.get(run.uuid)
    assert state.steps[0].metadata == {"job": "j-1", "polls": 1}
    assert harness.run_until_done(run.uuid) == "finished"
    state = harness.orchestrator.get(run.uuid)
    assert state.steps[0].output == {"job": "j-1", "polls": 2}
    assert CALLS == [("only-start", {"job": "j-1", "polls": 2})]


def test_an_async_step_without_on_continue_finishes_only_after_its_body_ran(
    harness: Harness, registry: Registry
) -> None:
    @register_step
    class Slow(OnStartMixin, Step):
        name = "Slow"

        async def on_start(self) -> None:
            await asyncio.sleep(0.02)
            self.fail("the body ran and said no")

    run = harness.create(pipeline_of(Slow))
    assert harness.run_until_done(run.uuid) == "failed"
    step = harness.orchestrator.get(run.uuid).steps[0]
    assert step.error is not None and step.error.message == "the body ran and said no"


def test_async_rollback_cancel_and_timeout_hooks_run(registry: Registry) -> None:
    @register_step
    class Done(OnStartMixin, Step):
        name = "Done"

        async def on_start(self) -> None:
            self.finish({"made": 1})

        async def on_rollback(self) -> None:
            await asyncio.sleep(0)
            CALLS.append(("rollback", self.outputs["Done"]))

    @register_step
    class Breaks(OnStartMixin, Step):
        name = "Breaks"

        async def on_start(self) -> None:
            raise RuntimeError("boom")

    @register_step
    class Hangs(OnStartMixin, OnContinueMixin, Step):
        name = "Hangs"
        timeout = 0.3

        async def on_start(self) -> None:
            await asyncio.sleep(30)

        async def on_continue(self) -> None:
            self.wait(seconds=60)

        async def on_timeout(self) -> None:
            await asyncio.sleep(0)
            CALLS.append("timeout")

    @register_step
    class Waits(OnStartMixin, OnContinueMixin, Step):
        name = "Waits"

        async def on_start(self) -> None:
            self.wait(seconds=60)

        async def on_continue(self) -> None:
            self.wait(seconds=60)

        async def on_cancel(self) -> None:
            await asyncio.sleep(0)
            CALLS.append("cancel")

    harness = Harness(registry=registry)
    failing = harness.create(pipeline_of(Done, Breaks, name="Failing"))
    assert harness.run_until_done(failing.uuid) == "failed"
    timing_out = harness.create(pipeline_of(Hangs, name="TimingOut"))
    assert harness.run_until_done(timing_out.uuid) == "failed"
    waiting = harness.create(pipeline_of(Waits, name="Waiting"))
    harness.run_pass()
    harness.orchestrator.cancel(waiting.uuid)
    assert harness.status(waiting.uuid) == "cancelled"
    assert CALLS == [("rollback", {"made": 1}), "timeout", "cancel"]
    hangs = harness.orchestrator.get(timing_out.uuid).steps[0]
    assert hangs.error is not None and hangs.error.type == "HookTimeoutError"
    assert "it was cancelled" in hangs.error.message


def test_an_overrunning_async_hook_is_cancelled_not_abandoned(registry: Registry) -> None:
    seen: list[str] = []

    @register_step
    class Hangs(OnStartMixin, Step):
        name = "Hangs"

        async def on_start(self) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

    harness = Harness(registry=registry, hook_timeout=0.2)
    run = harness.create(pipeline_of(Hangs))
    summary = harness.run_pass()
    assert seen == ["cancelled"]
    assert summary.abandoned_hooks == 0
    assert harness.status(run.uuid) == "failed"


def test_an_async_hook_that_ignores_cancellation_is_counted_abandoned(registry: Registry) -> None:
    release = threading.Event()

    @register_step
    class Stubborn(OnStartMixin, Step):
        name = "Stubborn"

        async def on_start(self) -> None:
            while not release.is_set():
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    continue

    harness = Harness(registry=registry, hook_timeout=0.2)
    run = harness.create(pipeline_of(Stubborn))
    try:
        summary = harness.run_pass()
        assert summary.abandoned_hooks == 1
        step = harness.orchestrator.get(run.uuid).steps[0]
        assert step.error is not None and "ignored its cancellation" in step.error.message
    finally:
        release.set()
    for _ in range(100):
        if harness.orchestrator.hooks.abandoned == 0:
            break
        threading.Event().wait(0.05)
    assert harness.orchestrator.hooks.abandoned == 0  # it ended: no longer counted


def test_an_async_hook_that_raises_is_retried_per_max_attempts(harness: Harness, registry: Registry) -> None:
    @register_step
    class Flaky(OnStartMixin, Step):
        name = "Flaky"
        max_attempts = 3

        async def on_start(self) -> None:
            CALLS.append("try")
            if len(CALLS) < 3:
                raise ConnectionError("not yet")
            self.finish({"tries": len(CALLS)})

    run = harness.create(pipeline_of(Flaky))
    assert harness.run_until_done(run.uuid) == "finished"
    assert harness.orchestrator.get(run.uuid).steps[0].output == {"tries": 3}


def test_system_exit_in_an_async_hook_fails_the_step_and_the_loop_lives_on(
    harness: Harness, registry: Registry
) -> None:
    @register_step
    class Exits(OnStartMixin, Step):
        name = "Exits"

        async def on_start(self) -> None:
            raise SystemExit(3)

    @register_step
    class Fine(OnStartMixin, Step):
        name = "Fine"

        async def on_start(self) -> None:
            await asyncio.sleep(0)

    exits = harness.create(pipeline_of(Exits, name="Exiting"))
    assert harness.run_until_done(exits.uuid) == "failed"
    fine = harness.create(pipeline_of(Fine, name="Fine"))
    assert harness.run_until_done(fine.uuid) == "finished"


def test_async_hooks_of_different_pipelines_run_concurrently_up_to_concurrency(registry: Registry) -> None:
    gauge = Gauge()
    loops: set[int] = set()
    threads: set[str] = set()

    @register_step
    class Sleeps(OnStartMixin, Step):
        name = "Sleeps"

        async def on_start(self) -> None:
            loops.add(id(asyncio.get_running_loop()))
            threads.add(threading.current_thread().name)
            gauge.enter()
            try:
                await asyncio.sleep(0.3)
            finally:
                gauge.leave()

    harness = Harness(registry=registry, concurrency=4, batch_size=10)
    P = pipeline_of(Sleeps)
    runs = [harness.create(P) for _ in range(10)]
    harness.run_pass()
    assert [harness.status(r.uuid) for r in runs] == ["finished"] * 10
    assert gauge.peak == 4  # four at once: not one after the other, never more than concurrency
    assert len(loops) == 1  # one event loop for the worker
    assert threads == {"prorch-event-loop"}  # on the loop's thread, not the pass's threads


def test_sync_and_async_hooks_share_the_concurrency_bound(registry: Registry) -> None:
    gauge = Gauge()

    @register_step
    class AsyncSleeps(OnStartMixin, Step):
        name = "AsyncSleeps"

        async def on_start(self) -> None:
            gauge.enter()
            try:
                await asyncio.sleep(0.3)
            finally:
                gauge.leave()

    @register_step
    class SyncSleeps(OnStartMixin, Step):
        name = "SyncSleeps"

        def on_start(self) -> None:
            CALLS.append(threading.current_thread().name)
            gauge.enter()
            try:
                threading.Event().wait(0.3)
            finally:
                gauge.leave()

    harness = Harness(registry=registry, concurrency=3, batch_size=20)
    runs = [harness.create(pipeline_of(AsyncSleeps, name="A")) for _ in range(5)]
    runs += [harness.create(pipeline_of(SyncSleeps, name="S")) for _ in range(5)]
    harness.run_pass()
    assert {harness.status(r.uuid) for r in runs} == {"finished"}
    assert gauge.peak == 3
    assert all(name.startswith("prorch") and name != "prorch-event-loop" for name in CALLS)  # pool threads


def test_the_worker_keeps_one_loop_across_passes_and_close_stops_it(registry: Registry) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    @register_step
    class Polls(OnStartMixin, OnContinueMixin, Step):
        name = "Polls"

        async def on_start(self) -> None:
            loops.append(asyncio.get_running_loop())

        async def on_continue(self) -> None:
            loops.append(asyncio.get_running_loop())
            if len(loops) < 4:
                self.wait(seconds=1)
            else:
                self.finish()

    harness = Harness(registry=registry)
    run = harness.create(pipeline_of(Polls))
    assert harness.run_until_done(run.uuid) == "finished"
    assert len(loops) == 4 and len({id(loop) for loop in loops}) == 1
    harness.orchestrator.close()
    assert loops[0].is_closed()
    again = harness.create(pipeline_of(Polls, name="Again"))
    loops.clear()
    assert harness.run_until_done(again.uuid) == "finished"  # a new loop after close
    assert not loops[0].is_closed()


def test_an_async_hook_can_receive_messages(harness: Harness, registry: Registry) -> None:
    @register_step
    class Approval(OnStartMixin, OnContinueMixin, Step):
        name = "Approval"

        async def on_start(self) -> None:
            self.wait(seconds=3600)

        async def on_continue(self) -> None:
            decision = self.receive("decision")
            if decision is None:
                self.wait(seconds=3600)
            else:
                self.finish({"decision": decision})

    run = harness.create(pipeline_of(Approval))
    harness.run_pass()
    harness.orchestrator.send(run.uuid, "decision", "yes")
    harness.run_pass()
    assert harness.orchestrator.get(run.uuid).steps[0].output == {"decision": "yes"}


def test_an_async_reaction_is_awaited(harness: Harness, registry: Registry) -> None:
    @register_step
    class One(OnStartMixin, Step):
        name = "One"

        def on_start(self) -> None:
            pass

    @register_step
    class Two(OnStartMixin, Step):
        name = "Two"

        async def on_start(self) -> None:
            CALLS.append("two")

    first = pipeline_of(One, name="First")
    second = pipeline_of(Two, name="Second")

    @on_event("pipeline.finished", pipeline="First")
    async def chain(event: Any, ctx: Any) -> None:
        await asyncio.sleep(0)
        ctx.start(second)

    run = harness.create(first)
    for _ in range(5):
        harness.run_pass()
    assert harness.status(run.uuid) == "finished"
    assert CALLS == ["two"]


def test_the_seed_start_runs_async_hooks_in_the_callers_process(registry: Registry) -> None:
    from repositories.memory import MemoryBackend

    @register_step
    class Quick(OnStartMixin, Step):
        name = "Quick"

        async def on_start(self) -> None:
            await asyncio.sleep(0)
            self.finish({"in": "start"})

    P = pipeline_of(Quick)
    backend = MemoryBackend()
    pipeline = P.create(backend)
    pipeline.start()
    assert pipeline.status == "finished"
    state = Orchestrator(backend, registry=registry).get(pipeline.uuid)
    assert state.steps[0].status == Status.FINISHED and state.steps[0].output == {"in": "start"}


def test_a_hook_called_from_inside_a_running_event_loop_still_works() -> None:
    """An application calling ``start()`` from async code: the hook goes to prorch's own loop."""
    caller = HookCaller()
    seen: list[bool] = []

    async def hook() -> None:
        await asyncio.sleep(0)
        seen.append(True)

    async def app() -> None:
        caller.call(hook, None, "hook")

    asyncio.run(app())
    caller.close()
    assert seen == [True]


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_an_async_hook_behind_a_plain_decorator_is_awaited(registry: Registry, timeout: float | None) -> None:
    """A sync wrapper that returns the coroutine hides ``async def`` from inspection; the
    coroutine it returns is still awaited, bounded or not."""

    def logged(hook: Any) -> Any:
        @functools.wraps(hook)
        def wrapper(self: Step) -> Any:
            CALLS.append("wrapped")
            return hook(self)

        return wrapper

    @register_step
    class Wrapped(OnStartMixin, Step):
        name = "Wrapped"

        @logged
        async def on_start(self) -> None:
            await asyncio.sleep(0.01)
            self.finish({"ran": True})

    Wrapped.timeout = timeout
    harness = Harness(registry=registry)
    run = harness.create(pipeline_of(Wrapped))
    assert harness.run_until_done(run.uuid) == "finished"
    assert harness.orchestrator.get(run.uuid).steps[0].output == {"ran": True}
    assert CALLS == ["wrapped"]
