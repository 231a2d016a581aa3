"""HOT updates and dead tuples of W1 on PostgreSQL (#28 item 4): how many of the pipelines' and
steps' UPDATEs were heap-only (no index touched), and how many dead tuples they left per 1,000
transitions, for vacuum to clean.

    PYTHONPATH=$PWD python tests/benchmarks/hot_updates.py                 # N=1,000, 3 runs each mode
    PYTHONPATH=$PWD python tests/benchmarks/hot_updates.py --n 1000 --runs 1 --output /tmp/hot.json
    PYTHONPATH=$PWD python tests/benchmarks/hot_updates.py --roots /tmp/before . --modes quiet  # A/B
    PYTHONPATH=$PWD python tests/benchmarks/hot_updates.py --limited   # through the limited claim

Each run is W1 (``workloads.py w1``: N pipelines of 3 quick steps, created one by one, then run
to the end by one worker, group commit 100) on a fresh database of a durable server (fsync on),
in two modes: ``quiet``, autovacuum off on the tables, so the dead tuples counted at the end
are all those the run left for a vacuum (page pruning, which HOT chains allow, already took the
rest); ``autovacuum``, the server's defaults, sampled every 0.2 s for the peak of dead tuples and
the autovacuums that ran (``--settle``: and for a while after the run). The counters are
``pg_stat_user_tables``' (reset before the run), of pipelines and steps, and the dead tuples of
``pipeline_leases`` (migration 0023: a row per lease of a limited name, ``--limited``). Run it
by hand; the test suite never asserts timings. ``--roots`` runs the same on other copies of the
code (a checkout of another commit), interleaved: each root migrates its own databases.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.run import fresh_pg_url  # noqa: E402
from tests.support.postgres import remove, start_server  # noqa: E402

TABLES = ("pipelines", "pipeline_steps")
LEASES = "pipeline_leases"  # PostgreSQL's table of live leases (migration 0023): its dead tuples count too
STATS = text(
    "SELECT relname, n_tup_upd, n_tup_hot_upd, n_dead_tup, autovacuum_count, "
    "pg_relation_size(relid) AS heap, pg_indexes_size(relid) AS indexes "
    "FROM pg_stat_user_tables WHERE relname IN ('pipelines', 'pipeline_steps', 'pipeline_leases')"
)


def counters(engine: Any) -> dict[str, dict[str, int]]:
    with engine.connect() as connection:
        return {row.relname: dict(row._mapping) for row in connection.execute(STATS)}


def in_root(root: Path, *args: str) -> str:
    """Run python with ``root``'s code (its workloads, its migrations); its last line of output."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed in {root}:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def one_run(
    server: Any, root: Path, n: int, mode: str, fillfactor: list[int] | None, settle: float = 0, limited: bool = False
) -> dict[str, Any]:
    url = fresh_pg_url(server)
    # migrated first, so that the tables exist before the counters are reset
    in_root(root, "-c", f"from repositories import from_url; from_url({url!r}).dispose()")
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for table, factor in zip(TABLES, fillfactor or [], strict=False):  # an experiment's override
            connection.execute(text(f"ALTER TABLE {table} SET (fillfactor = {factor})"))
        if mode == "quiet":
            for table in (*TABLES, LEASES):
                if connection.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar() is not None:
                    connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        connection.execute(text("SELECT pg_stat_reset()"))
        wal_before = connection.execute(text("SELECT pg_current_wal_lsn()")).scalar()
    peak = dict.fromkeys((*TABLES, LEASES), 0)
    series: list[tuple[float, int, int, int, int]] = []  # seconds; dead tuples, autovacuums of each table
    running, started = True, time.monotonic()

    def sample() -> None:
        while running:
            found = counters(engine)
            for name, row in found.items():
                peak[name] = max(peak[name], row["n_dead_tup"])
            pipes, steps = found["pipelines"], found["pipeline_steps"]
            moment = round(time.monotonic() - started, 1)
            series.append(
                (moment, pipes["n_dead_tup"], steps["n_dead_tup"], pipes["autovacuum_count"], steps["autovacuum_count"])
            )
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        workload = ["w1", url, str(n), *(["100", "1"] if limited else [])]
        result = json.loads(in_root(root, str(root / "tests" / "benchmarks" / "workloads.py"), *workload))
        time.sleep(settle)  # what autovacuum does once the work stops
    finally:
        running = False
        sampler.join()
    time.sleep(1.5)  # the worker's last counters reach the shared statistics at its exit
    with engine.connect() as connection:
        wal = connection.execute(text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), :lsn)"), {"lsn": wal_before})
        wal_bytes = float(wal.scalar() or 0)
    found = counters(engine)
    engine.dispose()
    transitions = result["transitions"]
    out: dict[str, Any] = {
        "transitions_per_s": result["transitions_per_s"],
        "e2e_per_s": result["e2e_per_s"],
        "wal_bytes_per_transition": wal_bytes / transitions,
        "series": series,
    }
    for name in TABLES:
        row = found[name]
        short = "steps" if name == "pipeline_steps" else name
        out[f"{short}_updates"] = row["n_tup_upd"]
        out[f"{short}_hot_pct"] = 100 * row["n_tup_hot_upd"] / max(row["n_tup_upd"], 1)
        out[f"{short}_dead_per_1000"] = 1000 * row["n_dead_tup"] / transitions
        out[f"{short}_peak_dead_per_1000"] = 1000 * max(peak[name], row["n_dead_tup"]) / transitions
        out[f"{short}_autovacuums"] = row["autovacuum_count"]
        out[f"{short}_kb"] = (row["heap"] + row["indexes"]) / 1024
    leases = found.get(LEASES, {"n_dead_tup": 0, "autovacuum_count": 0})  # none before 0023
    out["leases_dead_per_1000"] = 1000 * leases["n_dead_tup"] / transitions
    out["leases_peak_dead_per_1000"] = 1000 * max(peak.get(LEASES, 0), leases["n_dead_tup"]) / transitions
    out["leases_autovacuums"] = leases["autovacuum_count"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3, help="rounds; each round runs every root and mode")
    parser.add_argument("--modes", nargs="+", default=["quiet", "autovacuum"])
    parser.add_argument("--roots", nargs="+", default=[str(ROOT)], help="code trees to compare, interleaved")
    parser.add_argument("--fillfactor", nargs=2, type=int, metavar=("PIPELINES", "STEPS"), help="an override")
    parser.add_argument("--settle", type=float, default=0, help="seconds to keep sampling after the run")
    parser.add_argument("--limited", action="store_true", help="W1 of a class with max_running (never reached)")
    parser.add_argument("--output", help="also write the results here as JSON")
    options = parser.parse_args()
    server = start_server(durable=True)
    configurations = [(root, mode) for root in options.roots for mode in options.modes]
    runs: dict[str, list[dict[str, Any]]] = {f"{root} {mode}": [] for root, mode in configurations}
    try:
        for _ in range(options.runs):
            for root, mode in configurations:  # interleaved: noise hits every configuration alike
                result = one_run(
                    server, Path(root).resolve(), options.n, mode, options.fillfactor, options.settle, options.limited
                )
                runs[f"{root} {mode}"].append(result)
    finally:
        remove(server)
    medians = {
        name: {key: statistics.median(run[key] for run in found) for key in found[0] if key != "series"}
        for name, found in runs.items()
    }
    for name, values in medians.items():
        print(name, json.dumps({key: round(value, 1) for key, value in values.items()}))
    if options.output:
        Path(options.output).write_text(json.dumps({"n": options.n, "runs": runs, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
