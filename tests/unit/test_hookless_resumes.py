"""A resume after a stored write that marks no hook runs no hook before its next write: a
worker's slots run such a resume without a hook slot (``Slots._ending``), so a hook there would
run beside ``concurrency`` others. Each path of the runner, driven as a worker drives it (its
writes stored one by one, refused, or lost), on a real SQLite file."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator
from prorch.engine import passes
from prorch.engine.rounds import _Ended, _marks_a_hook, _resume
from prorch.engine.state import Writing
from prorch.model.exceptions import ConcurrentUpdateError, StoreUnreachableError
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL
from prorch.storage import outside
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Write
from tests.support.builders import pipeline_of, step_of

Refuse = Callable[[int, Write], Exception | None]
"""Before the ``n``-th write of an advance is stored: an error to tell it instead of storing it
(None: stored; a refusal it provokes, such as an outside write, is told as the store's)."""


class Hooks:
    """Counts hook calls, wrapping the orchestrator's hook caller."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.calls = 0
        self.checked = 0  # resumes after a write that marked no hook
        caller = orchestrator.hooks
        call = caller.call

        def counted(func: Callable[[], object], bound: float | None, what: str) -> None:
            self.calls += 1
            call(func, bound, what)

        caller.call = counted  # type: ignore[method-assign]


def drive(orchestrator: Orchestrator, hooks: Hooks, writing: Writing[Any], *, marked: bool, refuse: Refuse) -> None:
    """Drive one advance as a worker's slots do, asserting that a resume after a write that
    marked no hook (or after none, unless the claim marked one) calls no hook."""
    resumed: Exception | None = None
    marks, index = marked, 0
    while True:
        before = hooks.calls
        step = _resume(writing, resumed)
        assert marks or hooks.calls == before, f"a hook ran after write {index}, which marked none"
        hooks.checked += not marks
        if isinstance(step, _Ended):
            return
        marks, index = _marks_a_hook(step), index + 1
        resumed = refuse(index, step)
        if resumed is None:
            try:
                orchestrator.store.commit_write(step)
            except Exception as exc:
                resumed = exc


def run_to_end(orchestrator: Orchestrator, uuid: str, *, mark: bool, refuse: Refuse, rounds: int = 8) -> str:
    """Claim and advance until the pipeline ended (or ``rounds`` claims), every write checked;
    its status then."""
    hooks, keeper = Hooks(orchestrator), LeaseKeeper(orchestrator.store, 60.0, orchestrator.clock)
    for _ in range(rounds):
        record = orchestrator.store.get_pipeline(uuid)
        assert record is not None
        if record.status in TERMINAL:
            assert hooks.calls and hooks.checked, "no hook ran, or no resume followed an unmarked write"
            return record.status.value
        since = time.monotonic()
        claimed, _ = passes.claim(orchestrator, 10, mark=mark)
        keeper.hold(claimed, since)
        marked = passes.marked_by(claimed, orchestrator.claimed_at) if mark else frozenset()
        for pipeline, writing in zip(claimed, passes.advancings(orchestrator, claimed, keeper, marked), strict=True):
            drive(orchestrator, hooks, writing, marked=pipeline.uuid in marked, refuse=refuse)
        keeper.give_back()  # the leases of advances a lost write ended, as a worker's next claim does
        record = orchestrator.store.get_pipeline(uuid)
        assert record is not None
        if record.lease_owner is None and record.next_run_at is not None:  # due again: at once, for the test
            record.next_run_at = orchestrator.clock.now() - timedelta(seconds=1)
            orchestrator.store.commit([record], snapshots=orchestrator.store.tracking([record]))
    raise AssertionError(f"pipeline {uuid} did not end within {rounds} claims")


def stores(index: int, write: Write) -> Exception | None:
    return None


def fails(hook: str) -> Callable[[Any], None]:
    def raising(step: Any) -> None:
        raise RuntimeError(f"{hook} fails")

    return raising


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hookless.db'}"


@pytest.mark.parametrize("mark", [False, True])
def test_retries_and_rollbacks_run_no_hook_after_an_unmarked_write(url: str, registry: Registry, mark: bool) -> None:
    first = step_of("First", lambda self: self.finish({}), on_rollback=lambda self: None)
    flaky = step_of("Flaky", fails("on_start"), max_attempts=2, retry_delay=0.0)
    uuid = pipeline_of(first, flaky).create(url).uuid
    orchestrator = Orchestrator(url)
    assert run_to_end(orchestrator, uuid, mark=mark, refuse=stores) == "failed"


@pytest.mark.parametrize("mark", [False, True])
def test_a_cancel_request_merged_into_a_refused_write_runs_on_cancel_after_a_marked_one(
    url: str, registry: Registry, mark: bool
) -> None:
    first = step_of("First", lambda self: self.finish({}))
    second = step_of("Second", lambda self: self.finish({}), on_cancel=lambda self: None)
    uuid = pipeline_of(first, second).create(url).uuid
    orchestrator = Orchestrator(url)

    def cancel_before_the_first_hooks_write(index: int, write: Write) -> Exception | None:
        if index == (1 if mark else 2):  # the write after First's hook: refused, the request merged
            outside.request_cancel(orchestrator.store, orchestrator.clock, uuid)
        return None

    assert run_to_end(orchestrator, uuid, mark=mark, refuse=cancel_before_the_first_hooks_write) == "cancelled"


@pytest.mark.parametrize("error", ["unreachable", "unconfirmed"])
def test_a_write_lost_to_the_store_runs_no_hook_after_it(url: str, registry: Registry, error: str) -> None:
    """An outage (the write not stored), or a write stored with its answer lost (refused, yet the
    pipeline is ours and unchanged): the advance ends, no hook runs."""
    steps = [step_of(name, lambda self: self.finish({})) for name in ("A", "B", "C")]
    uuid = pipeline_of(*steps).create(url).uuid
    orchestrator = Orchestrator(url)

    seen = [0]

    def lose(index: int, write: Write) -> Exception | None:
        seen[0] += 1
        if seen[0] not in (2, 4, 7):  # a few writes of several advances, the others stored
            return None
        if error == "unreachable":
            return StoreUnreachableError("the store went away")
        orchestrator.store.commit_write(write)
        return ConcurrentUpdateError("the commit's answer was lost", uuid=uuid)

    assert run_to_end(orchestrator, uuid, mark=False, refuse=lose, rounds=20) == "finished"


def test_a_crash_suspect_marks_its_hook_again_before_it_runs(url: str, registry: Registry) -> None:
    """A hook mark left by a dead worker: the crash is charged in a write that marks nothing,
    then the next hook is marked before it runs."""
    uuid = pipeline_of(step_of("A", lambda self: self.finish({}))).create(url).uuid
    orchestrator = Orchestrator(url)
    record = orchestrator.store.get_pipeline(uuid)
    assert record is not None
    record.hook_started_at = orchestrator.clock.now() - timedelta(minutes=5)  # a dead worker's mark
    orchestrator.store.commit([record], snapshots=orchestrator.store.tracking([record]))
    assert run_to_end(orchestrator, uuid, mark=False, refuse=stores) == "finished"
