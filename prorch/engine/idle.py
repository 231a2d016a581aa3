"""An idle worker's wait between passes: until work may have arrived (the store's
``wait_for_work``: a NOTIFY, a write of this process, another process's write seen by a short
poll), the next timer (a ``wait``, a retry's backoff, a schedule's tick), a stop, or ``interval``
at most, the safety net that finds whatever no wake-up announced."""

from __future__ import annotations

import threading
import time
from datetime import datetime

from prorch.engine.extension import Extensions
from prorch.model.clock import Clock
from prorch.model.exceptions import RepositoryError
from prorch.storage.store import Store


def idle_seconds(
    store: Store, extensions: Extensions, clock: Clock, interval: float, since: datetime | None = None
) -> float:
    """Seconds until the next timer of the store or of a feature, at most ``interval``; 0 for a
    pipeline that became due after ``since`` (the last claim's time: it missed that claim,
    e.g. by the few milliseconds between two processes' clocks)."""
    now = clock.now()
    try:
        timers = [store.next_due_at(since or now), extensions.next_due(now)]
    except RepositoryError:  # the next pass reports the store's failure
        return interval
    found = min((moment for moment in timers if moment is not None), default=None)
    return interval if found is None else min(interval, max(0.0, (found - now).total_seconds()))


def wait_for_work(
    store: Store,
    extensions: Extensions,
    clock: Clock,
    interval: float,
    poll: float,
    stopped: threading.Event,
    since: datetime | None = None,
) -> bool:
    """Wait until work may be there; False when ``stopped`` was set. ``since``: the time the
    last claim read as now. The store is asked in turns of ``poll`` seconds: each turn looks
    once at other processes' writes (SQLite, TinyDB) and at ``stopped``."""
    deadline = time.monotonic() + idle_seconds(store, extensions, clock, interval, since)
    while not stopped.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        try:
            if store.wait_for_work(min(left, poll)):
                return True
        except Exception:  # a store's wait never stops the worker: the next pass finds the work
            stopped.wait(min(left, poll))
    return False
