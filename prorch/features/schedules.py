"""Recurring schedules: at the start of each pass, a worker creates the pipelines whose ticks
have come (``schedule`` / ``every`` on a pipeline class).

The store remembers each schedule's last created tick (``Store.advance_schedule``), apart from
the pipelines, so a tick is created once however many workers see it, and never again after
retention purged its pipeline. A tick's pipeline and its mark are stored in one transaction;
its creation key (from the pipeline's name and the tick's time) stays, for stores created by
older versions and repositories without transactions. Missed ticks (no worker ran) follow the
class's ``catch_up``: ``"latest"`` creates only the newest, ``"all"`` every one since the last
created, oldest first, up to ``CATCH_UP_BATCH`` a pass (the next passes go on from there; a
schedule that never ran starts with the newest), ``"none"`` none unless a worker sees the tick
within ``schedule_grace`` (default 60 seconds).

One schedule's failure (its ``schedule_params`` raising or refused) is logged, reported as an
error of the pass under ``schedule:NAME`` and skipped; its tick is not marked created, so the
next pass tries again, and the other schedules and the pipelines go on.

While the class is paused (``prorch pause --class``, every version or the scheduled one), its
ticks follow ``schedule_when_paused``: ``"skip"`` (the default) marks each tick done and creates
nothing, so a resume does not flood the workers with the runs a pause was meant to stop;
``"queue"`` creates them as usual, and they wait, paused, until the resume."""

from __future__ import annotations

import itertools
import logging
import weakref
from datetime import datetime
from typing import Any

from prorch.engine.extension import Extension, Host, PassReport
from prorch.model.clock import Clock
from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import DuplicateRecordError, ProrchError, RepositoryError
from prorch.model.keys import uuid_for_key
from prorch.model.pauses import SCHEDULES_SKIP, Pause, Paused, class_scope
from prorch.model.registry import Registry
from prorch.model.schedule_rules import Schedule, schedule_of
from prorch.storage.creation import create_pipelines
from prorch.storage.store import Store

logger = logging.getLogger("prorch.features.schedules")

CATCH_UP_BATCH = 100
"""Missed ticks created per schedule in one pass, with ``catch_up = "all"``; the next passes create the rest."""
LOOKBACK = 1000
"""Ticks looked back for a pipeline created by a prorch that stored no last tick (an upgraded store)."""

_schedules: weakref.WeakKeyDictionary[type, Schedule | None] = weakref.WeakKeyDictionary()


def scheduled(registry: Registry) -> list[tuple[type[PipelineDefinition], Schedule]]:
    """The newest version of each registered pipeline that declares a schedule."""
    found = []
    for versions in registry.pipelines.values():
        cls = versions[max(versions)]
        if cls not in _schedules:
            _schedules[cls] = schedule_of(cls)
        schedule = _schedules[cls]
        if schedule is not None:
            found.append((cls, schedule))
    return found


def due_ticks(schedule: Schedule, last: datetime | None, now: datetime) -> list[datetime]:
    """The ticks to create now, oldest first, after ``last`` (the last created one, if known)."""
    latest = schedule.latest(now)
    if last is not None and last >= latest:
        return []
    if schedule.catch_up == "none":
        return [latest] if now - latest <= schedule.grace else []
    if schedule.catch_up == "latest" or last is None:
        return [latest]
    missed = itertools.takewhile(lambda tick: tick <= latest, schedule.after(last))
    return list(itertools.islice(missed, CATCH_UP_BATCH))


def create_due(store: Store, registry: Registry, clock: Clock) -> tuple[int, dict[str, str]]:
    """Create the pipelines of every tick that has come: the number created, and the error of
    each schedule that failed (by ``schedule:NAME``), which was logged and skipped. A store
    that cannot be reached raises ``RepositoryError``: the pass cannot go on either."""
    schedules = scheduled(registry)
    if not schedules:
        return 0, {}
    now = clock.now()
    marks = store.schedule_ticks()
    paused = store.paused()
    created, errors = 0, {}
    for cls, schedule in schedules:
        try:
            last = marks.get(schedule.name) or _created_before(store, schedule, now)
            skip = schedule.when_paused == SCHEDULES_SKIP and _paused(paused, schedule.name, cls.version)
            for tick in due_ticks(schedule, last, now):
                if skip:
                    _skip(store, schedule, tick)
                else:
                    created += _create(store, registry, clock, cls, schedule, tick)
        except RepositoryError:
            raise
        except Exception as exc:  # the user's schedule_params, or its result refused: this schedule only
            logger.error("schedule of %s failed: %s", schedule.name, exc)  # one line; the traceback with --verbose
            logger.debug("schedule of %s failed", schedule.name, exc_info=not isinstance(exc, ProrchError))
            errors[f"schedule:{schedule.name}"] = f"{type(exc).__name__}: {exc}"
    return created, errors


def _paused(paused: Paused, name: str, version: int) -> Pause | None:
    return paused.holding((class_scope(name), class_scope(name, version)))


def _skip(store: Store, schedule: Schedule, tick: datetime) -> None:
    """A tick of a paused class, with ``schedule_when_paused = "skip"``: marked done, nothing created."""
    if store.advance_schedule(schedule.name, tick):
        logger.info("schedule of %s: skipped %s, the class is paused", schedule.name, tick.isoformat())


def _created_before(store: Store, schedule: Schedule, now: datetime) -> datetime | None:
    """For ``catch_up = "all"`` on a store with no last tick of this schedule: the newest tick
    whose keyed pipeline is stored (a prorch that kept no last tick created it), looking back
    ``LOOKBACK`` ticks; None for a schedule that never ran."""
    if schedule.catch_up != "all":
        return None
    try:
        for tick in itertools.islice(schedule.backwards(now), LOOKBACK):
            if store.get_pipeline(uuid_for_key(schedule.key(tick))) is not None:
                return tick
    except OverflowError:  # looked back past year 1 (e.g. a leap day's schedule)
        pass
    return None


def _create(store: Store, registry: Registry, clock: Clock, cls: Any, schedule: Schedule, tick: datetime) -> int:
    """Create the tick's pipeline and mark the tick created, in one transaction; 0 when another
    worker marked it (or a later one) first."""
    params = schedule.params_for(tick)  # the user's code, before any lock is taken
    context = {"schedule_tick": tick.isoformat()}
    try:
        with store.transaction():
            if not store.advance_schedule(schedule.name, tick):
                return 0
            ((record, made),) = create_pipelines(
                store, cls, [params], [schedule.key(tick)], registry=registry, clock=clock,
                context=context, tenant=None, priority=None, uuid=None,
            )  # fmt: skip
    except DuplicateRecordError:  # another worker stored this schedule's first tick at the same time
        return 0
    if made:
        logger.info("schedule of %s: created %s for %s", schedule.name, record.uuid, tick.isoformat(),
                    extra={"pipeline_uuid": record.uuid})  # fmt: skip
    return int(made)


class Schedules(Extension):
    """Creates due scheduled pipelines before each pass claims."""

    def setup(self, host: Host) -> None:
        self.host = host

    def on_pass_start(self, summary: PassReport) -> None:
        created, failed = create_due(self.host.store, self.host.registry, self.host.clock)
        summary.scheduled += created
        summary.errors.update(failed)

    def next_due(self, now: datetime) -> datetime | None:
        """The next tick of any schedule: an idle worker wakes for it."""
        return min((schedule.upcoming(now, 1)[0] for _, schedule in scheduled(self.host.registry)), default=None)
