"""A worker process for the chaos test: short leases so that a killed worker's pipelines are
picked up quickly."""

import sys

import chaos_app  # noqa: F401  (registers the pipelines)
import inbox_app  # noqa: F401

from prorch import Orchestrator

if __name__ == "__main__":
    Orchestrator(sys.argv[1], lease_seconds=2, concurrency=2, batch_size=10, max_crashes=1000).run_forever(
        interval=0.02
    )
