"""A worker process for the lease race test: ``lease_worker.py URL LEASE_SECONDS``, with the
default concurrency, batch size and group commit of a worker."""

import sys

import lease_app  # noqa: F401  (registers the pipelines)

from prorch import Orchestrator

if __name__ == "__main__":
    Orchestrator(sys.argv[1], lease_seconds=float(sys.argv[2]), max_crashes=1000).run_forever(interval=0.02)
