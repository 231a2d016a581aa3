"""Recurring schedules: at the start of each pass, a worker creates the pipelines whose ticks
have come (``schedule`` / ``every`` on a pipeline class). Each tick's pipeline is created with
a creation key derived from the pipeline's name and the tick's time, so however many workers
see the tick, it is created once. Missed ticks (no worker ran) follow the class's ``catch_up``:
``"latest"`` creates only the newest, ``"all"`` every one since the last created (looking
back at most ``MAX_CATCH_UP`` ticks; a schedule that never ran starts with the newest),
``"none"`` none unless a worker sees the tick within ``schedule_grace`` seconds (default 60)."""

from __future__ import annotations

import itertools
import logging
import weakref
from datetime import datetime, timedelta
from typing import Any

from prorch.clock import Clock
from prorch.creation import create_pipelines
from prorch.definition import PipelineDefinition
from prorch.exceptions import ProrchError
from prorch.keys import uuid_for_key
from prorch.registry import Registry
from prorch.schedule import Schedule, schedule_of
from prorch.store import Store

logger = logging.getLogger("prorch.scheduling")

MAX_CATCH_UP = 1000
"""Missed ticks created at most, with ``catch_up = "all"``, after a long stop."""
DEFAULT_GRACE_SECONDS = 60.0

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


def due_ticks(store: Store, schedule: Schedule, cls: type, now: datetime) -> list[datetime]:
    """The ticks to create now, oldest first (none when the newest one is stored already)."""
    latest = schedule.latest(now)
    if store.get_pipeline(uuid_for_key(schedule.key(latest))) is not None:
        return []
    if schedule.catch_up == "none":
        grace = timedelta(seconds=float(getattr(cls, "schedule_grace", DEFAULT_GRACE_SECONDS)))
        return [latest] if now - latest <= grace else []
    if schedule.catch_up == "latest":
        return [latest]
    missed = [latest]
    for tick in itertools.islice(schedule.backwards(now), 1, MAX_CATCH_UP):
        if store.get_pipeline(uuid_for_key(schedule.key(tick))) is not None:
            return list(reversed(missed))
        missed.append(tick)
    # no earlier tick stored within MAX_CATCH_UP ticks: a schedule that never ran (nothing to
    # catch up), or a stop longer than that
    return [latest]


def create_due(store: Store, registry: Registry, clock: Clock) -> int:
    """Create the pipelines of every tick that has come; the number created. A schedule whose
    params are refused is logged and skipped: the pass goes on."""
    now = clock.now()
    created = 0
    for cls, schedule in scheduled(registry):
        try:
            ticks = due_ticks(store, schedule, cls, now)
            for tick in ticks:
                created += _create(store, registry, clock, cls, schedule, tick)
        except ProrchError as exc:
            logger.error("schedule of %s: %s", schedule.name, exc)
    return created


def _create(store: Store, registry: Registry, clock: Clock, cls: Any, schedule: Schedule, tick: datetime) -> int:
    context = {"schedule_tick": tick.isoformat()}
    ((record, made),) = create_pipelines(
        store, cls, [schedule.params_for(tick)], [schedule.key(tick)], registry=registry, clock=clock,
        context=context, tenant=None, priority=None, uuid=None,
    )  # fmt: skip
    if made:
        logger.info("schedule of %s: created %s for %s", schedule.name, record.uuid, tick.isoformat(),
                    extra={"pipeline_uuid": record.uuid})  # fmt: skip
    return int(made)
