"""Waking an idle worker when work arrives, instead of at its next poll.

A write that makes a pipeline due (a create, a message's wake-up, a retry, a cancel request, a
child's end, a released lease: ``makes_work``) rings its store's ``Bell`` in this process once
the transaction is over; PostgreSQL also sends a NOTIFY inside the transaction
(``repositories.postgresql``). A worker of this process waiting in ``Backend.wait_for_work``
wakes at once; other processes learn of it by NOTIFY or by a short poll of the store."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from prorch.model.records import PipelineRecord
from prorch.model.status import Status

WAKE_AHEAD = timedelta(seconds=1)
"""A pipeline due within this much of the writer's wall clock makes work: a clock a little off
costs at most a spurious pass, never a missed wake-up for work due now."""


def makes_work(records: Iterable[object]) -> bool:
    """Whether writing ``records`` may give an idle worker a pipeline to claim now: a pending
    pipeline due now, unleased (or with a cancel request for its holder)."""
    horizon: datetime | None = None
    for record in records:
        if not isinstance(record, PipelineRecord) or record.status != Status.PENDING:
            continue
        if record.lease_owner is not None and not record.cancel_requested:
            continue
        if record.next_run_at is None:
            return True
        horizon = horizon or datetime.now(timezone.utc) + WAKE_AHEAD
        if record.next_run_at <= horizon:
            return True
    return False


class Bell:
    """Rung by the writers of one store in this process; each waiting thread wakes when it
    was rung since that thread last woke (so a ring during a pass is not lost)."""

    def __init__(self) -> None:
        self._rung = threading.Condition(threading.Lock())
        self._rings = 0
        self._seen = threading.local()

    def ring(self) -> None:
        with self._rung:
            self._rings += 1
            self._rung.notify_all()

    def wait(self, timeout: float) -> bool:
        """True as soon as the bell was rung since this thread's last True (at once on a
        thread's first call if it was ever rung), False after ``timeout`` seconds."""
        seen = getattr(self._seen, "rings", 0)
        with self._rung:
            if self._rings == seen:
                self._rung.wait_for(lambda: self._rings != seen, timeout=max(0.0, timeout))
            rings = self._rings
        self._seen.rings = rings
        return rings != seen


_bells: dict[str, Bell] = {}
_bells_lock = threading.Lock()


def bell_for(key: str) -> Bell:
    """The bell of the store named ``key`` (its file), shared by every backend object of this
    process on that store."""
    with _bells_lock:
        found = _bells.get(key)
        if found is None:
            found = _bells[key] = Bell()
        return found
