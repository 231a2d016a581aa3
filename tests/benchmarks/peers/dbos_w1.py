"""W1 on DBOS (a workflow of 3 steps), in its own venv; its system database on SQLite, or on
the PostgreSQL server at URL.

python dbos_w1.py N MODE DURABILITY [URL]
    MODE: inline (workflows called in a row) or start (start_workflow, DBOS's faster mode)
    DURABILITY (SQLite only): wal-full (WAL + synchronous=FULL, prorch's default, set on every
    connection by a SQLAlchemy listener) or defaults (DBOS's own: rollback journal, FULL)

End to end: the clock covers every workflow's creation (its status row) and run, as prorch's
end-to-end figure covers its creates; DBOS.launch() is outside, as opening prorch's store is.
"""

import json
import resource
import sys
import threading
import time

import sqlalchemy
from dbos import DBOS

n, mode, durability = int(sys.argv[1]), sys.argv[2], sys.argv[3]
url = sys.argv[4] if len(sys.argv) > 4 else "sqlite:///dbos.sqlite"
PRAGMAS: dict[str, object] = {}

if url.startswith("sqlite") and durability == "wal-full":

    @sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "connect")
    def durable(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()


DBOS(config={"name": "bench", "system_database_url": url, "log_level": "ERROR"})


@DBOS.step()
def quick(i: int) -> int:
    return i


@DBOS.workflow()
def three() -> int:
    return quick(0) + quick(1) + quick(2)


DBOS.launch()
if url.startswith("sqlite"):  # what the run really used, read back from the file
    import sqlite3

    probe = sqlite3.connect(url.removeprefix("sqlite:///"))
    PRAGMAS = {"journal_mode": probe.execute("PRAGMA journal_mode").fetchone()[0]}
    probe.close()
cpu = time.process_time()
started = time.perf_counter()
if mode == "inline":
    for _ in range(n):
        three()
else:
    handles = [DBOS.start_workflow(three) for _ in range(n)]
    for handle in handles:
        handle.get_result()
took = time.perf_counter() - started
print(
    json.dumps(
        {
            "transitions_per_s": 3 * n / took,
            "e2e_per_s": 3 * n / took,
            "seconds": took,
            "cpu_us_per_transition": (time.process_time() - cpu) / (3 * n) * 1e6,
            "threads": len(threading.enumerate()),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **PRAGMAS,
        }
    )
)
DBOS.destroy()
