"""One hook call (prorch/engine/step_hooks.py): its time bound, what it raises, and on_cancel,
whose error is kept without undoing the cancel."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from prorch import FakeClock
from prorch.engine import transitions
from prorch.engine.bounded_calls import HookCaller
from prorch.engine.journal import Journal
from prorch.engine.policy import Policies, StepOverride
from prorch.engine.rounds import write_each
from prorch.engine.state import Run
from prorch.engine.step_hooks import HookInvoker
from prorch.model.exceptions import HookTimeoutError
from prorch.model.registry import Registry
from prorch.storage.creation import build_records, store_new
from prorch.storage.store import Store
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of, step_of

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


def invoker_and_run(registry: Registry, policies: Policies, **step_attrs: object) -> tuple[HookInvoker, Run]:
    clock = FakeClock(NOW)
    journal = Journal(Store(MemoryBackend()), registry, clock, policies, lease_seconds=30)
    step = step_of("S", on_start=lambda self: None, on_continue=lambda self: None, **step_attrs)
    (record,) = store_new(journal.store, [build_records(pipeline_of(step), {}, now=NOW)], NOW, registry)
    invoker = HookInvoker(journal, HookCaller(), clock, policies, hook_timeout=7.0)
    return invoker, journal.load(record)


def test_a_step_without_timeout_gets_the_default_bound(registry: Registry) -> None:
    invoker, run = invoker_and_run(registry, Policies())
    assert invoker.bound(run, run.steps[0], NOW, own_hook=True) == 7.0


def test_own_hooks_are_bound_by_what_is_left_before_the_deadline(registry: Registry) -> None:
    invoker, run = invoker_and_run(registry, Policies(), timeout=60)
    (step,) = run.steps
    transitions.start_step(run, step, NOW - timedelta(seconds=45))
    assert invoker.bound(run, step, NOW, own_hook=True) == 15.0
    assert invoker.bound(run, step, NOW, own_hook=False) == 60  # on_rollback, on_cancel: the whole timeout


def test_the_configured_override_sets_the_bound(registry: Registry) -> None:
    invoker, run = invoker_and_run(registry, Policies({"S": StepOverride(timeout=3)}), timeout=60)
    assert invoker.bound(run, run.steps[0], NOW, own_hook=False) == 3


def test_a_hook_that_overruns_raises_hook_timeout_and_is_no_crash(registry: Registry) -> None:
    invoker, run = invoker_and_run(registry, Policies({"S": StepOverride(timeout=0.2)}))
    run.pipeline.crashes = 2
    with pytest.raises(HookTimeoutError):
        invoker.call(run, run.steps[0], NOW, lambda: time.sleep(2), "on_continue")
    assert run.pipeline.crashes == 0  # it returned control: the worker did not die in it
    invoker.hooks.close()


def test_call_guarded_returns_what_the_hook_raised(registry: Registry) -> None:
    invoker, run = invoker_and_run(registry, Policies())
    (step,) = run.steps

    class Failing:
        def on_rollback(self) -> None:
            raise ValueError("cannot undo")

    error = write_each(invoker.journal.store, invoker.call_guarded(run, step, NOW, "on_rollback", Failing()))  # type: ignore[arg-type]
    assert error is not None and (error.type, error.message, error.hook) == ("ValueError", "cannot undo", "on_rollback")
    assert run.pipeline.hook_started_at is not None  # marked running first, in the store


def test_on_cancel_errors_are_kept_on_the_step(registry: Registry) -> None:
    def on_cancel(self: object) -> None:
        raise RuntimeError("cleanup failed")

    invoker, run = invoker_and_run(registry, Policies(), on_cancel=on_cancel)
    (step,) = run.steps
    write_each(invoker.journal.store, invoker.call_on_cancel(run, step, NOW))
    assert step.error is not None and step.error.message == "cleanup failed" and step.error.hook == "on_cancel"


def test_recent_slowest_is_the_slowest_of_the_last_calls() -> None:
    """Read several times a turn of a worker's loop, it is kept as each call ends: infinite
    before any call, then the slowest of the last ``RECENT_CALLS``, forgetting older ones."""
    from prorch.engine.bounded_calls import RECENT_CALLS

    hooks = HookCaller()
    assert hooks.recent_slowest == float("inf")
    hooks.call(lambda: time.sleep(0.05), None, "slow")
    assert 0.05 <= hooks.recent_slowest < 1
    for _ in range(RECENT_CALLS):
        hooks.call(lambda: None, None, "instant")
    assert hooks.recent_slowest < 0.01  # the slow call is out of the window
