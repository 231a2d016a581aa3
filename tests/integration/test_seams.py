"""Seams between the features of #28-#30 and the older ones: debounce and attach with pause,
rerun and retry; per-key limits with pause and rerun; step logs of a step that waits many times.
Each test is a pair that could lose, double or strand work if the two features disagreed."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from prorch import FakeClock, KeyConflictError, KeyRunningError, Orchestrator, Status
from prorch.bulk import Filters
from prorch.model.exceptions import InvalidStateError
from prorch.model.registry import Registry
from tests.integration.conftest import make_backend
from tests.integration.key_race import BatchPipeline, mixed_modes_in_lockstep
from tests.integration.test_key_limits import Claims, Order, keyed
from tests.support.builders import pipeline_of, step_of

WINDOW = timedelta(seconds=30)
PRORCH = str(Path(sys.executable).parent / "prorch")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["memory", "sqlite", "postgresql", "tinydb", "seed"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_of(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    made = make_backend(store_kind, tmp_path, request)
    yield made
    if hasattr(made, "dispose"):
        made.dispose()


def test_a_debounced_pipeline_whose_window_passes_while_paused_runs_once_with_every_create(backend_of: Any) -> None:
    clock = FakeClock()
    orchestrator = Orchestrator(backend_of, clock=clock)
    first = BatchPipeline.create(backend_of, {"ids": [1]}, key="b", debounce=WINDOW, clock=clock)
    orchestrator.pause(name="BatchPipeline")
    clock.advance(60)  # the window passes while paused
    assert orchestrator.execute_pipelines().claimed == 0
    late = BatchPipeline.create(backend_of, {"ids": [2]}, key="b", debounce=WINDOW, clock=clock)
    assert (late.created, late.uuid) == (False, first.uuid)  # still waiting: merged, not a second one
    clock.advance(60)
    assert orchestrator.execute_pipelines().claimed == 0
    orchestrator.resume(name="BatchPipeline")
    orchestrator.execute_pipelines()
    pipelines = orchestrator.query(key="b").pipelines
    assert [(p.uuid, p.status) for p in pipelines] == [(first.uuid, Status.FINISHED)]
    assert orchestrator.get(first.uuid).steps[0].output == {"ids": [1, 2]}


FAILS_ONCE: list[str] = []


def fails_the_first_time(step: Any) -> None:
    if not FAILS_ONCE:
        FAILS_ONCE.append(step.pipeline_uuid)
        raise RuntimeError("boom")
    step.finish({})


def test_retry_of_an_ended_keyed_pipeline_is_refused_while_a_newer_one_holds_its_key(
    backend_of: Any, registry: Registry
) -> None:
    FAILS_ONCE.clear()
    keyed = pipeline_of(step_of("Sync", fails_the_first_time), name="Sync")
    clock = FakeClock()
    orchestrator = Orchestrator(backend_of, registry=registry, clock=clock)
    failed = keyed.create(backend_of, {}, key="k", if_running="error", clock=clock)
    orchestrator.execute_pipelines()
    assert orchestrator.get(failed.uuid).pipeline.status == Status.FAILED
    live = keyed.create(backend_of, {}, key="k", if_running="error", clock=clock)
    assert live.created  # the failed one does not hold its key
    with pytest.raises(InvalidStateError, match=rf"key 'k' names pipeline Sync {live.uuid}, which has not ended"):
        orchestrator.retry(failed.uuid)
    summary = orchestrator.bulk("retry", Filters(key="k", status="failed"))
    assert (summary.done, summary.failed) == (0, 1)  # the bulk action reports it, and goes on
    assert "which has not ended" in summary.errors[failed.uuid]
    assert orchestrator.get(failed.uuid).pipeline.status == Status.FAILED  # nothing changed
    orchestrator.execute_pipelines()  # the live one ends: the key is free again, the retry goes through
    assert orchestrator.retry(failed.uuid).pipeline.status == Status.PENDING
    with pytest.raises(KeyRunningError):
        keyed.create(backend_of, {}, key="k", if_running="error", clock=clock)  # the retried one holds it


def test_a_default_create_finds_the_live_pipeline_an_attach_create_started(backend_of: Any, registry: Registry) -> None:
    keyed = pipeline_of(step_of("Sync", fails_the_first_time), name="Sync")
    clock = FakeClock()
    orchestrator = Orchestrator(backend_of, registry=registry, clock=clock)
    attached = keyed.create(backend_of, {}, key="k", if_running="attach", clock=clock)
    same = keyed.create(backend_of, {}, key="k", clock=clock)  # the default mode, if_running="same"
    assert (same.created, same.uuid) == (False, attached.uuid)
    with pytest.raises(KeyConflictError, match="key 'k'"):
        keyed.create(backend_of, {"other": 1}, key="k", clock=clock)
    assert [p.uuid for p in orchestrator.list_pipelines()] == [attached.uuid]


def test_a_debounced_update_adds_the_later_creates_search_attributes(backend_of: Any) -> None:
    clock = FakeClock()
    orchestrator = Orchestrator(backend_of, clock=clock)
    first = BatchPipeline.create(
        backend_of, {"ids": [1]}, key="b", debounce=WINDOW, clock=clock, attributes={"customer": "acme", "n": "1"}
    )
    clock.advance(5)
    later = BatchPipeline.create(
        backend_of, {"ids": [2]}, key="b", debounce=WINDOW, clock=clock, attributes={"customer": "globex", "n": "2"}
    )
    assert (later.created, later.uuid) == (False, first.uuid)
    found = orchestrator.query(attributes={"customer": "globex"}).pipelines  # the index follows the update
    assert [p.uuid for p in found] == [first.uuid]
    assert orchestrator.query(attributes={"n": "1"}).pipelines == []  # the later value replaced it
    assert orchestrator.get(first.uuid).pipeline.attributes == {"customer": "globex", "n": "2"}
    clock.advance(60)
    orchestrator.execute_pipelines()
    assert orchestrator.get(first.uuid).pipeline.status == Status.FINISHED


def waits_and_logs(step: Any) -> None:
    step.log.info("look %d", step.metadata.get("looks", 0))
    step.metadata["looks"] = step.metadata.get("looks", 0) + 1
    if step.metadata["looks"] >= step.params["waits"]:
        step.finish({})
    else:
        step.wait(0)  # due again at the next pass


@pytest.mark.parametrize(("kind", "waits"), [("memory", 1000), ("sqlite", 25)])
def test_the_logs_of_a_step_that_waits_many_times_stay_bounded(
    kind: str, waits: int, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Poll", waits_and_logs, waits_and_logs), name="Poll")
    uuid = job.create(backend, {"waits": waits}).uuid
    orchestrator = Orchestrator(backend, registry=registry, step_log_lines=10)
    sizes = []
    while orchestrator.get(uuid).pipeline.status != Status.FINISHED:
        orchestrator.execute_pipelines()
        sizes.append(len(json.dumps(orchestrator.get(uuid).steps[0].logs)))
    (step,) = orchestrator.get(uuid).steps
    assert [(entry["attempt"], len(entry["lines"]), entry["dropped"]) for entry in step.logs] == [(1, 10, waits - 10)]
    assert len(sizes) == waits and max(sizes) <= sizes[10] + 5  # from the cap on: a digit of the count more at most


class Customer(BaseModel):
    customer: str


def test_a_debounced_update_recomputes_the_stored_concurrency_key(backend_of: Any, registry: Registry) -> None:
    """The default merge keeps the later params: a pipeline that now works for customer "y"
    must count as "y"'s in the per-key limit, not as "x"'s (then two of "y" could run at once)."""
    keyed = pipeline_of(
        step_of("Reindex", finishes), name="Reindex", Params=Customer, concurrency_key="customer", max_running_per_key=1
    )
    clock = FakeClock()
    first = keyed.create(backend_of, {"customer": "x"}, key="d", debounce=WINDOW, clock=clock)
    later = keyed.create(backend_of, {"customer": "y"}, key="d", debounce=WINDOW, clock=clock)
    assert later.uuid == first.uuid
    orchestrator = Orchestrator(backend_of, registry=registry, clock=clock)
    stored = orchestrator.get(first.uuid).pipeline
    assert (stored.params, stored.concurrency_key) == ({"customer": "y"}, '"y"')


def finishes(step: Any) -> None:
    step.finish({})


def test_a_paused_pipeline_neither_counts_nor_blocks_its_key_and_a_fair_claim_skips_a_paused_tenant(
    backend_of: Any, store_kind: str, registry: Registry
) -> None:
    by_key = keyed(registry, max_running_per_key=1)
    held = by_key.create(backend_of, {"customer_id": "c1"}).uuid  # due first, then paused
    next_in_line = by_key.create(backend_of, {"customer_id": "c1"}).uuid
    other = by_key.create(backend_of, {"customer_id": "c2"}).uuid
    claims = Claims(backend_of, registry, by_key)
    claims.orchestrator.pause(uuid=held)
    assert sorted(p.uuid for p in claims(4)) == sorted([next_in_line, other])
    fair = pipeline_of(step_of("Turn", None, lambda self: None), name="Fair", fair=True)
    for _ in range(40):
        fair.create(backend_of, {}, tenant="big")
    small = [fair.create(backend_of, {}, tenant="small").uuid for _ in range(3)]
    claims = Claims(backend_of, registry, fair)
    claims.orchestrator.pause(tenant="big")
    claims.orchestrator.pause(name="Keyed")  # the four-method fallback leased none of those
    assert sorted(p.uuid for p in claims(4)) == sorted(small)  # no turn is spent on the paused tenant
    if store_kind == "seed":
        return  # the four-method fallback's claim leases nothing (one process): the next one sees them again
    claims.orchestrator.resume(tenant="big")
    assert {p.context["tenant"] for p in claims(4)} == {"big"}


def test_a_rerun_with_edited_params_is_keyed_by_them_keeps_the_attributes_and_holds_no_creation_key(
    backend_of: Any, registry: Registry
) -> None:
    by_key = pipeline_of(
        step_of("Work", finishes), name="Keyed", Params=Order, concurrency_key="customer_id", max_running_per_key=1
    )
    clock = FakeClock()
    orchestrator = Orchestrator(backend_of, registry=registry, clock=clock)
    original = by_key.create(
        backend_of, {"customer_id": "c1"}, key="sync-c1", if_running="error", clock=clock, attributes={"team": "a"}
    )
    orchestrator.execute_pipelines()
    assert orchestrator.get(original.uuid).pipeline.status == Status.FINISHED
    rerun = orchestrator.rerun(original.uuid, "Work", params={"customer_id": "c2"}).pipeline
    assert (rerun.concurrency_key, rerun.attributes, rerun.key) == ('"c2"', {"team": "a"}, None)
    found = orchestrator.query(attributes={"team": "a"}).pipelines
    assert sorted(p.uuid for p in found) == sorted([rerun.uuid, original.uuid])
    fresh = by_key.create(backend_of, {"customer_id": "c1"}, key="sync-c1", if_running="error", clock=clock)
    assert fresh.created  # the rerun does not hold the creation key
    claimed = orchestrator.store.claim_due(clock.now(), "w", clock.now() + timedelta(seconds=60), 4, {})
    assert sorted(p.uuid for p in claimed) == sorted([rerun.uuid, fresh.uuid])  # c2 and c1: one each


@pytest.mark.parametrize("mode", ["attach", "error"])
def test_a_keyed_create_does_not_attach_to_a_pipeline_whose_cancel_is_requested(
    backend_of: Any, store_kind: str, registry: Registry, mode: str
) -> None:
    """A cancel asked while a worker holds the pipeline is a stored request: the pipeline will
    end cancelled. A create that attached to it would see its work cancelled with it."""
    if store_kind == "seed":
        pytest.skip("the four-method fallback leases nothing (one process): its cancel is never a stored request")
    keyed = pipeline_of(step_of("Sync", finishes), name="Sync")
    clock = FakeClock()
    orchestrator = Orchestrator(backend_of, registry=registry, clock=clock)
    doomed = keyed.create(backend_of, {}, key="k", if_running=mode, clock=clock)
    held = orchestrator.store.claim_one(doomed.uuid, clock.now(), "another-worker", clock.now() + timedelta(seconds=60))
    assert held is not None
    orchestrator.cancel(doomed.uuid)  # another worker holds it: a request is stored
    assert orchestrator.get(doomed.uuid).pipeline.cancel_requested
    again = keyed.create(backend_of, {}, key="k", if_running=mode, clock=clock)
    assert again.created and again.uuid != doomed.uuid
    clock.advance(120)  # the holder's lease expires; the next pass honours the cancel and runs the new one
    orchestrator.execute_pipelines()
    assert orchestrator.get(doomed.uuid).pipeline.status == Status.CANCELLED
    assert orchestrator.get(again.uuid).pipeline.status == Status.FINISHED


@pytest.mark.slow
def test_a_worker_process_runs_a_debounced_pipeline_once_after_its_pause_with_every_create(
    tmp_path: Path, processes: list[subprocess.Popen[Any]]
) -> None:
    """A real worker polling every 0.05 s while the class is paused and the window passes: it
    claims nothing, a later create still merges into the waiting pipeline, and after the resume
    the worker runs that one pipeline once, with both creates' ids."""
    url = f"sqlite:///{tmp_path / 'seams.db'}"
    operator = Orchestrator(url)
    operator.store.get_pipeline("none")  # the schema, before the worker races to make it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [PRORCH, "-r", url, "--app", "tests.integration.key_race", "worker", "--interval", "0.05"]
    with (tmp_path / "worker.log").open("w") as log:
        processes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log))
    deadline = time.monotonic() + 60
    while not operator.store.workers():
        assert time.monotonic() < deadline and processes[0].poll() is None, (tmp_path / "worker.log").read_text()
        time.sleep(0.1)
    operator.pause(name="BatchPipeline")
    window = timedelta(seconds=0.3)
    first = BatchPipeline.create(url, {"ids": [1]}, key="p", debounce=window)
    time.sleep(1.5)  # the window passed while paused: the worker looked and claimed nothing
    later = BatchPipeline.create(url, {"ids": [2]}, key="p", debounce=window)
    assert (later.created, later.uuid) == (False, first.uuid)
    time.sleep(1.0)
    assert operator.get(first.uuid).pipeline.claims == 0
    operator.resume(name="BatchPipeline")
    deadline = time.monotonic() + 30
    while operator.get(first.uuid).pipeline.status != Status.FINISHED:
        assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
        time.sleep(0.1)
    assert [p.uuid for p in operator.query(key="p").pipelines] == [first.uuid]
    assert operator.get(first.uuid).steps[0].output == {"ids": [1, 2]}
    assert processes[0].poll() is None, "the worker died"


def test_cancelling_a_paused_parent_cancels_it_and_its_paused_child_at_once(
    backend_of: Any, store_kind: str, registry: Registry
) -> None:
    child_class = pipeline_of(step_of("Leaf", finishes), name="Leaf")

    def spawn(step: Any) -> None:
        step.start_child(child_class, {}, key="leaf")
        step.wait(3600)

    parent_class = pipeline_of(step_of("Spawn", spawn, lambda step: step.wait(3600)), name="Tree")
    clock = FakeClock()
    orchestrator = Orchestrator(backend_of, registry=registry, clock=clock)
    parent = parent_class.create(backend_of, {}, clock=clock).uuid
    orchestrator.pause(name="Leaf")
    orchestrator.execute_pipelines()
    (child,) = [p for p in orchestrator.list_pipelines() if p.name == "Leaf"]
    assert child.status == Status.PENDING
    orchestrator.pause(name="Tree")
    orchestrator.cancel(parent)
    assert orchestrator.get(parent).pipeline.status == Status.CANCELLED
    orchestrator.execute_pipelines()
    assert orchestrator.get(child.uuid).pipeline.status == Status.CANCELLED  # a pause does not hold a cancel


@pytest.mark.slow
def test_default_and_attach_creates_of_one_key_in_four_postgresql_processes_store_one_pipeline(
    postgres_url: str,
) -> None:
    """Two processes create with ``if_running="attach"`` and two in the default mode, in
    lockstep, key after key: each key's creates all return the one pipeline stored."""
    Orchestrator(postgres_url).store.get_pipeline("none")  # the schema first
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    rounds = 30
    creators = [
        context.Process(target=mixed_modes_in_lockstep, args=(postgres_url, me, barrier, results, rounds))
        for me in range(4)
    ]
    for creator in creators:
        creator.start()
    reports = [results.get(timeout=120) for _ in range(4 * rounds)]
    for creator in creators:
        creator.join(30)
        assert creator.exitcode == 0
    assert [error for *_, error in reports if error] == []
    orchestrator = Orchestrator(postgres_url)
    for n in range(rounds):
        stored = [p.uuid for p in orchestrator.query(key=f"mixed-{n}").pipelines]
        returned = {uuid for key, uuid, _ in reports if key == f"mixed-{n}"}
        assert (len(stored), returned) == (1, set(stored)), f"key mixed-{n}"


def test_the_logs_of_a_hook_whose_lease_was_lost_are_not_stored_with_the_refused_finish(
    backend_of: Any, store_kind: str, registry: Registry
) -> None:
    if store_kind == "seed":
        pytest.skip("the four-method fallback leases nothing: no lease to lose")
    clock = FakeClock()
    thief: list[Any] = []

    def slow(step: Any) -> None:
        step.log.info("ran past my lease")
        clock.advance(3600)  # the lease expired while the hook ran; another worker takes the pipeline
        store = thief[0].store
        assert store.claim_one(step.pipeline_uuid, clock.now(), "thief", clock.now() + timedelta(seconds=60))
        step.finish({"late": True})

    job = pipeline_of(step_of("Slow", slow), name="Slow")
    orchestrator = Orchestrator(backend_of, registry=registry, clock=clock)
    thief.append(orchestrator)
    uuid = job.create(backend_of, {}, clock=clock).uuid
    orchestrator.execute_pipelines()
    state = orchestrator.get(uuid)
    assert state.pipeline.lease_owner == "thief"  # the late finish was refused
    assert state.steps[0].status != Status.FINISHED and not state.steps[0].logs  # and its lines with it
