"""Wake-up latency of an idle worker (#27 item 2), by hand, never in the test suite:

    python tests/benchmarks/wakeups.py --output /tmp/wakeups.md [--samples 200] [--interval 30]

- PostgreSQL (a throwaway durable server, as run.py starts it), an idle ``prorch worker`` in its
  own process: ``create()`` in this process -> the first hook started, and ``send()`` -> the
  waiting step running again.
- SQLite, the worker in this process (``run_forever`` in a thread): ``create()`` -> first hook.
- SQLite, the worker in another process: ``create()`` -> first hook, at the default ``wake_poll``.
- ``--only paced``: PostgreSQL, one worker process, ``--rate`` creates a second (200 by
  default) offered by 4 threads for ``--seconds``: ``create()`` -> first hook under load.

Every worker polls every ``--interval`` seconds (30 by default), so what is measured is the
wake-up, not the poll. Each hook writes the moment it started (``time.time()``) to a file
(``tests/integration/wake_app.py``); the samples are spaced so that the worker is idle again.
Prints and writes p50 / p90 / p99 in milliseconds, from the call (create, send) and from its
return (its commit visible to the worker).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prorch import Orchestrator  # noqa: E402
from repositories import from_url  # noqa: E402
from tests.integration import wake_app  # noqa: E402
from tests.support.postgres import remove, start_server  # noqa: E402
from tests.support.processes import PRORCH, child_env  # noqa: E402

SPACING = 0.15
"""Seconds between samples: the pass a hook's own release wakes is over by then."""


def stamp_of(log: Path, uuid: str, what: str, timeout: float = 60.0) -> float:
    path = log / f"{uuid}.{what}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text:
            return float(text)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} of {uuid} within {timeout}s")
        time.sleep(0.0005)


@contextlib.contextmanager
def worker_process(url: str, log: Path, interval: float, concurrency: int | None = None) -> Iterator[None]:
    command = [PRORCH, "-r", url, "--app", "tests.integration.wake_app", "worker", "--interval", str(interval)]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    with (log / "worker.log").open("wb") as output:
        proc = subprocess.Popen(command, env=child_env(WAKE_LOG=str(log)), stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not Orchestrator(url).store.workers():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((log / "worker.log").read_text()[-2000:])
                time.sleep(0.1)
            time.sleep(2.0)  # idle, listening
            yield
        finally:
            proc.terminate()
            proc.wait(30)


def creates(url: str, log: Path, samples: int) -> tuple[list[float], list[float]]:
    """Milliseconds from create() called, and from create() returned (its commit visible), to
    the first hook, one pipeline at a time."""
    called, returned = [], []
    for _ in range(samples):
        started = time.time()
        created = wake_app.Stamp.create(url, {})
        done = time.time()
        hook = stamp_of(log, created.uuid, "start")
        called.append((hook - started) * 1000)
        returned.append((hook - done) * 1000)
        time.sleep(SPACING)
    return called, returned


def sends(url: str, log: Path, samples: int) -> tuple[list[float], list[float]]:
    """Milliseconds from send() called, and returned, to the waiting step's hook."""
    orchestrator = Orchestrator(url)
    parked = []
    for _ in range(samples):
        created = wake_app.Mailbox.create(url, {})
        stamp_of(log, created.uuid, "parked")
        parked.append(created.uuid)
    time.sleep(1.0)
    called, returned = [], []
    for uuid in parked:
        started = time.time()
        orchestrator.send(uuid, "go")
        done = time.time()
        hook = stamp_of(log, uuid, "go")
        called.append((hook - started) * 1000)
        returned.append((hook - done) * 1000)
        time.sleep(SPACING)
    return called, returned


def same_process(url: str, samples: int, interval: float) -> tuple[list[float], list[float]]:
    """Milliseconds from create() to the first hook, the worker a thread of this process."""
    log = Path(os.environ["WAKE_LOG"])
    orchestrator = Orchestrator(url)
    thread = threading.Thread(target=orchestrator.run_forever, kwargs={"interval": interval}, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        return creates(url, log, samples)
    finally:
        orchestrator.stop()
        thread.join(30)


def paced(url: str, log: Path, rate: float, seconds: float, creators: int = 4) -> tuple[list[float], list[float]]:
    """Milliseconds from create() called, and returned, to the first hook, with ``rate``
    pipelines a second offered for ``seconds`` by ``creators`` threads, each on its own
    schedule (a late create does not shift the next): pickup under load, not idle wake-ups."""
    made: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    per_thread = rate / creators
    count = int(per_thread * seconds)

    def create_some(offset: float) -> None:
        backend = from_url(url)
        start = time.monotonic() + offset
        for i in range(count):
            delay = start + i / per_thread - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            called = time.time()
            created = wake_app.Stamp.create(backend, {})
            with lock:
                made.append((created.uuid, called, time.time()))

    threads = [threading.Thread(target=create_some, args=(n / rate,)) for n in range(creators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    called_ms, returned_ms = [], []
    for uuid, called, returned in made:
        hook = stamp_of(log, uuid, "start", timeout=120)
        called_ms.append((hook - called) * 1000)
        returned_ms.append((hook - returned) * 1000)
    return called_ms, returned_ms


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    return f"{p50:.1f} / {p90:.1f} / {p99:.1f}"


def measured(name: str, run: Callable[[], tuple[list[float], list[float]]], rows: list[str]) -> None:
    called, returned = run()
    row = f"| {name} | {len(called)} | {percentiles(called)} | {percentiles(returned)} |"
    print(row, flush=True)
    rows.append(row)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True, help="markdown rows are written here (not docs/)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--only", choices=["postgresql", "sqlite", "paced"], default=None)
    parser.add_argument("--rate", type=float, default=200.0, help="pipelines a second offered, for paced")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long the paced load lasts")
    parser.add_argument("--concurrency", type=int, default=None, help="the paced worker's (default: prorch's)")
    args = parser.parse_args()
    rows = [
        "| idle worker, interval 30 s | samples | from the call: p50 / p90 / p99 ms | from its return |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="prorch-wake-") as folder:
        base = Path(folder)
        if args.only in (None, "postgresql"):
            server = start_server(durable=True)
            try:
                url = server.url  # the server's own database: one store
                from_url(url)
                log = base / "pg"
                log.mkdir()
                with worker_process(url, log, args.interval):
                    measured(
                        "PostgreSQL: create() -> first hook (other process)",
                        lambda: creates(url, log, args.samples),
                        rows,
                    )
                    measured("PostgreSQL: send() -> waiting step runs", lambda: sends(url, log, args.samples), rows)
            finally:
                remove(server)
        if args.only in (None, "paced"):
            server = start_server(durable=True)
            try:
                url = server.url
                from_url(url)
                log = base / "paced"
                log.mkdir()
                with worker_process(url, log, args.interval, args.concurrency):
                    shown = f", concurrency {args.concurrency}" if args.concurrency else ""
                    measured(
                        f"PostgreSQL: {args.rate:g} creates/s offered for {args.seconds:g} s{shown} -> first hook",
                        lambda: paced(url, log, args.rate, args.seconds),
                        rows,
                    )
            finally:
                remove(server)
        if args.only in (None, "sqlite"):
            url = f"sqlite:///{base / 'same.db'}"
            log = base / "same"
            log.mkdir()
            os.environ["WAKE_LOG"] = str(log)
            measured(
                "SQLite: create() -> first hook (same process)",
                lambda: same_process(url, args.samples, args.interval),
                rows,
            )
            url = f"sqlite:///{base / 'other.db'}"
            from_url(url)
            log = base / "other"
            log.mkdir()
            with worker_process(url, log, args.interval):
                measured(
                    "SQLite: create() -> first hook (other process, wake_poll 0.2 s)",
                    lambda: creates(url, log, args.samples),
                    rows,
                )
    Path(args.output).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
