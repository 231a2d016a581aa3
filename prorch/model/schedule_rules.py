"""A pipeline class's recurring schedule: ``schedule = "0 3 * * *"`` (cron, read by cronsim, in
``schedule_tz``) or ``every = timedelta(...)`` (ticks at whole multiples of it since the Unix
epoch, so every worker computes the same ticks). This module only reads and checks the
declaration and computes ticks; ``prorch.features.schedules`` creates the pipelines."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from prorch.model.exceptions import ProrchError, RegistrationError
from prorch.model.pauses import SCHEDULE_MODES, SCHEDULES_SKIP

CatchUp = Literal["latest", "all", "none"]
CATCH_UP = ("latest", "all", "none")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
TINY = timedelta(microseconds=1)
DEFAULT_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class Schedule:
    """The ticks of one pipeline class, and what to do about missed ones."""

    name: str
    cron: str | None
    every: timedelta | None
    tz: ZoneInfo | timezone
    catch_up: CatchUp
    params: dict[str, Any] | Callable[[datetime], Any] | None
    grace: timedelta = timedelta(seconds=DEFAULT_GRACE_SECONDS)  # catch_up "none": how late a tick may be seen
    when_paused: str = SCHEDULES_SKIP  # a tick while the class is paused: "skip" it or "queue" its pipeline

    def latest(self, now: datetime) -> datetime:
        """The last tick at or before ``now``."""
        return next(self.backwards(now))

    def backwards(self, now: datetime) -> Iterator[datetime]:
        """Ticks at or before ``now``, newest first, in UTC."""
        if self.every is not None:
            tick = EPOCH + ((now - EPOCH) // self.every) * self.every
            while True:
                yield tick
                tick -= self.every
        assert self.cron is not None
        for tick in CronSim(self.cron, (now + TINY).astimezone(self.tz), reverse=True):
            yield tick.astimezone(timezone.utc)

    def after(self, tick: datetime) -> Iterator[datetime]:
        """Ticks strictly after ``tick``, oldest first, in UTC: the missed ticks after the last
        created one (read forward, so no look-back can run past the calendar's start)."""
        if self.every is not None:
            following = EPOCH + ((tick - EPOCH) // self.every + 1) * self.every
            while True:
                yield following
                following += self.every
        assert self.cron is not None
        for following in CronSim(self.cron, tick.astimezone(self.tz)):
            yield following.astimezone(timezone.utc)

    def upcoming(self, now: datetime, count: int) -> list[datetime]:
        """The next ``count`` ticks after ``now``, in UTC (``prorch schedules``)."""
        if self.every is not None:
            first = self.latest(now) + self.every
            return [first + i * self.every for i in range(count)]
        assert self.cron is not None
        ticks = CronSim(self.cron, now.astimezone(self.tz))
        return [next(ticks).astimezone(timezone.utc) for _ in range(count)]

    def key(self, tick: datetime) -> str:
        """The creation key of this tick's pipeline: the same in every worker."""
        return f"schedule:{self.name}:{tick.astimezone(timezone.utc).isoformat()}"

    def params_for(self, tick: datetime) -> Any:
        return self.params(tick) if callable(self.params) else dict(self.params or {})

    @property
    def description(self) -> str:
        if self.cron is not None:
            return f"cron {self.cron!r} ({self.tz})"
        return f"every {self.every}"


def schedule_of(cls: Any) -> Schedule | None:
    """The class's schedule, or None; one ``RegistrationError`` naming what is wrong."""
    cron, every = getattr(cls, "schedule", None), getattr(cls, "every", None)
    name = getattr(cls, "name", None) or cls.__name__
    if cron is None and every is None:
        return None
    if cron is not None and every is not None:
        raise RegistrationError(f"pipeline {name}: set schedule = '...' (cron) or every = timedelta(...), not both")
    tz_name = getattr(cls, "schedule_tz", "UTC")
    try:
        tz: ZoneInfo | timezone = timezone.utc if tz_name in ("UTC", None) else ZoneInfo(str(tz_name))
    except (ZoneInfoNotFoundError, ValueError):
        raise RegistrationError(
            f"pipeline {name}: schedule_tz {tz_name!r} is not a time zone name (e.g. 'UTC', 'Europe/Berlin')"
        ) from None
    if cron is not None:
        if not isinstance(cron, str):
            raise RegistrationError(f"pipeline {name}: schedule must be a cron string such as '0 3 * * *'")
        try:
            next(CronSim(cron, datetime.now(tz)))
        except (CronSimError, StopIteration) as exc:
            raise RegistrationError(
                f"pipeline {name}: schedule {cron!r} is not a cron expression ({exc}); "
                "use five fields: minute hour day month weekday, e.g. '0 3 * * *'"
            ) from None
    if every is not None and (not isinstance(every, timedelta) or every < timedelta(seconds=1)):
        raise RegistrationError(f"pipeline {name}: every must be a timedelta of at least 1 second, got {every!r}")
    catch_up = getattr(cls, "catch_up", "latest")
    if catch_up not in CATCH_UP:
        raise RegistrationError(f"pipeline {name}: catch_up must be one of {', '.join(CATCH_UP)}, got {catch_up!r}")
    params = getattr(cls, "schedule_params", None)
    if params is not None and not (isinstance(params, dict) or callable(params)):
        raise RegistrationError(f"pipeline {name}: schedule_params must be a dict or a function of the tick time")
    when_paused = getattr(cls, "schedule_when_paused", SCHEDULES_SKIP)
    if when_paused not in SCHEDULE_MODES:
        raise RegistrationError(
            f"pipeline {name}: schedule_when_paused must be one of {', '.join(SCHEDULE_MODES)}, got {when_paused!r}"
        )
    schedule = Schedule(name, cron, every, tz, cast(CatchUp, catch_up), params, _grace(cls, name), when_paused)
    _check_ticks(schedule)
    return schedule


def check_schedule_params(cls: Any, schedule: Schedule) -> None:
    """Fixed params (a dict, or none) are checked once, at registration, against the class's
    ``Params``: a schedule that could never create its pipeline is refused there, not at every
    tick. A function's params can only be checked per tick."""
    if callable(schedule.params):
        return
    try:
        cls.validate_params(schedule.params_for(EPOCH))
    except ProrchError as exc:
        raise RegistrationError(
            f"pipeline {schedule.name}: schedule_params {schedule.params or {}!r} are refused by Params ({exc}); "
            "set schedule_params to params that Params accepts, or a function of the tick time returning them"
        ) from None


def _grace(cls: Any, name: str) -> timedelta:
    """``schedule_grace``: seconds (a number) or a timedelta, not negative."""
    grace = getattr(cls, "schedule_grace", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, (int, float)) and not isinstance(grace, bool) and math.isfinite(grace):
        grace = timedelta(seconds=grace)
    if not isinstance(grace, timedelta) or grace < timedelta(0):
        raise RegistrationError(
            f"pipeline {name}: schedule_grace must be a number of seconds or a timedelta, not negative, got "
            f"{grace!r}; e.g. schedule_grace = 120 or timedelta(minutes=2)"
        )
    return grace


def _check_ticks(schedule: Schedule) -> None:
    """The schedule's ticks can be computed around now (a cron expression that parses may
    still name no date CronSim can reach)."""
    now = datetime.now(timezone.utc)
    try:
        schedule.latest(now)
        schedule.upcoming(now, 1)
    except (CronSimError, StopIteration, OverflowError, ValueError) as exc:
        raise RegistrationError(
            f"pipeline {schedule.name}: the ticks of {schedule.description} cannot be computed ({exc!r}); "
            "check the expression against a calendar"
        ) from None
