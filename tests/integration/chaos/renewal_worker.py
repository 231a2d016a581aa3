"""A worker process for the mixed-renewal test: ``renewal_worker.py URL LEASE_SECONDS batch|single
COUNTS_FILE``. ``single`` is a worker of the code before batched renewal: its store renews one
lease at a time (``batch_renewal`` False, as a user's four-method repository). On SIGTERM it
writes how many renewals went each way to COUNTS_FILE, so that the test knows both paths ran."""

import json
import sys
from typing import Any

import lease_app  # noqa: F401  (registers the pipelines)

from prorch import Orchestrator

if __name__ == "__main__":
    url, lease, mode, counts_file = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
    orchestrator = Orchestrator(url, lease_seconds=lease, concurrency=4)
    engine: Any = orchestrator.store.engine
    counts = {"batch": 0, "single": 0}
    if mode == "single":
        engine.batch_renewal = False

    def counted(name: str, kind: str) -> None:
        original = getattr(engine, name)

        def wrapper(*args: Any) -> Any:
            counts[kind] += 1
            return original(*args)

        setattr(engine, name, wrapper)

    counted("renew_leases", "batch")
    counted("renew_lease", "single")
    orchestrator.run_forever(interval=0.05)
    with open(counts_file, "w") as sink:
        json.dump(counts, sink)
