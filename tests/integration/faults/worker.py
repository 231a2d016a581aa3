"""A worker process for the fault tests: ``worker.py URL '{"concurrency": 2, ...}'``. With
SKEW_SECONDS set, its system clock runs that far ahead of the real time."""

import json
import os
import sys
from datetime import datetime, timedelta

import fault_app  # noqa: F401  (registers the pipelines)

from prorch import Orchestrator
from prorch.clock import SystemClock


class SkewedClock(SystemClock):
    """This machine's clock, off by SKEW_SECONDS (as a host whose NTP failed)."""

    def now(self) -> datetime:
        return super().now() + timedelta(seconds=float(os.environ["SKEW_SECONDS"]))


if __name__ == "__main__":
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    interval = options.pop("interval", 0.05)
    clock = SkewedClock() if os.environ.get("SKEW_SECONDS") else None
    Orchestrator(sys.argv[1], clock=clock, **options).run_forever(interval=interval)
