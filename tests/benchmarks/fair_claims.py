"""Fair claims (#30 item 2): one tenant's backlog against another tenant's few pipelines.

    PYTHONPATH=$PWD python tests/benchmarks/fair_claims.py --output /tmp/fair.json
    PYTHONPATH=$PWD python tests/benchmarks/fair_claims.py --backends sqlite --backlog 100000 --output /tmp/fair.json

For each backend: a fresh store where tenant "big" has ``--backlog`` due pipelines of one class,
then tenant "small" ``--few`` created after them. Claims of ``--batch`` follow one another as a
worker's would, each claimed pipeline marked finished before the next claim (it ran), until all
of small's have been claimed, or ``--most`` claims. Measured twice: the class without ``fair``
(the plain claim: claim order, so small waits behind the whole backlog) and with ``fair = True``
(the claim takes the tenants in turn). Printed: in which claim small's first and last pipelines
were taken, the milliseconds from the first claim to those, and the median claim (of at least
``--cost`` claims, going on through the backlog after small's were taken). A run of
``--most`` claims that never reached small says so ("not within"). Run it by hand; the test
suite never asserts timings. The results go to ``--output`` (JSON), never to docs/.
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

from prorch.model.limit_rules import ClaimLimit, Fairness, key_text  # noqa: E402
from prorch.model.records import new_uuid  # noqa: E402
from prorch.storage.store import Store  # noqa: E402
from repositories import from_url  # noqa: E402
from repositories.schema import pipelines  # noqa: E402

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
NAME = "Render"
RUNNABLE = frozenset({(NAME, 1)})


def fill(backend: Any, backlog: int, few: int) -> list[str]:
    """``backlog`` due pipelines of tenant big, then ``few`` of tenant small due after them all,
    stored as ``create`` stores them (the tenant as the concurrency key); small's uuids."""

    def row(i: int, tenant: str) -> dict[str, Any]:
        return {
            "uuid": new_uuid(), "name": NAME, "version": 1, "status": "pending", "params": {},
            "context": {"tenant": tenant}, "metadata": {}, "priority": 0, "created_at": NOW, "updated_at": NOW,
            "claims": 0, "next_run_at": NOW - timedelta(hours=2) + timedelta(microseconds=i), "revision": 0,
            "cancel_requested": False, "hook_shared": False, "crashes": 0, "concurrency_key": key_text(tenant),
        }  # fmt: skip

    rows = [row(i, "big") for i in range(backlog)] + [row(backlog + i, "small") for i in range(few)]
    with backend.engine.begin() as connection:
        for start in range(0, len(rows), 5_000):
            connection.execute(insert(pipelines), rows[start : start + 5_000])
    with backend.engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE pipelines" if backend.engine.dialect.name == "postgresql" else "ANALYZE")
        connection.commit()
    return [r["uuid"] for r in rows[backlog:]]


def finish(backend: Any, uuids: list[str]) -> None:
    """The claimed pipelines ran: finished, unleased (not due any more)."""
    c = pipelines.c
    query = (
        update(pipelines).where(c.uuid.in_(uuids)).values(status="finished", lease_owner=None, lease_expires_at=None)
    )
    with backend.engine.begin() as connection:
        connection.execute(query)


def measure(url: str, backlog: int, few: int, batch: int, most: int, fair: bool, cost: int) -> dict[str, Any]:
    backend = from_url(url)
    store = Store(backend)
    small = set(fill(backend, backlog, few))
    limits = {NAME: ClaimLimit(fair=Fairness())} if fair else {}
    took: list[float] = []
    first = last = None
    started = time.perf_counter()
    for number in range(1, most + 1):
        before = time.perf_counter()
        claimed = store.claim_due(NOW, f"w{number}", NOW + timedelta(minutes=5), batch, limits, RUNNABLE)
        took.append(time.perf_counter() - before)
        taken = {p.uuid for p in claimed} & small
        if taken and first is None:
            first = (number, (time.perf_counter() - started) * 1000)
        small -= taken
        if not small and last is None:
            last = (number, (time.perf_counter() - started) * 1000)
        if last is not None and number >= cost:
            break
        finish(backend, [p.uuid for p in claimed])
    backend.dispose()
    return {
        "first claim with small's": first[0] if first else f"not within {most}",
        "ms to it": round(first[1], 1) if first else None,
        "claim with small's last": last[0] if last else f"not within {most}",
        "ms to it (last)": round(last[1], 1) if last else None,
        "median claim ms": round(statistics.median(took) * 1000, 2),
        "claims": len(took),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--few", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--most", type=int, default=1_100, help="claims at most (the backlog is backlog/batch)")
    parser.add_argument("--modes", nargs="+", choices=["plain", "fair"], default=["plain", "fair"])
    parser.add_argument("--cost", type=int, default=30, help="claims at least, for the median claim")
    parser.add_argument("--output", required=True, help="a JSON file for the results (not in docs/)")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    server = None
    folder = Path(tempfile.mkdtemp(prefix="prorch-fair-"))
    try:
        for kind in args.backends:
            for fair in [mode == "fair" for mode in args.modes]:
                if kind == "sqlite":
                    url = f"sqlite:///{folder / f'{fair}.db'}"
                else:
                    from tests.benchmarks.run import fresh_pg_url
                    from tests.support.postgres import start_server

                    server = server or start_server()
                    url = fresh_pg_url(server)
                key = f"{kind} {'fair' if fair else 'plain'} backlog={args.backlog} few={args.few} batch={args.batch}"
                results[key] = measure(url, args.backlog, args.few, args.batch, args.most, fair, args.cost)
                print(f"{key}: {results[key]}", flush=True)
    finally:
        if server is not None:
            from tests.support.postgres import remove

            remove(server)
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
