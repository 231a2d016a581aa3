"""prorch's benchmark workloads; each run is a fresh process that prints one JSON line.

    python tests/benchmarks/workloads.py w1 URL N [GROUP]  # N pipelines of 3 quick steps, created then run
    python tests/benchmarks/workloads.py w1_batch URL N [GROUP]  # the same, created by one create_many
    python tests/benchmarks/workloads.py floor URL N GROUP  # W1's recorded statements replayed, raw driver
    python tests/benchmarks/workloads.py w2_setup URL WAITING  # WAITING idle + 10 due pipelines
    python tests/benchmarks/workloads.py w2_pass URL           # one pass of a fresh worker over them
    python tests/benchmarks/workloads.py w3 SQLITE_PATH N  # engine time per transition, SQLite time excluded
    python tests/benchmarks/workloads.py w1_loop URL N pass|worker [CONCURRENCY]  # W1 by passes or a worker
    python tests/benchmarks/workloads.py w4 URL N WORKERS [SLEEP]  # WORKERS processes, hooks sleeping 10 ms
    python tests/benchmarks/workloads.py w5 URL N CONCURRENCY async|sync  # hooks waiting 50 ms on I/O
    python tests/benchmarks/workloads.py w4_slots URL N [CONCURRENCY]  # one worker, sync hooks sleeping 50 ms
    python tests/benchmarks/workloads.py head_of_line URL [QUICK] [SLOW_SECONDS]  # a slow hook, quick ones after
    python tests/benchmarks/workloads.py children URL N  # a parent of N children reads their results
    python tests/benchmarks/workloads.py drain URL N     # one hook receives N queued messages

Run them all with tests/benchmarks/run.py, which writes docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
import os
import resource
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prorch import (
    Extension,
    OnContinueMixin,
    OnStartMixin,
    Orchestrator,
    Pipeline,
    Status,
    Step,
    register_pipeline,
    register_step,
)
from prorch.model.records import Record
from prorch.storage.creation import build_records
from prorch.storage.store import Store
from repositories import from_url
from repositories.sql import SQLBackend
from tests.benchmarks import replay

SLEEP = {"seconds": 0.0}


def quick_step(index: int) -> type[Step]:
    def on_start(self: Step) -> None:
        if SLEEP["seconds"]:
            time.sleep(SLEEP["seconds"])

    return register_step(type(f"Quick{index}", (OnStartMixin, Step), {"name": f"Quick{index}", "on_start": on_start}))


Three = register_pipeline(type("Three", (Pipeline,), {"name": "Three", "steps": [quick_step(i) for i in range(3)]}))
One = register_pipeline(type("One", (Pipeline,), {"name": "One", "steps": [quick_step(9)]}))


@functools.cache
def three_limited() -> type[Pipeline]:
    """Three with a limit that never binds: W1 through the limited claim (its count of live
    leases). Registered only by the run that asks for it: a limited class registered sends
    every claim of the process through the limited claim (a second write transaction, its
    statements built in the first pass), which W1 and W2 do not measure."""
    return register_pipeline(
        type("ThreeLimited", (Pipeline,), {"name": "ThreeLimited", "steps": Three.steps, "max_running": 1_000_000})
    )


def io_step(index: int, kind: str) -> type[Step]:
    """A step whose only hook waits 50 ms on (simulated) I/O: ``async def`` awaiting, or a sync
    hook sleeping in its thread."""

    async def on_start_async(self: Step) -> None:
        await asyncio.sleep(IO_SECONDS)

    def on_start_sync(self: Step) -> None:
        time.sleep(IO_SECONDS)

    on_start = on_start_async if kind == "async" else on_start_sync
    name = f"IO{kind.title()}{index}"
    return register_step(type(name, (OnStartMixin, Step), {"name": name, "on_start": on_start}))


IO_SECONDS = 0.050
IO_PIPELINES = {
    kind: register_pipeline(
        type(f"Io{kind}", (Pipeline,), {"name": f"Io{kind}", "steps": [io_step(i, kind) for i in range(3)]})
    )
    for kind in ("async", "sync")
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_to_end(orchestrator: Orchestrator) -> int:
    transitions = 0
    while True:
        summary = orchestrator.execute_pipelines()
        transitions += summary.transitions
        if summary.claimed == 0:
            return transitions


def w1_observed(url: str, n: int, state: str) -> dict[str, Any]:
    """W1's run phase on SQLite (create_many, then passes), observed or not: ``off``,
    ``metrics`` (Prometheus metrics attached), ``traced`` (metrics, and OpenTelemetry spans of
    every pipeline through the SDK's batch processor to an exporter that drops them: every span
    is made and processed, none is sent), or ``sampled`` (the same with 10% of pipelines
    sampled at creation, ParentBased(TraceIdRatioBased(0.1))). Needs opentelemetry-sdk."""
    if state in ("traced", "sampled"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        class Dropping(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)) if state == "sampled" else None)
        provider.add_span_processor(BatchSpanProcessor(Dropping(), max_queue_size=1_000_000))  # drop none
        trace.set_tracer_provider(provider)
    backend = from_url(url)
    Three.create_many(backend, [{}] * n)
    orchestrator = Orchestrator(backend, concurrency=1)
    if state != "off":
        from prorch.observability.metrics import WorkerMetrics

        WorkerMetrics(orchestrator).attach()
    started = time.perf_counter()
    transitions = run_to_end(orchestrator)
    return {"state": state, "transitions_per_s": transitions / (time.perf_counter() - started)}


def w1(url: str, n: int, group: int = 100, limited: int = 0) -> dict[str, Any]:
    """W1; with ``limited``, of ``ThreeLimited`` (claimed by the limited claim)."""
    backend = from_url(url)
    pipeline = three_limited() if limited else Three
    cpu, started = time.process_time(), time.perf_counter()
    for _ in range(n):
        pipeline.create(backend)
    created = time.perf_counter()
    transitions = run_to_end(Orchestrator(backend, concurrency=1, group_commit=group))
    done, cpu = time.perf_counter(), time.process_time() - cpu
    finished = len(Orchestrator(backend).list_pipelines(status="finished"))
    assert finished == n, f"only {finished} of {n} finished"
    return {
        "create_per_s": n / (created - started),
        "transitions": transitions,
        "transitions_per_s": transitions / (done - created),
        "e2e_per_s": transitions / (done - started),  # the creates counted, as DBOS's are
        "e2e_cpu_us": cpu / transitions * 1e6,
        "rss_mb": rss_mb(),
    }


def w1_worker(url: str, n: int, concurrency: int = 4) -> dict[str, Any]:
    """W1 run by a worker (``run_forever`` in a thread) instead of passes: pipelines per second
    from its start until all have finished (polled every 10 ms)."""
    backend = from_url(url)
    Three.create_many(backend, [{}] * n)
    worker = Orchestrator(backend, concurrency=concurrency)
    reader = Orchestrator(backend)
    started = time.perf_counter()
    thread = threading.Thread(target=worker.run_forever, kwargs={"interval": 0.05})
    thread.start()
    while (reader.query(status="finished", limit=1, count=True).total or 0) < n:
        time.sleep(0.01)
    done = time.perf_counter()
    worker.stop()
    thread.join()
    return {"pipelines_per_s": n / (done - started), "transitions_per_s": 3 * n / (done - started)}


class Ended(Extension):
    """The benchmarks' reader: counts the pipelines that ended in this process (``on_ended``)
    and sets ``all_ended`` at ``n``; a few microseconds a pipeline, the same for a pass and a
    worker (a query counting them every 10 ms cost the worker about 140 us a transition)."""

    def __init__(self, n: int) -> None:
        self.n, self.ended, self.all_ended = n, 0, threading.Event()

    def on_ended(self, pipeline: Any, status: Status) -> None:
        self.ended += 1
        if self.ended >= self.n:
            self.all_ended.set()


def w1_loop(url: str, n: int, mode: str, concurrency: int = 4) -> dict[str, Any]:
    """W1's run phase (N pipelines of 3 quick steps made by ``create_many``), run by passes
    (``mode`` pass: ``execute_pipelines`` in a loop, concurrency 1, as ``w1``) or by a worker
    (``worker``: ``run_forever`` at ``concurrency``), each in a thread, both timed by the same
    reader (``Ended``): from the start until the last pipeline ended."""
    backend = from_url(url)
    Three.create_many(backend, [{}] * n)
    reader = Ended(n)
    if mode == "pass":
        orchestrator = Orchestrator(backend, concurrency=1, group_commit=100, extensions=[reader])
        target: Callable[[], Any] = lambda: run_to_end(orchestrator)  # noqa: E731
    else:
        orchestrator = Orchestrator(backend, concurrency=concurrency, extensions=[reader])
        target = lambda: orchestrator.run_forever(interval=0.05)  # noqa: E731
    cpu, started = time.process_time(), time.perf_counter()
    thread = threading.Thread(target=target)
    thread.start()
    reader.all_ended.wait()
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    orchestrator.stop()
    thread.join()
    return {"mode": mode, "transitions_per_s": 3 * n / took, "cpu_us": cpu / (3 * n) * 1e6}


def w4_slots(url: str, n: int, concurrency: int = 32) -> dict[str, Any]:
    """W4 of #27: N pipelines of 3 steps whose sync hooks sleep 50 ms, run by one worker
    (``run_forever``) at ``concurrency``; hooks per second against ``concurrency / 50 ms``,
    timed by ``Ended``."""
    backend = from_url(url)
    IO_PIPELINES["sync"].create_many(backend, [{}] * n)
    reader = Ended(n)
    worker = Orchestrator(backend, concurrency=concurrency, extensions=[reader])
    started = time.perf_counter()
    thread = threading.Thread(target=worker.run_forever, kwargs={"interval": 0.05})
    thread.start()
    reader.all_ended.wait()
    took = time.perf_counter() - started
    worker.stop()
    thread.join()
    ideal = concurrency / IO_SECONDS
    return {"hooks_per_s": 3 * n / took, "ideal_per_s": ideal, "of_ideal": 3 * n / took / ideal, "seconds": took}


SLOW_HOOK = {"seconds": 60.0, "started": threading.Event(), "release": threading.Event(), "ended": threading.Event()}


@register_step
class HolSlow(OnStartMixin, Step):
    """Waits ``SLOW_HOOK['seconds']``, or until the benchmark has measured what it needs."""

    name = "HolSlow"

    def on_start(self) -> None:
        SLOW_HOOK["started"].set()  # type: ignore[attr-defined]
        SLOW_HOOK["release"].wait(SLOW_HOOK["seconds"])  # type: ignore[attr-defined]
        SLOW_HOOK["ended"].set()  # type: ignore[attr-defined]


HolSlowPipeline = register_pipeline(type("HolSlowPipeline", (Pipeline,), {"name": "HolSlow", "steps": [HolSlow]}))


def head_of_line(url: str, quick: int = 1000, slow_seconds: float = 60.0, concurrency: int = 4) -> dict[str, Any]:
    """#27's head-of-line case: one slow hook started, then ``quick`` one-step pipelines created;
    how long they take, and whether the slow hook still runs when the last one finished."""
    SLOW_HOOK["seconds"] = slow_seconds
    backend = from_url(url)
    HolSlowPipeline.create(backend)
    worker, reader = Orchestrator(backend, concurrency=concurrency), Orchestrator(backend)
    thread = threading.Thread(target=worker.run_forever, kwargs={"interval": 0.05})
    thread.start()
    SLOW_HOOK["started"].wait(30)  # type: ignore[attr-defined]
    slow_started = time.perf_counter()
    One.create_many(backend, [{}] * quick)
    created = time.perf_counter()
    while (reader.query(status="finished", name="One", limit=1, count=True).total or 0) < quick:
        time.sleep(0.02)
    done = time.perf_counter()
    still_running = not SLOW_HOOK["ended"].is_set()  # type: ignore[attr-defined]
    SLOW_HOOK["release"].set()  # type: ignore[attr-defined]
    worker.stop()
    thread.join()
    return {
        "quick_seconds": done - created,
        "quick_per_s": quick / (done - created),
        "slow_hook_running_at_end": still_running,
        "slow_hook_age_at_end_s": done - slow_started,
    }


def w1_batch(url: str, n: int, group: int = 100) -> dict[str, Any]:
    """W1 with the pipelines created by one ``create_many`` instead of one ``create`` each."""
    backend = from_url(url)
    cpu, started = time.process_time(), time.perf_counter()
    Three.create_many(backend, [{}] * n)
    created, created_cpu = time.perf_counter(), time.process_time()
    transitions = run_to_end(Orchestrator(backend, concurrency=1, group_commit=group))
    done, run_cpu, cpu = time.perf_counter(), time.process_time() - created_cpu, time.process_time() - cpu
    return {
        "create_per_s": n / (created - started),
        "transitions": transitions,
        "transitions_per_s": transitions / (done - created),
        "e2e_per_s": transitions / (done - started),
        "e2e_cpu_us": cpu / transitions * 1e6,
        "run_cpu_us": run_cpu / transitions * 1e6,  # the run phase's CPU, the creates left out
        "rss_mb": rss_mb(),
    }


def bulk_insert(backend: Any, records: list[Record]) -> None:
    """Setup only: many pipelines in one transaction (grouped by model for executemany)."""
    order = {"STEP": 0, "EVENT": 1, "PIPELINE": 2}
    Store(backend).insert_all(sorted(records, key=lambda r: order[r.MODEL]))


def w2_setup(url: str, waiting: int) -> dict[str, Any]:
    """WAITING pipelines not due for a day, and 10 due now."""
    backend = from_url(url)
    now = Orchestrator(backend).clock.now()
    later = now + timedelta(days=1)
    for start in range(0, waiting, 5000):
        records: list[Record] = []
        for _ in range(min(5000, waiting - start)):
            for record in build_records(Three, {}, now=now):
                if record.MODEL == "PIPELINE":
                    record.next_run_at = later  # type: ignore[attr-defined]
                records.append(record)
        bulk_insert(backend, records)
    for _ in range(10):
        Three.create(backend)
    return {"waiting": waiting, "due": 10}


def w2_pass(url: str) -> dict[str, Any]:
    """One pass of a fresh worker process: its time, its peak RSS, its threads."""
    import threading

    orchestrator = Orchestrator(url, concurrency=1)
    started = time.perf_counter()
    summary = orchestrator.execute_pipelines()
    took = time.perf_counter() - started
    assert summary.claimed == 10 and summary.finished == 10, summary
    return {"pass_ms": took * 1000, "rss_mb": rss_mb(), "threads": len(threading.enumerate())}


def dashboard_pages(url: str, runs: int = 15) -> dict[str, Any]:
    """The dashboard's pages over the store (a real ``prorch dashboard`` process): median
    milliseconds per request for the list (first page, a status filter, the next page) and a
    pipeline's page; the overview too, though it has no target (its counts are cached 5 s)."""
    import statistics
    import subprocess
    import urllib.request

    from tests.support.postgres import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "prorch", "-r", url, "dashboard", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                listing = json.loads(urllib.request.urlopen(base + "/api/pipelines?limit=50", timeout=60).read())
                break
            except OSError:
                time.sleep(0.1)
        uuid = listing["pipelines"][0]["uuid"]
        pages = {
            "list_ms": "/pipelines",
            "list_pending_ms": "/pipelines?status=pending",
            "list_next_ms": f"/pipelines?after={listing['next_after']}",
            "detail_ms": f"/pipelines/{uuid}",
            "overview_ms": "/",
        }
        result: dict[str, Any] = {"pipelines": listing["total"]}
        for name, path in pages.items():
            took = []
            for _ in range(runs):
                started = time.perf_counter()
                urllib.request.urlopen(base + path, timeout=60).read()
                took.append((time.perf_counter() - started) * 1000)
            result[name] = statistics.median(took)
        result["overview_first_ms"] = took[0]  # the overview's first request counts; the rest reuse it
        return result
    finally:
        server.terminate()
        server.wait()


def purge_stall(url: str, old: int) -> dict[str, Any]:
    """Retention under load: OLD finished pipelines 60 days old are purged by another process
    while this one runs passes of one quick transition each (batch_size 1, group_commit 1).
    The longest pass during the purge is the longest stall a worker saw."""
    import statistics
    import subprocess

    backend = from_url(url)
    now = Orchestrator(backend).clock.now()
    for start in range(0, old, 5000):
        records: list[Record] = []
        for _ in range(min(5000, old - start)):
            for record in build_records(Three, {}, now=now - timedelta(days=60)):
                if record.MODEL in ("PIPELINE", "STEP"):
                    record.status = Status.FINISHED  # type: ignore[attr-defined]
                records.append(record)
        bulk_insert(backend, records)
    One.create_many(backend, [{}] * 40_000)
    orchestrator = Orchestrator(backend, concurrency=1, batch_size=1, group_commit=1)

    def timed_pass() -> float:
        started = time.perf_counter()
        orchestrator.execute_pipelines()
        return (time.perf_counter() - started) * 1000

    baseline = [timed_pass() for _ in range(500)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    code = (
        "import json, sys, time; from datetime import timedelta; from prorch import Orchestrator; "
        "t = time.perf_counter(); s = Orchestrator(sys.argv[1]).purge(timedelta(days=30)); "
        "print(json.dumps({'purged': s.pipelines, 'batches': s.batches, "
        "'longest_batch_ms': s.longest_batch_seconds * 1000, 'purge_s': time.perf_counter() - t}))"
    )
    purger = subprocess.Popen([sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE, text=True)
    during = []
    while purger.poll() is None:
        during.append(timed_pass())
    purged = json.loads(purger.communicate()[0])
    return {
        **purged,
        "old": old,
        "passes_during": len(during),
        "baseline_p50_ms": statistics.median(baseline),
        "baseline_max_ms": max(baseline),
        "during_p50_ms": statistics.median(during) if during else None,
        "during_max_ms": max(during) if during else None,
    }


SQLITE_SECONDS = [0.0]  # time spent inside the SQLite library, for W3


def timed(call: Callable[..., Any], *args: Any) -> Any:
    started = time.perf_counter()
    try:
        return call(*args)
    finally:
        SQLITE_SECONDS[0] += time.perf_counter() - started


class TimedCursor(sqlite3.Cursor):
    def execute(self, *args: Any) -> Any:  # type: ignore[override]
        return timed(super().execute, *args)

    def executemany(self, *args: Any) -> Any:  # type: ignore[override]
        return timed(super().executemany, *args)


class TimedConnection(sqlite3.Connection):
    """Counts the time spent inside the SQLite library (statements, BEGIN, COMMIT)."""

    def cursor(self, factory: Any = TimedCursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)

    def execute(self, *args: Any) -> Any:  # type: ignore[override]
        return timed(super().execute, *args)

    def commit(self) -> None:
        timed(super().commit)


def w3(path: str, n: int) -> dict[str, Any]:
    backend = SQLBackend(f"sqlite:///{path}", connect_args={"factory": TimedConnection})
    for _ in range(n):
        Three.create(backend)
    SQLITE_SECONDS[0] = 0.0
    started = time.perf_counter()
    transitions = run_to_end(Orchestrator(backend, concurrency=1))
    total = time.perf_counter() - started
    return {
        "transitions": transitions,
        "total_us": total / transitions * 1e6,
        "sqlite_us": SQLITE_SECONDS[0] / transitions * 1e6,
        "engine_us": (total - SQLITE_SECONDS[0]) / transitions * 1e6,
    }


def w4_worker(url: str, done: Any, sleep: float) -> None:
    SLEEP["seconds"] = sleep
    orchestrator = Orchestrator(url, concurrency=1, batch_size=4)
    while not done.is_set():
        if orchestrator.execute_pipelines().claimed == 0:
            time.sleep(0.01)


def w4(url: str, n: int, workers: int, sleep: float = 0.010) -> dict[str, Any]:
    backend = from_url(url)
    for _ in range(n):
        Three.create(backend)
    orchestrator = Orchestrator(backend)
    done = multiprocessing.get_context("fork").Event()
    procs = [
        multiprocessing.get_context("fork").Process(target=w4_worker, args=(url, done, sleep)) for _ in range(workers)
    ]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    while orchestrator.list_pipelines(status=Status.PENDING):
        time.sleep(0.05)
    took = time.perf_counter() - started
    done.set()
    for proc in procs:
        proc.join(30)
    return {"workers": workers, "transitions_per_s": 3 * n / took, "seconds": took}


def w5(url: str, n: int, concurrency: int, kind: str) -> dict[str, Any]:
    """N pipelines of 3 steps whose hooks wait 50 ms each, one worker at ``concurrency``."""
    import threading

    backend = from_url(url)
    IO_PIPELINES[kind].create_many(backend, [{}] * n)
    with Orchestrator(backend, concurrency=concurrency, batch_size=concurrency) as orchestrator:
        started = time.perf_counter()
        transitions = run_to_end(orchestrator)
        took = time.perf_counter() - started
        threads = len(threading.enumerate())
    finished = len(Orchestrator(backend).list_pipelines(status="finished"))
    assert finished == n, f"only {finished} of {n} finished"
    ideal = 3 * n * IO_SECONDS / concurrency
    return {
        "transitions_per_s": transitions / took,
        "seconds": took,
        "ideal_seconds": ideal,
        "rss_mb": rss_mb(),
        "threads": threads,
    }


def floor(url: str, n: int, group: int) -> dict[str, Any]:
    """The floor under W1: the engine's own statement stream of W1's run phase (N pipelines
    made by ``create_many``, ``group`` transitions per commit), recorded at the driver and
    replayed with the raw driver on a copy of the store taken before the run, with the same
    settings (``tests/benchmarks/replay.py``). Both timed in this process, one after the other."""
    sqlite = url.startswith("sqlite")
    if sqlite:
        backend: Any = SQLBackend(url, connect_args={"factory": replay.SQLiteConnection})
    else:
        connection_class, cursor_class = replay.recording_psycopg()
        backend = SQLBackend(url, creator=lambda: connection_class.connect(url, cursor_factory=cursor_class))
    Three.create_many(backend, [{}] * n)
    copy, pragmas = _copy_store(backend, url)
    orchestrator = Orchestrator(backend, concurrency=1, group_commit=group)
    orchestrator.list_pipelines(status="finished")  # the pool's connections made before the clock
    replay.RECORDING[0] = True
    cpu, started = time.process_time(), time.perf_counter()
    transitions = run_to_end(orchestrator)
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    replay.RECORDING[0] = False
    backend.dispose()
    raw, raw_cpu = replay.replay_sqlite(copy, pragmas) if sqlite else replay.replay_postgresql(copy)
    check = SQLBackend(f"sqlite:///{copy}" if sqlite else copy, migrate=False)
    finished = len(Orchestrator(check).list_pipelines(status="finished"))
    assert finished == n, f"the replay finished {finished} of {n} pipelines"
    kinds = [event[1] for event in replay.STREAM]
    return {
        "transitions": transitions,
        "statements": kinds.count("execute") + kinds.count("executemany"),
        "commits": kinds.count("commit") + sum(1 for e in replay.STREAM if e[1] == "execute" and e[2] == "COMMIT"),
        "pragmas": pragmas,
        "engine_per_s": transitions / took,
        "engine_us": took / transitions * 1e6,
        "engine_cpu_us": cpu / transitions * 1e6,
        "transitions_per_s": transitions / raw,
        "us_per_transition": raw / transitions * 1e6,
        "raw_cpu_us": raw_cpu / transitions * 1e6,
    }


def _copy_store(backend: Any, url: str) -> tuple[str, list[str]]:
    """A copy of the store as it is now (the SQLite file, or a PostgreSQL database made from
    it as a template), and the SQLite PRAGMAs the engine's connections run with."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///").split("?")[0]
        with backend.engine.connect() as connection:
            dbapi = connection.connection.driver_connection
            dbapi.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            names = ("journal_mode", "synchronous", "wal_autocheckpoint", "journal_size_limit", "busy_timeout")
            pragmas = [f"PRAGMA {name}={dbapi.execute(f'PRAGMA {name}').fetchone()[0]}" for name in names]
            copy = sqlite3.connect(f"{path}.replay")
            dbapi.backup(copy)
            copy.close()
        return f"{path}.replay", pragmas
    from sqlalchemy import create_engine, text

    backend.dispose()
    base, name = url.rsplit("/", 1)
    admin = create_engine(f"postgresql+psycopg://{base.split('://', 1)[1]}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}_replay TEMPLATE {name}"))
    admin.dispose()
    return f"{base}/{name}_replay", []


HOOKS: dict[str, list[float]] = {"fan_in": [], "drain": []}


class FanOut(OnStartMixin, OnContinueMixin, Step):
    """Starts N children, then on every wake-up reads every child's result until all are in."""

    name = "FanOut"

    def on_start(self) -> None:
        self.metadata["kids"] = [self.start_child(Kid, {}, key=str(i)) for i in range(self.params["n"])]

    def on_continue(self) -> None:
        started = time.perf_counter()
        results = [self.child_result(kid) for kid in self.metadata["kids"]]
        HOOKS["fan_in"].append(time.perf_counter() - started)
        self.finish() if None not in results else self.wait(seconds=86400)


class Drain(OnStartMixin, OnContinueMixin, Step):
    """Waits for its messages, then receives every one in one hook."""

    name = "Drain"

    def on_start(self) -> None:
        self.wait(seconds=86400)

    def on_continue(self) -> None:
        started, received = time.perf_counter(), 0
        while self.receive("job") is not None:
            received += 1
        HOOKS["drain"].append(time.perf_counter() - started)
        self.finish(received)


class Answer(OnStartMixin, Step):
    name = "Answer"

    def on_start(self) -> None:
        self.finish(42)


Kid = register_pipeline(type("Kid", (Pipeline,), {"name": "Kid", "steps": [register_step(Answer)]}))
Parent = register_pipeline(type("Parent", (Pipeline,), {"name": "Parent", "steps": [register_step(FanOut)]}))
Inbox = register_pipeline(type("Inbox", (Pipeline,), {"name": "Inbox", "steps": [register_step(Drain)]}))


def children(url: str, n: int) -> dict[str, Any]:
    """Issue #25: a parent starts N children in one hook; they finish, each end wakes it, and
    each of its wake-ups reads every child's result (``child_result`` N times)."""
    orchestrator = Orchestrator(url, batch_size=1000)
    parent = Parent.create(url, {"n": n})
    started = time.perf_counter()
    run_to_end(orchestrator)
    took = time.perf_counter() - started
    assert orchestrator.get(parent.uuid).pipeline.status == Status.FINISHED
    fan_in = HOOKS["fan_in"]
    return {"n": n, "total_s": took, "wakeups": len(fan_in), "last_fan_in_s": fan_in[-1], "max_fan_in_s": max(fan_in)}


def drain(url: str, n: int) -> dict[str, Any]:
    """Issue #25: N messages sent to a waiting pipeline, then one hook receives them all."""
    orchestrator = Orchestrator(url)
    inbox = Inbox.create(url, {})
    orchestrator.execute_pipelines()  # it waits
    started = time.perf_counter()
    for i in range(n):
        orchestrator.send(inbox.uuid, "job", {"i": i})
    sent = time.perf_counter() - started
    orchestrator.execute_pipelines()
    assert orchestrator.result(inbox.uuid) == n
    return {"n": n, "send_s": sent, "drain_s": HOOKS["drain"][-1]}


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    commands: dict[str, Callable[[], dict[str, Any]]] = {
        "w1": lambda: w1(args[0], int(args[1]), *map(int, args[2:])),
        "w1_loop": lambda: w1_loop(args[0], int(args[1]), args[2], *map(int, args[3:])),
        "w1_worker": lambda: w1_worker(args[0], int(args[1]), *map(int, args[2:])),
        "w1_batch": lambda: w1_batch(args[0], int(args[1]), *map(int, args[2:])),
        "floor": lambda: floor(args[0], int(args[1]), int(args[2])),
        "w2_setup": lambda: w2_setup(args[0], int(args[1])),
        "w2_pass": lambda: w2_pass(args[0]),
        "w3": lambda: w3(args[0], int(args[1])),
        "w4": lambda: w4(args[0], int(args[1]), int(args[2]), *map(float, args[3:])),
        "w4_slots": lambda: w4_slots(args[0], int(args[1]), *map(int, args[2:])),
        "head_of_line": lambda: head_of_line(args[0], *map(int, args[1:2]), *map(float, args[2:3])),
        "w5": lambda: w5(args[0], int(args[1]), int(args[2]), args[3]),
        "dashboard_pages": lambda: dashboard_pages(args[0]),
        "purge_stall": lambda: purge_stall(args[0], int(args[1])),
        "w1_observed": lambda: w1_observed(args[0], int(args[1]), args[2]),
        "children": lambda: children(args[0], int(args[1])),
        "drain": lambda: drain(args[0], int(args[1])),
    }
    print(json.dumps(commands[name]()))
