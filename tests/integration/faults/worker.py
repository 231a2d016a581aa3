"""A worker process for the fault tests: ``worker.py URL '{"concurrency": 2, ...}'``. With
SKEW_SECONDS set, its system clock runs that far ahead of the real time; with JUMP_FILE set, it
jumps by the seconds that file holds once the test writes it; with WORKER_LOG_LEVELS set, it
logs from INFO up, each line starting with its level."""

import json
import logging
import os
import sys
from datetime import datetime, timedelta

import fault_app  # noqa: F401  (registers the pipelines)

from prorch import Orchestrator
from prorch.model.clock import SystemClock


class SkewedClock(SystemClock):
    """This machine's clock, off by SKEW_SECONDS (as a host whose NTP failed), and stepped by
    the seconds in JUMP_FILE once it exists (an NTP step, a VM resumed)."""

    def now(self) -> datetime:
        return super().now() + timedelta(seconds=float(os.environ.get("SKEW_SECONDS", 0)) + jumped())


def jumped() -> float:
    path = os.environ.get("JUMP_FILE")
    try:
        return float(open(path).read() or 0) if path else 0.0
    except (OSError, ValueError):  # not written yet, or being written
        return 0.0


if __name__ == "__main__":
    if os.environ.get("WORKER_LOG_LEVELS"):  # each line says its level, for the tests that count them
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    interval = options.pop("interval", 0.05)
    clock = SkewedClock() if os.environ.get("SKEW_SECONDS") or os.environ.get("JUMP_FILE") else None
    Orchestrator(sys.argv[1], clock=clock, **options).run_forever(interval=interval)
