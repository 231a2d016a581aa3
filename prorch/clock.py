"""Time as the engine sees it: injectable, so tests drive waits and backoff without sleeping."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Protocol


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
