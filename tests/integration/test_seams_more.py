"""More seams between the features of #28-#30 and the older ones, each a pair that could lose,
double, strand or wrongly fail work: pause, the HTTP API and streams with the store down for a
while; debounce and attach on TinyDB across processes; search attributes and step logs with two
code versions at once; a queued schedule of a paused class under retention; the per-key limit
on PostgreSQL with a SIGKILLed worker; keyed creates across tenants."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")

from prorch import (
    FakeClock,
    InvalidParamsError,
    KeyConflictError,
    KeyRunningError,
    OnContinueMixin,
    OnStartMixin,
    Orchestrator,
    Pipeline,
    Status,
    Step,
)
from prorch.dashboard import create_app, streams_api
from prorch.dashboard.app import store_caller
from prorch.model.exceptions import RepositoryError
from prorch.model.registry import Registry
from tests.integration import test_key_limit_workers as key_workers
from tests.integration.conftest import make_backend
from tests.integration.key_race import debounce_and_attach_in_lockstep
from tests.integration.test_limit_workers import most_at_once
from tests.support import processes as support
from tests.support.builders import pipeline_of, step_of
from tests.support.postgres import PostgresServer
from tests.support.processes import FAULTS, child_env, wait_for
from tests.unit import test_service_api as service

fault_app = support.fault_app()


@pytest.fixture(params=["memory", "sqlite", "postgresql", "tinydb", "seed"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_of(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    made = make_backend(store_kind, tmp_path, request)
    yield made
    if hasattr(made, "dispose"):
        made.dispose()


# --- 1. pause, the HTTP API and streams with the store down -----------------------------------


def api_of(orchestrator: Orchestrator) -> Any:
    return create_app(orchestrator, api_tokens=service.TOKENS)


def assert_unavailable(answer: tuple[int, Any]) -> None:
    """A 503 with the API's JSON error, saying the store failed (not a 400: the request was fine)."""
    status, body = answer
    assert status == 503, answer
    assert set(body) == {"error"} and body["error"]["type"] in ("StoreUnreachableError", "RepositoryError"), body
    assert "try again" in body["error"]["message"], body


def waiting(orchestrator: Orchestrator, uuid: str) -> bool:
    """The mailbox's first hook ran and its wait is stored."""
    steps = orchestrator.get(uuid).steps
    return bool(steps) and steps[0].metadata.get("count") == 0


@pytest.mark.slow
def test_the_api_answers_503_while_postgresql_is_down_and_a_paused_class_stays_paused_under_a_worker(
    own_server: PostgresServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    url = own_server.url
    operator = Orchestrator(url)
    operator.pause(name="Slow")
    paused = [fault_app.Slow.create(url, {"seconds": 0.05}).uuid for _ in range(3)]
    mailbox = fault_app.Mailbox.create(url, {}).uuid
    worker = subprocess.Popen(
        [sys.executable, str(FAULTS / "worker.py"), url, json.dumps({"interval": 0.05})],
        env=child_env(), stdout=subprocess.DEVNULL, stderr=(tmp_path / "worker.err").open("wb"),
    )  # fmt: skip
    processes.append(worker)
    wait_for(lambda: waiting(operator, mailbox), 60, "the worker to start the mailbox and store its wait")
    app = api_of(operator)
    operator.store.backend.dispose()  # type: ignore[attr-defined]
    own_server.stop()
    assert_unavailable(service.call(app, "GET", f"/api/v1/pipelines/{mailbox}", token=service.READ))
    assert_unavailable(service.call(app, "GET", "/api/v1/pipelines?name=Slow", token=service.READ))
    start = {"params": {"seconds": 0.05}}
    assert_unavailable(service.call(app, "POST", "/api/v1/pipelines/Slow", start, token=service.START))
    assert_unavailable(service.call(app, "GET", f"/api/v1/pipelines/{mailbox}/stream", token=service.READ))
    with pytest.raises(RepositoryError):
        operator.resume(name="Slow")  # said, not lost: the operator tries again later
    time.sleep(2)  # the worker meets the outage and backs off
    own_server.start()
    for payload in ("one", "two"):
        status, body = service.call(
            app, "POST", f"/api/v1/pipelines/{mailbox}/send", {"name": "tick", "payload": payload}, token=service.ACT
        )
        assert status == 200, body
    service.call(app, "POST", f"/api/v1/pipelines/{mailbox}/send", {"name": "stop"}, token=service.ACT)
    wait_for(lambda: operator.get(mailbox).pipeline.status == Status.FINISHED, 60, "the worker back at work")
    assert operator.get(mailbox).steps[0].output == {"count": 2}  # nothing sent during the outage was lost
    time.sleep(1)  # passes of the reconnected worker
    assert [p.value for p in operator.pauses()] == ["Slow"]
    assert [(operator.get(u).pipeline.status, operator.get(u).pipeline.claims) for u in paused] == [
        (Status.PENDING, 0)
    ] * 3
    operator.resume(name="Slow")
    wait_for(lambda: all(operator.get(u).pipeline.status == Status.FINISHED for u in paused), 60, "the resumed ones")
    assert len(operator.query(name="Slow").pipelines) == 3  # the refused start stored nothing
    assert worker.poll() is None, (tmp_path / "worker.err").read_text()[-3000:]


def emits_and_waits(step: Any) -> None:
    step.emit({"n": 1})
    step.emit({"n": 2})
    step.wait(3600)


def emits_on_more(step: Any) -> None:
    if step.receive("more") is None:
        step.wait(3600)
        return
    step.emit({"n": 3})
    step.finish({})


@pytest.mark.slow
def test_a_stream_followed_across_a_postgresql_outage_sends_each_entry_once_and_its_end(
    own_server: PostgresServer, registry: Registry
) -> None:
    """Regression: a read failing mid-stream ended the SSE response with an exception (the client
    saw the connection drop, the server logged a traceback). It now says so in a comment and
    reads on from its cursor once the store is back."""
    emitter = pipeline_of(step_of("Emit", emits_and_waits, emits_on_more), name="Emitting")
    orchestrator = Orchestrator(own_server.url, registry=registry)
    uuid = emitter.create(own_server.url, {}).uuid
    orchestrator.execute_pipelines()
    received: list[str] = []

    async def follow() -> None:
        async for event in streams_api.events(orchestrator, store_caller(orchestrator), uuid, 0):
            received.append(event)

    reader = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(follow(), 90)), daemon=True)
    reader.start()
    wait_for(lambda: len(received) >= 2, 30, "the first two entries")
    orchestrator.store.backend.dispose()  # type: ignore[attr-defined]
    own_server.stop()
    with pytest.raises(RepositoryError):
        list(orchestrator.stream(uuid, follow=False))  # the Python iterator says it, to be resumed
    wait_for(lambda: any("unavailable" in event for event in received), 30, "the stream to notice")
    time.sleep(1)
    own_server.start()
    orchestrator.send(uuid, "more")
    orchestrator.execute_pipelines()
    reader.join(60)
    assert not reader.is_alive()
    entries = [json.loads(e.split("data: ", 1)[1]) for e in received if e.startswith("id: ")]
    assert [entry["value"] for entry in entries] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert received[-1] == 'event: end\ndata: {"status": "finished"}\n\n'
    resumed = list(orchestrator.stream(uuid, after=entries[1]["seq"], follow=False))
    assert [entry.value for entry in resumed] == [{"n": 3}]


LOCK_HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
connection.execute("PRAGMA locking_mode=EXCLUSIVE")  # readers are shut out too, until the end
connection.execute("BEGIN EXCLUSIVE")
connection.execute("CREATE TABLE IF NOT EXISTS held (x)")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("ROLLBACK")
"""


def test_the_api_answers_503_while_another_process_locks_the_sqlite_file_and_works_after(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a store error (here SQLite's "database is locked", past the busy timeout) was
    answered 400, as if the request were wrong. It is a 503 with Retry-After; nothing is stored,
    and the same calls succeed once the lock is gone; a pause stays in force."""
    monkeypatch.setattr("repositories.sqlite.BUSY_TIMEOUT_SECONDS", 0.3)  # give up on the lock quickly
    registry.add_step(service.Sum)
    registry.add_pipeline(service.Invoice)
    path = tmp_path / "api.db"
    orchestrator = Orchestrator(f"sqlite:///{path}", registry=registry)
    app = create_app(orchestrator, api_tokens=service.TOKENS)
    orchestrator.pause(name="Invoice")
    start = {"params": {"customer": "acme", "amount": 2}}
    status, first = service.call(app, "POST", "/api/v1/pipelines/Invoice", start, token=service.START)
    assert status == 201, first
    orchestrator.store.backend.dispose()  # type: ignore[attr-defined]
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path), "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert_unavailable(service.call(app, "GET", f"/api/v1/pipelines/{first['uuid']}", token=service.READ))
        assert_unavailable(service.call(app, "POST", "/api/v1/pipelines/Invoice", start, token=service.START))
        status, body = service.call(app, "GET", f"/api/pipelines/{first['uuid']}/stream")  # the dashboard's own
        assert (status, "locked" in body["error"]) == (503, True), body
    finally:
        assert holder.wait(30) == 0
    assert [p.uuid for p in orchestrator.list_pipelines()] == [first["uuid"]]  # the refused start stored nothing
    assert orchestrator.execute_pipelines().claimed == 0  # still paused
    status, second = service.call(app, "POST", "/api/v1/pipelines/Invoice", start, token=service.START)
    assert status == 201, second
    orchestrator.resume(name="Invoice")
    orchestrator.execute_pipelines()
    for uuid in (first["uuid"], second["uuid"]):
        status, body = service.call(app, "GET", f"/api/v1/pipelines/{uuid}/result", token=service.READ)
        assert (status, body["result"]) == (200, {"total": 4}), body


def test_the_api_answers_500_not_503_for_a_stored_pipeline_it_cannot_read(tmp_path: Path, registry: Registry) -> None:
    """Regression (review): corrupt stored data was answered 503 "try again later", which a
    client would retry for ever; it is a 500 naming the record error, and the others still read."""
    import sqlite3

    registry.add_step(service.Sum)
    registry.add_pipeline(service.Invoice)
    path = tmp_path / "api.db"
    app = create_app(Orchestrator(f"sqlite:///{path}", registry=registry), api_tokens=service.TOKENS)
    start = {"params": {"customer": "acme", "amount": 2}}
    started = [service.call(app, "POST", "/api/v1/pipelines/Invoice", start, token=service.START) for _ in "ab"]
    uuids = [body["uuid"] for _, body in started]
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE pipelines SET status = 'exploded' WHERE uuid = ?", (uuids[0],))
    status, body = service.call(app, "GET", f"/api/v1/pipelines/{uuids[0]}", token=service.READ)
    assert (status, body["error"]["type"]) == (500, "CorruptRecordError"), body
    assert "try again" not in body["error"]["message"]
    status, body = service.call(app, "GET", f"/api/v1/pipelines/{uuids[1]}", token=service.READ)
    assert status == 200, body


def test_a_lone_surrogate_in_api_params_is_a_422_and_nothing_is_stored(tmp_path: Path, registry: Registry) -> None:
    """Regression (review): JSON may spell a lone surrogate (``"\\ud800"``), which no store can
    encode; the start failed in the store with a UnicodeEncodeError, answered 503 "try again
    later". It is one clear InvalidParamsError (422) before anything is stored."""
    registry.add_step(service.Sum)
    registry.add_pipeline(service.Invoice)
    orchestrator = Orchestrator(f"sqlite:///{tmp_path / 'api.db'}", registry=registry)
    app = create_app(orchestrator, api_tokens=service.TOKENS)
    start = {"params": {"customer": "\ud800", "amount": 2}}
    status, body = service.call(app, "POST", "/api/v1/pipelines/Invoice", start, token=service.START)
    assert (status, body["error"]["type"]) == (422, "InvalidParamsError"), body
    assert "params['customer']: a string with a lone surrogate" in body["error"]["message"]
    assert orchestrator.list_pipelines() == []


# --- 2. debounce and attach on TinyDB across processes -----------------------------------------


@pytest.mark.slow
def test_four_processes_debouncing_and_attaching_one_key_on_tinydb_store_one_pipeline_each(tmp_path: Path) -> None:
    """4 creator processes on one TinyDB file, in lockstep: the debounced creates of one key are
    one pipeline, created once, whose params hold every create's id exactly once (the merge
    concatenates: applied twice, an id would show twice); the attach creates of another key
    are one pipeline too."""
    url = f"tinydb:///{tmp_path / 'keys.json'}"
    Orchestrator(url).store.get_pipeline("none")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    rounds = 8
    creators = [
        context.Process(target=debounce_and_attach_in_lockstep, args=(url, me, barrier, results, rounds))
        for me in range(4)
    ]
    for creator in creators:
        creator.start()
    reports = [results.get(timeout=120) for _ in range(4 * rounds * 2)]
    for creator in creators:
        creator.join(30)
        assert creator.exitcode == 0
    assert [error for *_, error in reports if error] == []
    orchestrator = Orchestrator(url)
    for key in ("merged", "attached"):
        mine = [report for report in reports if report[0] == key]
        stored = orchestrator.query(key=key).pipelines
        assert len(stored) == 1 and {uuid for _, _, uuid, _, _ in mine} == {stored[0].uuid}, key
        assert sum(created for *_, created, _ in mine) == 1, key
    (merged,) = orchestrator.query(key="merged").pipelines
    assert sorted(merged.params["ids"]) == sorted(number for key, number, *_ in reports if key == "merged")
    assert orchestrator.query(key="attached").pipelines[0].status == Status.PENDING


# --- 3. search attributes and step logs with two code versions at once -------------------------


def two_codes(new: dict[str, Any], old: dict[str, Any], **step_attrs: Any) -> tuple[Registry, Registry]:
    """The same pipeline class ("Deployed", version 1, one step "Work") in two registries, with
    the new code's hooks and the old code's, as two workers of a rolling deploy load them."""
    made = []
    for hooks in (new, old):
        registry = Registry()
        step = type(
            "Work",
            (OnStartMixin, OnContinueMixin, Step),
            {"name": "Work", "on_continue": finishes_plainly, **hooks, **step_attrs},
        )
        registry.add_step(step)
        registry.add_pipeline(type("Deployed", (Pipeline,), {"name": "Deployed", "steps": [step]}))
        made.append(registry)
    return made[0], made[1]


def labels_logs_and_waits(step: Any) -> None:
    step.set_attribute("stage", "started")
    step.log.info("started by the new code")
    step.wait(60)


def logs_and_fails(step: Any) -> None:
    step.log.info("attempt by the new code")
    raise RuntimeError("boom")


def fails(step: Any) -> None:
    raise RuntimeError("boom")


def finishes_plainly(step: Any) -> None:
    step.finish({})


def test_attributes_and_logs_of_the_new_code_survive_the_old_codes_transition(backend_of: Any) -> None:
    """The new code labels the pipeline and logs, then waits; a worker of the old code (which
    knows neither) takes it on: the label, its index and the lines stay."""
    new, old = two_codes(
        {"on_start": labels_logs_and_waits, "on_continue": finishes_plainly},
        {"on_start": finishes_plainly, "on_continue": finishes_plainly},
    )
    clock = FakeClock()
    uuid = (
        new.pipeline("Deployed").create(backend_of, {}, attributes={"customer": "acme"}, clock=clock, registry=new).uuid
    )
    Orchestrator(backend_of, registry=new, clock=clock).execute_pipelines()
    clock.advance(61)
    older = Orchestrator(backend_of, registry=old, clock=clock)
    older.execute_pipelines()
    state = older.get(uuid)
    assert state.pipeline.status == Status.FINISHED
    assert state.pipeline.attributes == {"customer": "acme", "stage": "started"}
    assert [p.uuid for p in older.query(attributes={"stage": "started", "customer": "acme"}).pipelines] == [uuid]
    assert [(entry["attempt"], [line[2] for line in entry["lines"]]) for entry in state.steps[0].logs] == [
        (1, ["started by the new code"])
    ]


@pytest.mark.parametrize("order", ["new-then-old", "old-then-new"])
def test_the_logs_of_an_attempt_survive_a_retry_by_the_other_code(backend_of: Any, order: str) -> None:
    """Attempt 1 by one code, attempt 2 (the step's retry) by the other, and the operator's
    retry (attempts from 1 again, the earlier entries marked ``retried``) by the first: each
    attempt's lines stay under its number; the code that does not log adds no entry and
    removes none."""
    new, old = two_codes({"on_start": logs_and_fails}, {"on_start": fails}, max_attempts=2, retry_delay=1)
    first, second = (new, old) if order == "new-then-old" else (old, new)
    clock = FakeClock()
    uuid = first.pipeline("Deployed").create(backend_of, {}, clock=clock, registry=first).uuid
    Orchestrator(backend_of, registry=first, clock=clock).execute_pipelines()  # attempt 1 fails
    clock.advance(60)
    later = Orchestrator(backend_of, registry=second, clock=clock)
    later.execute_pipelines()  # attempt 2, by the other code, fails for good
    state = later.get(uuid)
    assert state.pipeline.status == Status.FAILED
    logged = 1 if order == "new-then-old" else 2
    assert [(entry["attempt"], [line[2] for line in entry["lines"]]) for entry in state.steps[0].logs] == [
        (logged, ["attempt by the new code"])
    ]
    later.retry(uuid)  # an operator's retry, run by the first code again
    Orchestrator(backend_of, registry=first, clock=clock).execute_pipelines()
    clock.advance(60)
    Orchestrator(backend_of, registry=first, clock=clock).execute_pipelines()
    entries = [(e["attempt"], e.get("retried", False), len(e["lines"])) for e in later.get(uuid).steps[0].logs]
    assert entries == ([(1, True, 1), (1, False, 1), (2, False, 1)] if first is new else [(2, True, 1)])


# --- 4. pause x schedule_when_paused="queue" x retention ---------------------------------------

RAN: list[str] = []


def ticks(orchestrator: Orchestrator) -> dict[str, Status]:
    return {p.context["schedule_tick"][11:16]: p.status for p in orchestrator.query(name="Hourly").pipelines}


def test_queued_ticks_of_a_paused_class_outlive_retention_and_run_once_each_after_the_resume(
    backend_of: Any, store_kind: str, registry: Registry
) -> None:
    """Retention purges the ended ticks (one that ran before the pause, one cancelled while
    queued) and none of the queued ones; no pass creates a purged tick again or doubles a queued
    one; the resume runs each queued tick once."""
    if store_kind == "seed":
        pytest.skip("a four-method repository cannot delete: no retention there")
    RAN.clear()
    step = step_of("Tick", lambda self: (RAN.append(self.pipeline_uuid), self.finish({})))
    pipeline_of(step, name="Hourly", every=timedelta(hours=1), catch_up="all", schedule_when_paused="queue")
    clock = FakeClock(datetime(2026, 11, 23, 12, 0, 30, tzinfo=timezone.utc))
    orchestrator = Orchestrator(backend_of, registry=registry, clock=clock)
    assert orchestrator.execute_pipelines().scheduled == 1  # 12:00 runs
    orchestrator.pause(name="Hourly")
    for _ in range(3):
        clock.advance(3600)
        assert (orchestrator.execute_pipelines().scheduled, len(RAN)) == (1, 1)  # 13:00, 14:00, 15:00 wait
    (cancelled,) = [
        p.uuid for p in orchestrator.query(name="Hourly").pipelines if p.context["schedule_tick"][11:13] == "14"
    ]
    orchestrator.cancel(cancelled)
    clock.advance(3600)
    assert orchestrator.execute_pipelines().scheduled == 1  # 16:00 waits
    assert orchestrator.purge(timedelta(minutes=30)).pipelines == 2  # 12:00 (finished) and 14:00 (cancelled)
    assert ticks(orchestrator) == {"13:00": Status.PENDING, "15:00": Status.PENDING, "16:00": Status.PENDING}
    for _ in range(3):
        assert orchestrator.execute_pipelines().scheduled == 0  # neither the purged ones again nor a queued one twice
    assert [p.value for p in orchestrator.pauses()] == ["Hourly"]
    orchestrator.resume(name="Hourly")
    assert orchestrator.execute_pipelines().claimed == 3
    assert orchestrator.execute_pipelines().claimed == 0
    assert ticks(orchestrator) == {"13:00": Status.FINISHED, "15:00": Status.FINISHED, "16:00": Status.FINISHED}
    assert sorted(RAN[1:]) == sorted(p.uuid for p in orchestrator.query(name="Hourly").pipelines)  # once each
    clock.advance(3600)
    assert orchestrator.execute_pipelines().scheduled == 1  # 17:00, and no catch-up of a purged tick
    assert sorted(ticks(orchestrator)) == ["13:00", "15:00", "16:00", "17:00"]


# --- 5. the per-key limit on PostgreSQL with a SIGKILLed worker --------------------------------


@pytest.fixture
def keyed_app(tmp_path: Path) -> Iterator[Path]:
    """The app of test_key_limit_workers (PerCustomer: max_running_per_key = 1) in a folder."""
    (tmp_path / "keyed_app.py").write_text(textwrap.dedent(key_workers.APP))
    yield tmp_path
    sys.modules.pop("keyed_app", None)


@pytest.mark.slow
def test_a_killed_worker_s_keyed_pipeline_is_taken_over_on_postgresql_and_its_key_never_runs_two(
    keyed_app: Path, postgres_url: str, processes: list[subprocess.Popen[str]]
) -> None:
    """A worker SIGKILLed in a hook of key "k" (max_running_per_key = 1); two workers take
    over: the key's next pipelines wait for the dead lease (6 s) to expire, a live worker takes
    the dead one's pipeline over, and the hooks' own clocks (the killed attempt until the
    kill) never show two of "k" at once."""
    url, app = postgres_url, keyed_app
    (app / "hang").write_text("")
    [hung, *queued] = key_workers.create(url, app, ["k"] * 4, seconds=0.2)
    doomed = key_workers.start_worker(url, app, processes, "6")
    wait_for(lambda: len(key_workers.starts(app)) == 1, 30, "the first hook to start")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    killed_at = time.time()
    [other] = key_workers.create(url, app, ["other"])
    for _ in range(2):
        key_workers.start_worker(url, app, processes, "6", "--concurrency", "2")
    wait_for(lambda: key_workers.finished(url, [hung, other, *queued]), 90, "every pipeline to finish")
    orchestrator = Orchestrator(url)
    outputs = {uuid: orchestrator.get(uuid).steps[0].output for uuid in [hung, *queued]}
    assert outputs[hung]["pid"] != doomed.pid  # a live worker took the dead one's pipeline over
    killed = (key_workers.starts(app)[0]["at"], killed_at)
    assert most_at_once([killed, *((o["start"], o["end"]) for o in outputs.values())]) == 1
    assert min(o["start"] for o in outputs.values()) > killed_at + 2  # the dead lease counted for "k"


# --- 6. keyed creates across tenants ---------------------------------------------------------


def test_a_key_is_global_a_create_in_another_tenant_finds_the_first_tenant_s_pipeline(
    backend_of: Any, registry: Registry
) -> None:
    """Documented (docs/concepts.md, keys): keys are not per tenant. Tenant b's repeat of tenant
    a's key returns a's pipeline (tenant a's, unchanged), with ``attach`` too; other params are
    the key's usual conflict, one clear error, nothing stored; ``error`` refuses it as running."""
    job = pipeline_of(step_of("Sync", finishes), name="Sync")
    first = job.create(backend_of, {"order": 1}, key="order-1", tenant="a")
    again = job.create(backend_of, {"order": 1}, key="order-1", tenant="b")
    assert (again.created, again.uuid, again.record.context.get("tenant")) == (False, first.uuid, "a")
    live = job.create(backend_of, {"order": 2}, key="sync", tenant="a", if_running="attach")
    attached = job.create(backend_of, {"order": 2}, key="sync", tenant="b", if_running="attach")
    assert (attached.created, attached.uuid, attached.record.context.get("tenant")) == (False, live.uuid, "a")
    across = "of tenant 'a' \\(this create is of tenant 'b': keys are global, not per tenant; put the tenant in the key"
    with pytest.raises(KeyConflictError, match=rf"key 'order-1' .* params {{\"order\": 1}} {across}.*{{\"order\": 9}}"):
        job.create(backend_of, {"order": 9}, key="order-1", tenant="b")
    with pytest.raises(KeyRunningError, match=f"key 'sync' names pipeline Sync {live.uuid} {across}"):
        job.create(backend_of, {"order": 2}, key="sync", tenant="b", if_running="error")
    with pytest.raises(KeyConflictError) as same_tenant:
        job.create(backend_of, {"order": 9}, key="order-1", tenant="a")
    assert "tenant" not in str(same_tenant.value)  # said only where the tenants differ
    orchestrator = Orchestrator(backend_of, registry=registry)
    assert sorted(p.uuid for p in orchestrator.list_pipelines()) == sorted([first.uuid, live.uuid])
    assert orchestrator.query(tenant="b").pipelines == []


def finishes(step: Any) -> None:
    step.finish({})


@pytest.mark.slow
def test_a_pipeline_whose_write_met_the_outage_resumes_when_postgresql_is_back_not_when_its_lease_runs_out(
    own_server: PostgresServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Regression (found by the outage seam): a hook that ended while PostgreSQL was down could
    not store its transition, and its pipeline stayed leased by its own worker, unclaimable,
    until the lease ran out (60 s by default, 40 s here), long after the server was back. The
    worker now gives such a lease back (compare-and-set on its token) once the store answers."""
    url = own_server.url
    uuid = fault_app.Slow.create(url, {"seconds": 3}).uuid
    hooks = tmp_path / "hooks.log"
    worker = subprocess.Popen(
        [sys.executable, str(FAULTS / "worker.py"), url, json.dumps({"interval": 0.05, "lease_seconds": 40})],
        env=child_env(FAULT_LOG=str(hooks)), stdout=subprocess.DEVNULL, stderr=(tmp_path / "worker.err").open("wb"),
    )  # fmt: skip
    processes.append(worker)
    wait_for(lambda: hooks.exists() and "start" in hooks.read_text(), 60, "the hook to start")
    own_server.stop()
    wait_for(lambda: "end" in hooks.read_text(), 30, "the hook to end, its transition not stored")
    time.sleep(1)
    own_server.start()
    back = time.monotonic()
    orchestrator = Orchestrator(url)
    wait_for(lambda: orchestrator.get(uuid).pipeline.status == Status.FINISHED, 60, "the pipeline to finish")
    assert time.monotonic() - back < 20, (tmp_path / "worker.err").read_text()[-3000:]
    assert hooks.read_text().count("start") == 2  # run again, as after any lost transition: once more


@pytest.mark.parametrize("store_kind", ["postgresql", "sqlite"])
def test_a_priority_the_store_cannot_hold_is_one_clear_error_not_a_503(
    backend_of: Any, registry: Registry, store_kind: str
) -> None:
    """Regression (review of the API's 503): a priority past a 32-bit integer (the column's type
    on PostgreSQL) was refused by the database, which the API now answers 503 "try again later",
    so a client retried for ever. It is one clear error before anything is stored, on every
    backend alike (422 from the API)."""
    job = pipeline_of(step_of("Work", on_start=lambda step: None), name="Job")
    orchestrator = Orchestrator(backend_of, registry=registry)
    app = api_of(orchestrator)
    for priority in (2**31, 2**40):
        status, body = service.call(app, "POST", "/api/v1/pipelines/Job", {"params": {}, "priority": priority},
                                    token=service.START)  # fmt: skip
        assert status == 422 and "priority" in body["error"]["message"], body
    with pytest.raises(InvalidParamsError, match="priority"):
        job.create(backend_of, {}, priority=-(2**31) - 1)
    assert job.create(backend_of, {}, priority=2**31 - 1).uuid  # the largest one that fits
    assert orchestrator.query(count=True).total == 1
