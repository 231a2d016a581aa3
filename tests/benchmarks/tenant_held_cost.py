"""What telling a full tenant's due pipelines apart from ``due`` would cost the overview's due
count (#29, the limit of item 4 kept): a probe on SQLite with the pipelines table's columns and
indexes that matter here (``ix_pipelines_status_name``, ``ix_pipelines_concurrency_key``), not
prorch's store.

    python tests/benchmarks/tenant_held_cost.py [--rows 300000]

Prints the due count's best-of-5 milliseconds as it is now (a held class by name), and with the
pipelines of 10 or 100 full tenants of one class left out, by the stored key and by the tenant
in the JSON context; and the count of those held pipelines from the key's index. Measured
2026-12-05 (2 shared cores, 300,000 rows, three runs): 109-118 ms now; with 10 or 100 full
tenants left out 140-197 ms by key (+28-38%, +65% in one noisy run) and 194-204 ms by JSON
(+73-81%); the held ones alone 1.6-27 ms from the key's index. Run it by hand; the suite never
asserts timings."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time

DUE = (
    "status = 'pending' AND (lease_expires_at IS NULL OR lease_expires_at <= ?) "
    "AND (next_run_at IS NULL OR next_run_at <= ?) AND name NOT IN ('Held')"
)


def store(rows: int) -> sqlite3.Connection:
    """``rows`` due pipelines of two classes over 500 tenants."""
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE pipelines (uuid TEXT PRIMARY KEY, name TEXT, status TEXT, next_run_at TEXT,"
        " lease_expires_at TEXT, context TEXT, created_at TEXT, concurrency_key TEXT)"
    )
    db.execute("CREATE INDEX ix_pipelines_status_name ON pipelines (status, name)")
    db.execute("CREATE INDEX ix_pipelines_concurrency_key ON pipelines (name, status, concurrency_key, next_run_at)")
    made = (
        (f"u{i}", "Sync" if i % 2 else "Other", "pending", "2026-01-01", None,
         json.dumps({"tenant": f"t{i % 500}"}), f"{i:08d}", json.dumps(f"t{i % 500}"))
        for i in range(rows)
    )  # fmt: skip
    db.executemany("INSERT INTO pipelines VALUES (?, ?, ?, ?, ?, ?, ?, ?)", made)
    return db


def best_ms(db: sqlite3.Connection, where: str) -> tuple[int, float]:
    """The count and its best time of 5."""
    best, count = float("inf"), 0
    for _ in range(5):
        started = time.perf_counter()
        count = db.execute(f"SELECT count(*) FROM pipelines WHERE {where}", ("2026-06-01", "2026-06-01")).fetchone()[0]
        best = min(best, time.perf_counter() - started)
    return count, round(best * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    db = store(parser.parse_args().rows)
    print("due now", best_ms(db, DUE))
    for held in (10, 100):
        keys = ", ".join(f"'{json.dumps(f't{k}')}'" for k in range(held))
        tenants = ", ".join(f"'t{k}'" for k in range(held))
        by_key = f"NOT (name = 'Sync' AND concurrency_key IN ({keys}))"
        by_json = f"(name <> 'Sync' OR json_extract(context, '$.tenant') NOT IN ({tenants}))"
        print(f"due, {held} full tenants left out by key", best_ms(db, f"{DUE} AND {by_key}"))
        print(f"due, {held} full tenants left out by JSON", best_ms(db, f"{DUE} AND {by_json}"))
        print(f"held by {held} full tenants", best_ms(db, f"{DUE} AND name = 'Sync' AND concurrency_key IN ({keys})"))


if __name__ == "__main__":
    main()
