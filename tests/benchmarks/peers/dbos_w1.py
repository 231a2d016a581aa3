"""W1 on DBOS (a workflow of 3 steps), in its own venv; its system database on SQLite, or on
the PostgreSQL server at URL.

python dbos_w1.py N MODE [URL]    MODE: inline (workflows called in a row) or start (start_workflow)
"""

import json
import resource
import sys
import threading
import time

from dbos import DBOS

n, mode = int(sys.argv[1]), sys.argv[2]
url = sys.argv[3] if len(sys.argv) > 3 else "sqlite:///dbos.sqlite"
DBOS(config={"name": "bench", "system_database_url": url, "log_level": "ERROR"})


@DBOS.step()
def quick(i: int) -> int:
    return i


@DBOS.workflow()
def three() -> int:
    return quick(0) + quick(1) + quick(2)


DBOS.launch()
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
            "seconds": took,
            "threads": len(threading.enumerate()),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
)
DBOS.destroy()
