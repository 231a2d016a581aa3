"""Bulk retry of N failed pipelines while a worker runs (#29), by hand, never in the test suite:

    PYTHONPATH=$PWD python tests/benchmarks/bulk_retry.py --n 10000 --kind both --output /tmp/bulk.json

For each store (a SQLite file, WAL, ``synchronous=FULL``; a throwaway durable PostgreSQL server,
fsync on): N pipelines of ``bulk_app.BulkFlakes`` (one step, ``max_attempts = 1``, whose hook
fails while a marker file is absent), all failed by passes in this process; then a real
``prorch worker`` process is started and left idle, the marker created, and
``Orchestrator.bulk("retry", Filters(status="failed"))`` run here (default batch size) while
the worker runs the retried pipelines. Measured: the bulk call's wall time and retries a
second, how many the worker had finished when it returned, and the time from the call to the
last pipeline finished (a count polled every 0.2 s). Checked, none lost or doubled: the bulk
summary (all retried, none skipped or failed), every pipeline finished, and per pipeline
exactly one ``pipeline.retried``, one ``step.failed`` and one ``step.finished`` event in the
store, and exactly one hook call before the marker and one after it (the hook's log). Prints
a summary and writes JSON to ``--output`` (never docs/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bulk_app  # noqa: E402

from prorch import Orchestrator  # noqa: E402
from prorch.bulk import Filters, count  # noqa: E402
from repositories import from_url  # noqa: E402
from repositories.schema import events  # noqa: E402
from tests.support.processes import PRORCH, child_env  # noqa: E402

EVENTS = ("pipeline.retried", "step.failed", "step.finished")
POLL = 0.2


def fail_all(url: str, n: int) -> float:
    """Create N pipelines and run passes here until all have failed; the seconds it took."""
    started = time.perf_counter()
    bulk_app.BulkFlakes.create_many(url, [{"i": i} for i in range(n)])
    with Orchestrator(url, batch_size=1000) as orchestrator:
        for _ in range(10 * (n // 1000 + 1)):
            if count(orchestrator, Filters(status="failed")) == n:
                return time.perf_counter() - started
            orchestrator.execute_pipelines()
        raise RuntimeError(f"only {count(orchestrator, Filters(status='failed'))} of {n} failed")


@contextlib.contextmanager
def worker_process(url: str, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A ``prorch worker`` with default settings, registered and idle before it is handed out."""
    env = child_env(BULK_LOG=str(folder / "hooks.log"), BULK_FIXED=str(folder / "fixed"))
    env["PYTHONPATH"] = f"{HERE}:{env['PYTHONPATH']}"
    command = [PRORCH, "-r", url, "--app", "bulk_app", "worker"]
    with (folder / "worker.log").open("wb") as output:
        proc = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            orchestrator = Orchestrator(url)
            deadline = time.monotonic() + 60
            while not orchestrator.store.workers():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((folder / "worker.log").read_text()[-2000:])
                time.sleep(0.1)
            orchestrator.close()
            time.sleep(1.0)  # idle, listening
            yield proc
        finally:
            proc.terminate()
            proc.wait(60)


class Finishing:
    """Polls the count of finished pipelines from its own connection; notes when it reached n."""

    def __init__(self, url: str, n: int, started: float) -> None:
        self.orchestrator = Orchestrator(url)
        self.n, self.started = n, started
        self.done_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set():
            if count(self.orchestrator, Filters(status="finished")) >= self.n:
                self.done_at = time.perf_counter() - self.started
                return
            time.sleep(POLL)

    def wait(self, timeout: float) -> float | None:
        self.thread.join(timeout)
        self.stop.set()
        self.thread.join()
        self.orchestrator.close()
        return self.done_at


def event_counts(url: str) -> dict[str, Counter[int]]:
    """Per event type: how many pipelines have it 0, 1, 2... times (read from the store)."""
    backend = from_url(url)
    query = (
        select(events.c.pipeline_uuid, events.c.type, func.count())
        .where(events.c.type.in_(EVENTS))
        .group_by(events.c.pipeline_uuid, events.c.type)
    )
    with backend.engine.connect() as connection:
        rows = connection.execute(query).all()
    backend.dispose()
    return {kind: Counter(n for _, t, n in rows if t == kind) for kind in EVENTS}


def hook_calls(log: Path) -> dict[str, Counter[int]]:
    """Per outcome (fail: before the marker, ok: after): how many pipelines the hook ran it for
    0, 1, 2... times."""
    calls: Counter[tuple[str, str]] = Counter()
    for line in log.read_text().splitlines():
        uuid, outcome = line.split()
        calls[(uuid, outcome)] += 1
    return {outcome: Counter(n for (_, o), n in calls.items() if o == outcome) for outcome in ("fail", "ok")}


def measure(url: str, n: int, folder: Path) -> dict[str, Any]:
    os.environ["BULK_LOG"] = str(folder / "hooks.log")
    os.environ["BULK_FIXED"] = str(folder / "fixed")
    from_url(url)  # the schema, before the worker and this process race to make it
    logging.getLogger("prorch").setLevel(logging.ERROR)  # not a line per failed hook
    failing = fail_all(url, n)
    print(f"  {n} failed in {failing:.1f} s", flush=True)
    with worker_process(url, folder) as proc:
        (folder / "fixed").touch()
        orchestrator = Orchestrator(url)
        started = time.perf_counter()
        finishing = Finishing(url, n, started)
        summary = orchestrator.bulk("retry", Filters(status="failed"))
        took = time.perf_counter() - started
        finished_then = count(orchestrator, Filters(status="finished"))
        done_at = finishing.wait(timeout=max(600.0, 20 * took))
        finished = count(orchestrator, Filters(status="finished"))
        failed = count(orchestrator, Filters(status="failed"))
        orchestrator.close()
        alive = proc.poll() is None
    per_event = event_counts(url)
    per_hook = hook_calls(folder / "hooks.log")
    exactly_once = {1: n} if n else {}
    checks = {
        "bulk summary: all retried, none skipped or failed": summary.done == n == summary.matched
        and summary.skipped == 0
        and summary.failed == 0,
        "every pipeline finished": finished == n and failed == 0,
        "the worker was running throughout": alive,
        **{f"one {kind} event per pipeline": dict(per_event[kind]) == exactly_once for kind in EVENTS},
        **{f"one hook call ({o}) per pipeline": dict(per_hook[o]) == exactly_once for o in ("fail", "ok")},
    }
    return {
        "n": n,
        "failing phase s": round(failing, 2),
        "bulk call s": round(took, 2),
        "retries/s": round(n / took, 1),
        "finished by the worker when the call returned": finished_then,
        "s from the call to all finished": round(done_at, 2) if done_at is not None else None,
        "summary": {"matched": summary.matched, "done": summary.done, "skipped": summary.skipped,
                    "failed": summary.failed, "errors": dict(list(summary.errors.items())[:5])},
        "events per pipeline": {k: dict(v) for k, v in per_event.items()},
        "hook calls per pipeline": {k: dict(v) for k, v in per_hook.items()},
        "checks": checks,
        "ok": all(checks.values()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000, help="failed pipelines to retry")
    parser.add_argument("--kind", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--output", required=True, help="a JSON file for the results (not in docs/)")
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.kind == "both" else [args.kind]
    results: dict[str, Any] = {}
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="prorch-bulk-") as name:
            folder = Path(name)
            print(f"{kind}, N={args.n}:", flush=True)
            if kind == "sqlite":
                results[kind] = measure(f"sqlite:///{folder / 'bulk.db'}", args.n, folder)
            else:
                from tests.support.postgres import remove, start_server

                server = start_server(durable=True)
                try:
                    results[kind] = measure(server.url, args.n, folder)
                finally:
                    remove(server)
        for key, value in results[kind].items():
            print(f"  {key}: {value}", flush=True)
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))
    if not all(r["ok"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
