"""Singleton and debounce (issue #30, item 1): ``create(key=..., if_running="attach"|"error")``
and ``create(key=..., debounce=...)`` on every backend, across retention, at a claim's edge, and
with real processes creating one key at once beside a worker (SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from prorch import (
    FakeClock,
    InvalidKeyError,
    InvalidParamsError,
    KeyConflictError,
    KeyRunningError,
    Orchestrator,
    PipelineNotFoundError,
)
from prorch.model.status import Status
from prorch.storage.store import Store, store_for
from repositories import MemoryBackend, from_url
from tests.integration.key_race import BatchPipeline, KeyRacePipeline, debounce_in_lockstep
from tests.support.purging import purging_orchestrator

PRORCH = str(Path(sys.executable).parent / "prorch")
ROOT = Path(__file__).resolve().parents[2]
WINDOW = timedelta(seconds=30)


def test_attach_returns_the_live_pipeline_and_a_new_one_starts_once_it_ended(backend: Any) -> None:
    clock = FakeClock()
    orchestrator = Orchestrator(backend, clock=clock)
    first = KeyRacePipeline.create(backend, {"order": 1}, key="k", if_running="attach", clock=clock)
    same = KeyRacePipeline.create(backend, {"order": 2}, key="k", if_running="attach", clock=clock)
    assert (first.created, same.created, same.uuid, same.record.params) == (True, False, first.uuid, {"order": 1})
    with pytest.raises(KeyRunningError, match=r"key 'k' names pipeline KeyRacePipeline .*, which has not ended"):
        KeyRacePipeline.create(backend, {"order": 3}, key="k", if_running="error", clock=clock)
    with pytest.raises(KeyConflictError, match="this create asked for BatchPipeline: use another key"):
        BatchPipeline.create(backend, {"ids": [1]}, key="k", if_running="attach", clock=clock)
    assert [p.uuid for p in orchestrator.list_pipelines()] == [first.uuid]  # nothing stored by those
    orchestrator.execute_pipelines()
    assert orchestrator.get(first.uuid).pipeline.status == Status.FINISHED
    clock.advance(1)
    second = KeyRacePipeline.create(backend, {"order": 4}, key="k", if_running="error", clock=clock)
    assert second.created and second.uuid != first.uuid  # an ended pipeline does not hold its key
    again = KeyRacePipeline.create(backend, {"order": 5}, key="k", if_running="attach", clock=clock)
    assert (again.created, again.uuid) == (False, second.uuid)
    assert orchestrator.get_by_key("k").pipeline.uuid == second.uuid  # the live one
    assert {p.uuid for p in orchestrator.query(key="k").pipelines} == {first.uuid, second.uuid}
    orchestrator.execute_pipelines()
    assert orchestrator.get_by_key("k").pipeline.uuid == second.uuid  # all ended: the newest


def test_debounce_collapses_the_creates_of_a_window_into_one_pipeline(backend: Any) -> None:
    clock = FakeClock()
    orchestrator = Orchestrator(backend, clock=clock)
    first = BatchPipeline.create(backend, {"ids": [1]}, key="b", debounce=WINDOW, clock=clock)
    assert first.created and first.record.next_run_at == clock.now() + WINDOW
    clock.advance(20)
    second = BatchPipeline.create(backend, {"ids": [2]}, key="b", debounce=WINDOW, clock=clock)
    assert (second.created, second.uuid, second.record.params) == (False, first.uuid, {"ids": [1, 2]})  # merge
    clock.advance(20)  # the first create's window has passed, not the second's
    orchestrator.execute_pipelines()
    stored = orchestrator.get(first.uuid).pipeline
    pushed = clock.now() + timedelta(seconds=10)
    assert (stored.status, stored.claims, stored.next_run_at) == (Status.PENDING, 0, pushed)
    clock.advance(10)
    orchestrator.execute_pipelines()
    state = orchestrator.get(first.uuid)
    assert state.pipeline.status == Status.FINISHED and state.steps[0].output == {"ids": [1, 2]}
    third = BatchPipeline.create(backend, {"ids": [3]}, key="b", debounce=WINDOW, clock=clock)
    assert third.created and third.uuid != first.uuid  # it started: a new window, a new pipeline
    last = KeyRacePipeline.create(backend, {"order": 1}, key="plain", debounce=WINDOW, clock=clock)
    later = KeyRacePipeline.create(backend, {"order": 2}, key="plain", debounce=WINDOW, clock=clock)
    assert (later.uuid, later.record.params) == (last.uuid, {"order": 2})  # no merge declared: the last wins


def test_a_debounced_create_after_a_claim_starts_a_new_pipeline(backend: Any) -> None:
    """The window's edge in one process: once a worker has claimed the pipeline, a create
    never changes it (its hooks may be reading the params) but starts the next one."""
    clock = FakeClock()
    store = Orchestrator(backend, clock=clock).store
    first = BatchPipeline.create(backend, {"ids": [1]}, key="edge", debounce=WINDOW, clock=clock)
    clock.advance(31)
    now = clock.now()
    if store.can_claim:
        assert [p.uuid for p in store.claim_due(now, "worker-1", now + timedelta(minutes=5), 10)] == [first.uuid]
    else:  # a user's repository without a claim: the engine marks the pipeline claimed by hand
        record = store.get_pipeline(first.uuid)
        assert record is not None
        record.claims, record.lease_owner = 1, "worker-1"
        store.commit([record])
    second = BatchPipeline.create(backend, {"ids": [2]}, key="edge", debounce=WINDOW, clock=clock)
    assert second.created and second.uuid != first.uuid
    assert store.get_pipeline(first.uuid).params == {"ids": [1]}  # type: ignore[union-attr]
    third = BatchPipeline.create(backend, {"ids": [3]}, key="edge", debounce=WINDOW, clock=clock)
    assert (third.created, third.uuid, third.record.params) == (False, second.uuid, {"ids": [2, 3]})


def test_a_debounced_create_leaves_a_started_pipeline_that_waits_alone(backend: Any, registry: Any) -> None:
    """Regression: a started pipeline whose step waits (``self.wait``) is pending, unleased and
    has ``claims`` 0 again (the worker released it); a debounced create took it for one still
    in its window and changed its params and its wake-up under its hooks."""
    from tests.support.builders import pipeline_of, step_of

    def poll(step: Any) -> None:
        step.wait(seconds=3600)

    poller = pipeline_of(step_of("Poll", poll, poll), name="Poller")
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    first = poller.create(backend, {"n": 1}, key="p", debounce=WINDOW, clock=clock, registry=registry)
    clock.advance(31)
    orchestrator.execute_pipelines()  # started: its step waits an hour
    started = orchestrator.store.get_pipeline(first.uuid)
    assert started is not None and started.status == Status.PENDING and started.lease_owner is None
    second = poller.create(backend, {"n": 2}, key="p", debounce=WINDOW, clock=clock, registry=registry)
    assert second.created and second.uuid != first.uuid
    assert orchestrator.store.get_pipeline(first.uuid) == started  # its params and wake-up untouched


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"debounce": WINDOW}, InvalidKeyError, "debounce= needs key="),
        ({"if_running": "attach"}, InvalidKeyError, "if_running='attach' needs key="),
        ({"key": "x", "if_running": "wait"}, InvalidParamsError, "use one of 'same', 'attach', 'error'"),
        ({"key": "x", "debounce": timedelta(seconds=-1)}, InvalidParamsError, "give a positive timedelta"),
        ({"key": "x", "debounce": 30}, InvalidParamsError, "debounce=30: give a positive timedelta"),
        ({"key": "x", "debounce": WINDOW, "if_running": "error"}, InvalidParamsError, "do not combine"),
        ({"key": "x", "if_running": "attach", "uuid": "u-1"}, InvalidKeyError, "give key= or uuid=, not both"),
        ({"key": "", "if_running": "attach"}, InvalidKeyError, "1 to 200 characters long, not 0"),
    ],
)
def test_bad_options_are_one_clear_error_and_store_nothing(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    backend = MemoryBackend()
    with pytest.raises(error, match=message):
        BatchPipeline.create(backend, {"ids": [1]}, **options)
    assert Orchestrator(backend).list_pipelines() == []


def test_params_that_fail_validation_on_a_debounced_update_change_nothing(backend: Any) -> None:
    clock = FakeClock()
    first = BatchPipeline.create(backend, {"ids": [1]}, key="b", debounce=WINDOW, clock=clock)
    stored = Orchestrator(backend).store.get_pipeline(first.uuid)
    clock.advance(5)
    with pytest.raises(InvalidParamsError, match="ids"):
        BatchPipeline.create(backend, {"ids": "seven"}, key="b", debounce=WINDOW, clock=clock)
    original = BatchPipeline.merge
    try:  # a merge that returns what Params refuses
        BatchPipeline.merge = classmethod(lambda cls, old, new: {"ids": None})  # type: ignore[assignment,method-assign]
        with pytest.raises(InvalidParamsError, match=r"BatchPipeline.merge\(\) returned params that are not valid"):
            BatchPipeline.create(backend, {"ids": [2]}, key="b", debounce=WINDOW, clock=clock)
    finally:
        BatchPipeline.merge = original  # type: ignore[method-assign]
    assert Orchestrator(backend).store.get_pipeline(first.uuid) == stored  # params, due time, revision
    assert len(Orchestrator(backend).list_pipelines()) == 1


def test_keys_across_retention(backend: Any) -> None:
    """A waiting debounced pipeline is pending, so retention never takes it; an ended one it
    takes with its key, and the key then names only what comes next."""
    clock = FakeClock()
    orchestrator = purging_orchestrator(backend, clock)
    ended = KeyRacePipeline.create(backend, {"order": 1}, key="k", if_running="attach", clock=clock)
    orchestrator.execute_pipelines()
    waiting = BatchPipeline.create(backend, {"ids": [1]}, key="b", debounce=timedelta(days=40), clock=clock)
    clock.advance(31 * 86400)
    assert orchestrator.purge(timedelta(days=30)).pipelines == 1  # the ended one only
    with pytest.raises(PipelineNotFoundError, match="no pipeline was created with key 'k'"):
        orchestrator.get_by_key("k")
    fresh = KeyRacePipeline.create(backend, {"order": 2}, key="k", if_running="attach", clock=clock)
    assert fresh.created and fresh.uuid != ended.uuid
    again = BatchPipeline.create(backend, {"ids": [2]}, key="b", debounce=WINDOW, clock=clock)
    assert (again.created, again.uuid, again.record.params) == (False, waiting.uuid, {"ids": [1, 2]})
    clock.advance(31)
    orchestrator.execute_pipelines()
    clock.advance(31 * 86400)
    assert orchestrator.purge(timedelta(days=30)).pipelines == 2
    after = BatchPipeline.create(backend, {"ids": [3]}, key="b", debounce=WINDOW, clock=clock)
    assert after.created and after.uuid != waiting.uuid


def test_a_create_landing_while_a_worker_claims_the_pipeline_loses_no_params(postgres_url: str) -> None:
    """The window's edge on PostgreSQL, where a claim does not wait for a create: a worker
    (another thread, its own connection) claims the pipeline between this create's look-up and
    its write. The write's compare-and-set is refused; the create tries again, finds the
    pipeline claimed, and starts a new one with its params."""
    backend = from_url(postgres_url)
    first = BatchPipeline.create(backend, {"ids": [1]}, key="edge", debounce=timedelta(milliseconds=1))
    time.sleep(0.05)
    store = store_for(backend)
    claimed: list[str] = []

    def claim() -> None:
        worker = Store(from_url(postgres_url))
        now = worker.clock().now()
        claimed.extend(p.uuid for p in worker.claim_due(now, "worker-1", now + timedelta(minutes=5), 10))

    real = store.pipelines_with_key

    def look_up_then_let_a_worker_claim(key: str) -> list[Any]:
        found = real(key)
        if not claimed:
            thread = threading.Thread(target=claim)
            thread.start()
            thread.join(30)
        return found

    store.pipelines_with_key = look_up_then_let_a_worker_claim  # type: ignore[method-assign]
    try:
        second = BatchPipeline.create(backend, {"ids": [2]}, key="edge", debounce=WINDOW)
    finally:
        del store.pipelines_with_key
    assert claimed == [first.uuid]
    assert second.created and second.uuid != first.uuid and second.record.params == {"ids": [2]}
    assert store.get_pipeline(first.uuid).params == {"ids": [1]}  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_four_processes_debouncing_one_key_beside_a_worker(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, processes: list[subprocess.Popen[Any]]
) -> None:
    """4 creator processes and a worker: a burst of creates in lockstep (window 4 s) is one
    pipeline, created once; creates with if_running="attach" while the worker ends the key's
    pipelines never leave two live at once; a stream of creates with a 0.2 s window (some landing while the
    worker claims) loses no create's params: each pipeline ran with exactly the ids of the
    creates that returned it, and none started before its window had passed."""
    url = f"sqlite:///{tmp_path / 'debounce.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    Orchestrator(url).store.get_pipeline("none")  # the schema, before five processes race to make it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env["PYTHONPATH"] = str(ROOT)
    worker_command = [PRORCH, "-r", url, "--app", "tests.integration.key_race", "worker", "--interval", "0.05"]
    with (tmp_path / "worker.log").open("w") as log:
        processes.append(subprocess.Popen(worker_command, cwd=tmp_path, env=env, stdout=log, stderr=log))
    deadline = time.monotonic() + 60
    while not Orchestrator(url).store.workers():  # its heartbeat row: it claims from now on
        assert time.monotonic() < deadline and processes[0].poll() is None, (tmp_path / "worker.log").read_text()
        time.sleep(0.1)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    rounds, stream = 5, 12
    creators = [
        context.Process(target=debounce_in_lockstep, args=(url, me, barrier, results, rounds, stream))
        for me in range(4)
    ]
    for creator in creators:
        creator.start()
    reports = [results.get(timeout=120) for _ in range(4 * (3 * rounds + stream))]
    for creator in creators:
        creator.join(30)
        assert creator.exitcode == 0
    assert [error for *_, error in reports if error] == []
    single = [report for report in reports if report[0] == "single"]
    reports = [report for report in reports if report[0] != "single"]
    orchestrator = Orchestrator(url)
    burst = [report for report in reports if report[0] == "burst"]
    assert len({uuid for _, _, uuid, *_ in burst}) == 1 and sum(created for *_, created, _, _ in burst) == 1
    uuids = {uuid for _, _, uuid, *_ in reports}
    assert len(uuids) >= 3  # the stream's windows passed a few times: creates met claims
    deadline = time.monotonic() + 90
    every = uuids | {uuid for _, _, uuid, *_ in single}
    while any(orchestrator.get(uuid).pipeline.status != Status.FINISHED for uuid in every):
        assert time.monotonic() < deadline, "the worker did not finish the debounced pipelines"
        time.sleep(0.2)
    attached = sorted(orchestrator.query(key="single").pipelines, key=lambda p: p.created_at)  # type: ignore[arg-type, return-value]
    assert {p.uuid for p in attached} == {uuid for _, _, uuid, *_ in single} and len(attached) >= 2  # some ended
    assert sum(created for *_, created, _, _ in single) == len(attached)  # each created once
    for before, after in itertools.pairwise(attached):  # never two live at once: each ended before the next
        ended = orchestrator.get(before.uuid).steps[0].finished_at
        assert ended is not None and after.created_at is not None and ended <= after.created_at
    for uuid in uuids:
        mine = [report for report in reports if report[2] == uuid]
        assert sum(created for *_, created, _, _ in mine) == 1, mine  # created once, by one process
        step = orchestrator.get(uuid).steps[0]
        assert step.output == {"ids": sorted(number for _, number, *_ in mine)}  # no create's params lost
        assert step.started_at is not None and step.started_at >= max(due for *_, due, _ in mine)


def test_prorch_start_with_if_running_and_debounce(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from prorch.cli.commands import main

    base = ["--repository", f"sqlite:///{tmp_path / 'cli.db'}", "--app", "tests.integration.key_race", "start"]

    def start(*args: str) -> Any:
        return CliRunner().invoke(main, [*base, *args], env={"PYTHONPATH": str(ROOT)})

    attach = ["KeyRacePipeline", "--key", "k", "--if-running", "attach"]
    first = start(*attach, "-p", "order=1")
    assert first.exit_code == 0, first.output
    assert start(*attach, "-p", "order=2").stdout.strip() == f"{first.stdout.strip()} exists"
    refused = start("KeyRacePipeline", "-p", "order=3", "--key", "k", "--if-running", "error")
    assert refused.exit_code == 2 and "if_running='error' stores no second one" in refused.output
    waiting = start("BatchPipeline", "-p", "ids=[1]", "--key", "b", "--debounce", "30s")
    updated = start("BatchPipeline", "-p", "ids=[2]", "--key", "b", "--debounce", "30s", "--json")
    shown = json.loads(updated.stdout)
    assert (shown["created"], shown["uuid"], shown["params"]) == (False, waiting.stdout.strip(), {"ids": [1, 2]})
    again = start("BatchPipeline", "-p", "ids=[3]", "--key", "b", "--debounce", "30s")
    assert again.stdout.strip() == f"{waiting.stdout.strip()} updated"
    bad = start("BatchPipeline", "-p", "ids=[1]", "--key", "b", "--debounce", "soon")
    assert bad.exit_code == 2 and "--debounce 'soon': give an age such as 30d, 12h or 90m" in bad.output
    keyless = start("BatchPipeline", "-p", "ids=[1]", "--debounce", "30s")
    assert keyless.exit_code == 2 and "debounce= needs key=" in keyless.output
    assert len(Orchestrator(f"sqlite:///{tmp_path / 'cli.db'}").list_pipelines()) == 2


def test_a_childs_key_is_its_parents_own_and_attach_finds_it_by_the_whole_key(backend: Any, registry: Any) -> None:
    """A hook's ``start_child(..., key="1")`` stores the key ``child:<parent>:<step>:1``: a create
    with key "1" and if_running="attach" starts a pipeline of its own, and one with the child's
    whole key attaches to the live child instead of starting a second."""
    from tests.support.builders import pipeline_of, step_of

    def fan_out(step: Any) -> None:
        step.metadata["kid"] = step.start_child("Thumb", {"size": 1}, key="1")
        step.wait(seconds=86400)

    pipeline_of(step_of("Resize", lambda step: step.finish({"px": 2})), name="Thumb")
    gallery_class = pipeline_of(step_of("Fan", fan_out, lambda step: step.wait(seconds=86400)), name="Gallery")
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    gallery = gallery_class.create(backend, {}, clock=clock, registry=registry)
    thumb = registry.pipeline("Thumb")
    orchestrator.execute_pipelines()  # the parent's hook starts its child, which is still pending
    (child,) = orchestrator.store.children_of(gallery.uuid)
    assert orchestrator.get(gallery.uuid).pipeline.status == Status.PENDING  # the parent waits for it
    assert child.status == Status.PENDING and child.key == f"child:{gallery.uuid}:Fan:1"
    own = thumb.create(backend, {"size": 1}, key="1", if_running="attach", clock=clock, registry=registry)
    assert own.created and own.uuid != child.uuid and own.record.parent_uuid is None
    attached = thumb.create(backend, {"size": 5}, key=child.key, if_running="attach", clock=clock, registry=registry)
    assert (attached.created, attached.uuid) == (False, child.uuid)
    assert orchestrator.get_by_key(child.key or "").pipeline.uuid == child.uuid


def test_a_keys_lock_holds_other_creates_of_that_key_until_the_transaction_ends(postgres_url: str) -> None:
    """``lock_key`` on PostgreSQL: a second transaction locking the same key waits for the
    first to end; another key does not wait."""
    holder, waiter = Store(from_url(postgres_url)), Store(from_url(postgres_url))
    waited: list[tuple[str, float]] = []

    def lock(store: Store, key: str) -> None:
        started = time.monotonic()
        with store.transaction():
            store.lock_key(key)
        waited.append((key, time.monotonic() - started))

    with holder.transaction():
        holder.lock_key("k")
        threads = [threading.Thread(target=lock, args=(waiter, key)) for key in ("other", "k")]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        assert [key for key, _ in waited] == ["other"]  # "k" still waits for this transaction
    for thread in threads:
        thread.join(30)
    assert [key for key, _ in waited] == ["other", "k"] and dict(waited)["k"] >= 0.5
