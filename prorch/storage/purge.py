"""Retention: deleting ended pipelines with their steps, events, messages and streams once they are old
enough (``Orchestrator.purge``, ``prorch purge``, the worker's ``retention`` setting). It goes
in batches, each its own short transaction followed by a pause as long as the batch, so that
workers writing at the same time wait at most about one batch."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from prorch.model.clock import Clock
from prorch.model.exceptions import InvalidParamsError
from prorch.model.pauses import PIPELINE
from prorch.model.status import TERMINAL, Status
from prorch.storage.store import Store

logger = logging.getLogger("prorch.storage.purge")

DEFAULT_STATUSES = (Status.FINISHED, Status.CANCELLED)
"""Failed pipelines are kept unless asked for: someone may still want to read why, or retry."""
DEFAULT_BATCH = 500
MAX_PAUSE_SECONDS = 1.0


@dataclass
class PurgeSummary:
    """What a purge did (or, with ``dry_run``, would do)."""

    pipelines: int = 0
    batches: int = 0
    longest_batch_seconds: float = 0.0
    dry_run: bool = False


def purge(
    store: Store,
    clock: Clock,
    older_than: timedelta,
    statuses: tuple[Status | str, ...] = DEFAULT_STATUSES,
    batch_size: int = DEFAULT_BATCH,
    dry_run: bool = False,
    stop: threading.Event | None = None,
) -> PurgeSummary:
    """Delete the pipelines with one of ``statuses`` (ended ones only) whose last change is
    older than ``older_than``, ``batch_size`` at a time; once ``stop`` is set (a worker shutting
    down), after the batch under way."""
    chosen = _statuses(statuses)
    if not isinstance(older_than, timedelta) or older_than < timedelta(0):
        raise InvalidParamsError(f"older_than must be a timedelta of 0 or more, got {older_than!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParamsError(f"batch_size must be a whole number of 1 or more, got {batch_size!r}")
    store.deleters()  # a store that cannot delete says so now, not after the first batch is found
    before = clock.now() - older_than
    summary = PurgeSummary(dry_run=dry_run)
    if dry_run:
        while True:  # count without deleting: page through by growing the limit
            found = store.ended_before(chosen, before, summary.pipelines + batch_size)
            if len(found) <= summary.pipelines:
                return summary
            summary.pipelines = len(found)
    while stop is None or not stop.is_set():
        uuids = store.ended_before(chosen, before, batch_size)
        if not uuids:
            break
        started = time.perf_counter()
        deleted = store.delete_pipelines(uuids, chosen, before)
        if not deleted:
            break  # all taken meanwhile (a retry, another purge holding them): that purge goes on
        summary.pipelines += deleted
        summary.batches += 1
        took = time.perf_counter() - started
        summary.longest_batch_seconds = max(summary.longest_batch_seconds, took)
        # Leave the store to the workers as long as the batch held it: on SQLite a writer that
        # waited for this batch gets the lock before the next one (measured: without the pause, a
        # worker's pass stalled 3.3 s behind back-to-back batches of 0.9 s).
        if stop is None:
            time.sleep(min(took, MAX_PAUSE_SECONDS))
        else:
            stop.wait(min(took, MAX_PAUSE_SECONDS))
    if summary.pipelines:
        _forget_pauses(store)
        logger.info(
            "purged %d pipelines (%s) older than %s in %d batches; longest %.3fs%s",
            summary.pipelines, ", ".join(s.value for s in chosen), before.isoformat(), summary.batches,
            summary.longest_batch_seconds, "; stopped early for shutdown" if stop and stop.is_set() else "",
        )  # fmt: skip
    return summary


def _forget_pauses(store: Store) -> None:
    """The pauses of single pipelines that are gone now: nothing is left for them to hold."""
    for pause in store.pauses():
        if pause.kind == PIPELINE and store.get_pipeline(pause.value) is None:
            store.remove_pause(pause.scope)


def _statuses(statuses: tuple[Status | str, ...]) -> list[Status]:
    chosen = []
    for status in statuses:
        try:
            value = Status(status)
        except ValueError:
            value = None
        if value not in TERMINAL:
            ended = ", ".join(s.value for s in TERMINAL)
            raise InvalidParamsError(f"purge takes ended statuses only ({ended}), not {status!r}")
        chosen.append(value)
    if not chosen:
        raise InvalidParamsError("purge needs at least one status")
    return chosen
