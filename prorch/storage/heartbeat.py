"""A worker's heartbeat: a thread that rewrites the worker's row every few seconds (who it is,
what it runs), deletes it on a clean stop, and tells the health check whether the worker is
alive: its loop's thread runs and its row was written lately, whatever its hooks do."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType

from prorch.model.clock import Clock
from prorch.model.workers import HEARTBEAT_SECONDS, STALE_BEATS, WorkerRow
from prorch.storage.store import Store
from prorch.storage.ticker import Ticker

logger = logging.getLogger("prorch.storage.heartbeat")


def prorch_version() -> str:
    try:
        return version("prorch")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without metadata
        return "unknown"


def beat_seconds(lease_seconds: float) -> float:
    """How often a worker beats: ``HEARTBEAT_SECONDS``, faster when its leases are short, so
    that its row goes stale (``STALE_BEATS`` late beats) within a quarter of its lease: a dead
    worker's pipelines are shown stranded for most of the time their leases still hold them."""
    return min(HEARTBEAT_SECONDS, lease_seconds / (4 * STALE_BEATS))


class Heartbeat:
    """Keeps the row of worker ``worker_id`` while the block runs (``with Heartbeat(...)``),
    from the thread that entered it (the worker's loop)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        worker_id: str,
        *,
        concurrency: int,
        in_flight: Callable[[], int],
        app_version: str | None = None,
        every: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.store = store
        self.clock = clock
        self.every = every
        self.in_flight = in_flight
        now = clock.now()
        self.row = WorkerRow(
            id=worker_id, host=socket.gethostname(), pid=os.getpid(), prorch_version=prorch_version(),
            app_version=app_version, started_at=now, heartbeat_at=now, beat_seconds=every,
            concurrency=concurrency, in_flight=0,
        )  # fmt: skip
        self.last_beat: float | None = None  # time.monotonic() of the last row stored
        self._loop_thread: threading.Thread | None = None
        self._ticker = Ticker("prorch-heartbeat", every, self.beat)

    def __enter__(self) -> Heartbeat:
        self._loop_thread = threading.current_thread()
        self.beat()
        self._ticker.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._ticker.stop()
        try:
            self.store.delete_worker(self.row.id)
        except Exception as error:  # the store is down: the row goes stale and says so
            logger.warning("could not delete the row of worker %s: %s", self.row.id, error)

    def beat(self) -> bool:
        """Write the row now; False (logged) when the store refused."""
        self.row.heartbeat_at = self.clock.now()
        self.row.in_flight = self.in_flight()
        try:
            self.store.upsert_worker(self.row)
        except Exception as error:  # the store is down: health says so; try again at the next beat
            logger.warning("worker %s: heartbeat not stored: %s", self.row.id, error)
            return False
        self.last_beat = time.monotonic()
        return True

    def health(self) -> tuple[bool, str]:
        """Healthy while the worker's loop runs and its row was stored within ``STALE_BEATS`` beats."""
        if self._loop_thread is not None and not self._loop_thread.is_alive():
            return False, "stopped: the worker's loop has ended"
        if self._ticker.ended:
            return False, "stalled: the heartbeat thread has ended"
        limit = STALE_BEATS * self.every
        if self.last_beat is None:
            return False, "unhealthy: the worker's row was never stored"
        age = time.monotonic() - self.last_beat
        healthy = age <= limit
        return healthy, f"{'ok' if healthy else 'stalled'}: heartbeat {age:.1f}s ago (limit {limit:g}s)"
