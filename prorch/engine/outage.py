"""A worker whose store is unreachable: how long it waits before trying again (its interval,
doubled at each failure up to ``MAX_BACKOFF_SECONDS``) and what it logs (once when the store
goes away, a reminder at most every ``REMIND_EVERY_SECONDS``, once when it is back), so that an
outage costs a few log lines and a few connection attempts, not one of each per pass."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from prorch.model.exceptions import StoreUnreachableError

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BACKOFF_SECONDS = 10.0
"""The longest wait between two tries (or the worker's interval, if longer): the store is seen
back within this long."""
REMIND_EVERY_SECONDS = 60.0


class Outage:
    """The store's reachability as one worker sees it; ``failed`` after each failed try, ``recovered``
    after a good one."""

    def __init__(self, interval: float, *, log_every_try: bool = False) -> None:
        self.base = max(interval, 0.01)
        self.cap = max(MAX_BACKOFF_SECONDS, interval)
        self.log_every_try = log_every_try
        self.since: float | None = None
        """When (``time.monotonic()``) the store became unreachable; None while it is reachable."""
        self.tries = 0
        self.error = ""
        self._reminded = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        """Note a failed try; returns the seconds to wait before the next one."""
        now = time.monotonic()
        delay: float = min(self.base * 2.0 ** min(self.tries, 30), self.cap)
        self.tries += 1
        self.error = str(exc)
        if self.since is None:
            self.since = self._reminded = now
            logger.error("store unreachable: %s; next try in %.3gs, then less often (every %gs at most)",
                         exc, delay, self.cap)  # fmt: skip
        elif self.log_every_try or now - self._reminded >= REMIND_EVERY_SECONDS:
            self._reminded = now
            logger.error("store still unreachable after %.0fs (%d tries): %s; next try in %.3gs",
                         now - self.since, self.tries, exc, delay)  # fmt: skip
        else:
            logger.debug("store still unreachable (try %d): %s; next try in %.3gs", self.tries, exc, delay)
        return delay

    def recovered(self) -> None:
        if self.since is not None:
            logger.warning("store reachable again after %.1fs (%d failed tries)", time.monotonic() - self.since,
                           self.tries)  # fmt: skip
        self.since = None
        self.tries = 0
        self.error = ""

    def describe(self) -> str:
        """For a health check: how long the store has been unreachable, and why."""
        if self.since is None:
            return "store reachable"
        return f"store unreachable for {time.monotonic() - self.since:.1f}s ({self.tries} tries): {self.error}"


def open_when_reachable(make: Callable[[], T], outage: Outage) -> T:
    """``make()`` (an ``Orchestrator`` of a store), tried again with backoff while its store
    is unreachable: a worker started before its database waits for it, as one whose database
    goes away later does."""
    while True:
        try:
            made = make()
        except StoreUnreachableError as exc:
            time.sleep(outage.failed(exc))
            continue
        outage.recovered()
        return made
