"""Time as the engine sees it: injectable, so tests drive waits and backoff without sleeping."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Protocol

logger = logging.getLogger("prorch.model.clock")
MAX_SECONDS = 365 * 24 * 3600
"""The longest lease, interval, timeout or grace the engine takes (a year): a larger one, or
``inf``, would overflow the times computed from it."""


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class FakeClock:
    """A clock that moves only when told to; for tests (``prorch.testing``)."""

    def __init__(self, start: datetime | None = None) -> None:
        moment = start or datetime(2030, 1, 1, tzinfo=timezone.utc)
        if moment.tzinfo is None:
            raise ValueError("FakeClock start must be timezone-aware, e.g. datetime(..., tzinfo=timezone.utc)")
        self._now = moment

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> datetime:
        """Move forward by ``seconds`` and return the new time."""
        if seconds < 0:
            raise ValueError("a FakeClock only moves forward")
        self._now += timedelta(seconds=seconds)
        return self._now

    def set(self, moment: datetime) -> None:
        if moment.tzinfo is None:
            raise ValueError("FakeClock.set needs a timezone-aware datetime")
        if moment < self._now:
            raise ValueError("a FakeClock only moves forward")
        self._now = moment


SERVER_CLOCK_RECHECK_SECONDS = 30.0
"""How often an aligned clock measures its offset to the store's clock again."""
SERVER_CLOCK_RETRY_SECONDS = 1.0
"""How soon an aligned clock tries again after the server could not be asked (it keeps the last
offset meanwhile)."""


def _ticks() -> float:
    """Seconds on a clock that no step of the wall clock moves (an NTP step, ``date -s``):
    Linux's ``CLOCK_BOOTTIME`` (it goes on through a suspend), else the monotonic clock."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


class ServerAlignedClock:
    """The store server's clock, on this machine: ``now()`` is the server's time last measured
    (``server_time``, now and then) carried forward on a steady clock (``_ticks``). Leases and
    due times written and compared by workers on several machines then all follow the one clock
    of the database, so a worker whose own clock is off cannot take a pipeline that is still
    leased; nor can one whose clock jumps between two measures (it was this machine's time plus
    the last offset: for up to 30 s after a jump of an hour, a worker took every lease as
    expired, or wrote its own an hour in the past)."""

    def __init__(self, server_time: Callable[[], datetime], base: Clock | None = None) -> None:
        self.base: Clock = base or SystemClock()
        self._server_time = server_time
        self._offset = timedelta(0)  # the server's time less this machine's, at the last measure
        self._anchor: tuple[datetime, float] | None = None  # the server's time, and _ticks() then
        self._checked_at: float | None = None
        self._next_check = 0.0  # time.monotonic() at which to measure again
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """The aligned time. A re-check the server does not answer (it is down for a moment)
        keeps the last measure and is tried again ``SERVER_CLOCK_RETRY_SECONDS`` later: reading
        the time never fails once it was measured (the lease keeper reads it)."""
        if time.monotonic() >= self._next_check:
            try:
                self.measure()
            except Exception as exc:
                if self._checked_at is None:
                    raise  # never measured: no offset to fall back on
                self._next_check = time.monotonic() + SERVER_CLOCK_RETRY_SECONDS
                logger.warning("could not re-check the server's clock (%s); keeping the last offset", exc)
        anchor = self._anchor
        if anchor is None:  # pragma: no cover - measured above, or raised
            return self.base.now() + self._offset
        return anchor[0] + timedelta(seconds=_ticks() - anchor[1])

    def measure(self) -> timedelta:
        """Ask the server for its time and keep it (half the round trip corrected), with the
        offset of this machine's clock to it."""
        with self._lock:
            before = _ticks()
            server = self._server_time()
            after = _ticks()
            self._anchor = (server, (before + after) / 2)
            self._offset = server - self.base.now() + timedelta(seconds=(after - before) / 2)
            self._checked_at = time.monotonic()
            self._next_check = self._checked_at + SERVER_CLOCK_RECHECK_SECONDS
            return self._offset
