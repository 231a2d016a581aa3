"""The claim's cost per pass against the due backlog (#28 item 3): a claim should read only the
rows it takes, so a pass over 100,000 due pipelines costs about what one over 1,000 does.

    PYTHONPATH=$PWD python tests/benchmarks/claim_cost.py                  # SQLite and PostgreSQL
    PYTHONPATH=$PWD python tests/benchmarks/claim_cost.py --backends sqlite --sizes 1000 100000

For each backend and backlog size: a fresh store with that many due pipelines (three priorities,
every one due,
of three names), then ``--passes`` claims of ``--batch`` each, timed one by one; between two
claims, untimed, the claimed pipelines are released to the back of the queue (still due), as a
pass that moves them on would, so the backlog stays the same size. Prints the median claim in
milliseconds, plain and limited (a ``max_running`` on one of the three names: the limited claim's
path). ``--pause P0`` pauses one of the three names first (issue #29: the claim leaves out the
paused third). SQLite at its default (WAL, ``synchronous=FULL``), PostgreSQL a durable server
(``fsync=on``, ``synchronous_commit=on``), as in ``run.py``. Run it by hand; the test suite never
asserts timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import insert, update

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prorch.model.limit_rules import ClaimLimit  # noqa: E402
from prorch.model.pauses import make_pause  # noqa: E402
from prorch.model.records import new_uuid  # noqa: E402
from prorch.storage.store import Store  # noqa: E402
from repositories import from_url  # noqa: E402
from repositories.schema import pipelines  # noqa: E402

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
NAMES = ("P0", "P1", "P2")
RUNNABLE = frozenset({(name, 1) for name in NAMES} | {("Absent", 1), ("Absent", 2)})
"""What the worker claims: its registered classes (the engine always passes them)."""


def fill(backend: Any, size: int) -> None:
    """``size`` due pending pipelines, written straight into the table (a benchmark's setup)."""
    rows = [
        {
            "uuid": new_uuid(), "name": f"P{i % len(NAMES)}", "version": 1, "status": "pending", "params": {},
            "context": {}, "metadata": {}, "priority": i % 3, "created_at": NOW, "updated_at": NOW, "claims": 0,
            "next_run_at": NOW - timedelta(hours=2) + timedelta(microseconds=i), "revision": 0,
            "cancel_requested": False, "hook_shared": False, "crashes": 0,
        }
        for i in range(size)
    ]  # fmt: skip
    with backend.engine.begin() as connection:
        for start in range(0, size, 5_000):
            connection.execute(insert(pipelines), rows[start : start + 5_000])
    with backend.engine.connect() as connection:
        if backend.engine.dialect.name == "postgresql":
            connection.exec_driver_sql("ANALYZE pipelines")
        else:
            connection.exec_driver_sql("ANALYZE")
        connection.commit()


def release(backend: Any, uuids: list[str], back: datetime) -> None:
    """The claimed pipelines unleased and due again, behind the others of their priority."""
    c = pipelines.c
    query = update(pipelines).where(c.uuid.in_(uuids)).values(lease_owner=None, lease_expires_at=None, next_run_at=back)
    with backend.engine.begin() as connection:
        connection.execute(query)


def measure(url: str, size: int, passes: int, batch: int, limited: bool, paused: str | None = None) -> float:
    backend = from_url(url)
    store = Store(backend)
    fill(backend, size)
    if paused is not None:  # a third of the backlog paused: the claim walks past it
        store.add_pause(make_pause(name=paused, since=NOW))
    limits = {"P0": ClaimLimit(max_running=10 * batch)} if limited else {}
    took: list[float] = []
    for number in range(passes):
        started = time.perf_counter()
        claimed = store.claim_due(NOW, f"w{number}", NOW + timedelta(minutes=5), batch, limits, RUNNABLE)
        took.append(time.perf_counter() - started)
        assert len(claimed) == batch, len(claimed)
        release(backend, [p.uuid for p in claimed], NOW - timedelta(seconds=passes - number))
    backend.dispose()
    return statistics.median(took) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000, 100_000])
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--pause", metavar="NAME", help="Pause this class (P0, P1 or P2) first.")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    server = None
    folder = Path(tempfile.mkdtemp(prefix="prorch-claim-"))
    try:
        for kind in args.backends:
            for size in args.sizes:
                for limited in (False, True):
                    if kind == "sqlite":
                        url = f"sqlite:///{folder / f'{size}-{limited}.db'}"
                    else:
                        from tests.benchmarks.run import fresh_pg_url
                        from tests.support.postgres import start_server

                        server = server or start_server(durable=True)  # fsync on, as run.py's
                        url = fresh_pg_url(server)
                    ms = measure(url, size, args.passes, args.batch, limited, args.pause)
                    key = f"{kind} {'limited' if limited else 'plain'} N={size}"
                    results[key] = round(ms, 2)
                    print(f"{key}: {ms:.2f} ms a claim of {args.batch}", flush=True)
    finally:
        if server is not None:
            from tests.support.postgres import remove

            remove(server)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
