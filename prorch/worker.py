"""The worker (``Orchestrator.run_forever``, ``prorch worker``): continuous slots.

A worker runs up to ``concurrency`` hooks at once (``prorch.engine.slots``) and refills a slot
as soon as a hook returns: a slow hook holds one slot, never the others. It claims only what it
has room for (``Slots.room``: the slots, and while hooks are quick, a group commit's worth of
pipelines between two hooks), plus at most ``prefetch`` pipelines waiting for a slot (their
leases renewed by the lease keeper like the others), so it never holds many pipelines it is
not running. When it groups, its claim stores the claimed pipelines' hook marks too
(``ClaimRequest.mark``). While hooks run, a claim (and the read of its pipelines' steps) runs
in a thread of its own, one at a time, so that the hooks returning meanwhile are stored and
restarted without waiting for the claim's commit; an idle worker claims in its loop. The poll
interval is only how often it looks for new due work when the last claim found less than it
asked for, and how often the extensions' pass hooks run (schedules, retention, metrics).

A pipeline is in progress once at most. Its advance's last write releases its lease, and the advance
ends a moment later; a claim in between may lease it again (a retry due at once): that claim
waits, its lease kept, until the slot's advance has ended, and then takes a slot.

On stop (SIGTERM, SIGINT, ``stop()``) it claims no more: the pipelines claimed and not started
are released without running a hook, the running hooks finish (within ``shutdown_grace``, see
``prorch.signals``), their transitions are stored, and the loop returns."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from prorch import signals
from prorch.engine import Writing, idle, passes
from prorch.engine.outage import Outage
from prorch.engine.passes import PassHost, PassSummary, Result
from prorch.engine.rounds import _Ended, _marks_a_hook, _resume
from prorch.engine.slots import Slots
from prorch.model.exceptions import RepositoryError, StoreUnreachableError, WorkerUnhealthyError
from prorch.model.records import PipelineRecord
from prorch.storage.heartbeat import Heartbeat, beat_seconds
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Write

logger = logging.getLogger("prorch.worker")

LOG_EVERY = 30.0
"""Seconds between the worker's INFO lines that sum up what it did (one more when it stops)."""

BUSY_LOOK = 0.005
"""Seconds between two looks for new work while hooks run and a slot is free (a NOTIFY
received, a write of this process, another process's write on SQLite or TinyDB: each a cheap
check, no claim), or ``wake_poll`` if shorter: work arriving during a hook is claimed within
that, not at the next ``wake_poll``. Looks that found work this worker could not claim back
off, doubling up to ``wake_poll``; so does a store whose look is slow (TinyDB reads its file):
at most one look per ``LOOK_SHARE`` times what the last one took."""

LOOK_SHARE = 50
"""A busy worker spends at most about 1/50 of its loop's time looking for new work."""


class WorkerHost(PassHost, Protocol):
    """What the worker needs of its ``Orchestrator``."""

    stopped: threading.Event
    outage: Outage
    owner: str
    app_version: str | None
    heartbeat: Heartbeat | None
    group_window: float
    prefetch: int
    max_abandoned_hooks: int
    shutdown_grace: float
    last_loop: float

    def stop(self) -> None: ...
    def close(self) -> None: ...


def run_forever(host: WorkerHost, interval: float, wake_poll: float) -> None:
    """Run ``host``'s worker loop until it is stopped (see ``Orchestrator.run_forever``), with
    its signal handlers, its extensions' background tasks and its row in the store."""
    restore = signals.stop_on_signals(host.stop, host.stopped.is_set, host.shutdown_grace)
    if not host.outage.down:
        host.outage = Outage(interval)
    host.extensions.call("start")
    try:
        host.heartbeat = Heartbeat(
            host.store, host.clock, host.owner, concurrency=host.concurrency,
            in_flight=lambda: host.hooks.in_flight, app_version=host.app_version,
            every=beat_seconds(host.lease_seconds),
        )  # fmt: skip
        with host.heartbeat:
            if host.extensions.by_hook["around_pass"]:
                with host.extensions.around_pass():
                    Worker(host, interval, wake_poll).run()
            else:
                Worker(host, interval, wake_poll).run()
    finally:
        restore()
        host.extensions.call("stop")  # a background task ends what it is doing, within shutdown_grace
        host.close()


class _Waiting:
    """A claimed pipeline waiting for a slot; a crash suspect's first write may be taken already."""

    __slots__ = ("alone", "first", "pipeline", "resumed", "writing")

    def __init__(self, pipeline: PipelineRecord, writing: Writing[Result], alone: bool) -> None:
        self.pipeline, self.writing, self.alone = pipeline, writing, alone
        self.first: Write | None = None
        self.resumed: Exception | None = None


class Worker:
    """One worker loop over ``host``; ``run`` returns once the host is stopped and drained."""

    def __init__(self, host: WorkerHost, interval: float, wake_poll: float) -> None:
        self.host = host
        self.interval = interval
        self.wake_poll = wake_poll
        self.look_every = min(BUSY_LOOK, wake_poll)  # while hooks run; longer after looks that led nowhere
        self.look_floor = self.look_every  # BUSY_LOOK, or longer for a slow look (LOOK_SHARE)
        self.woken = False  # the next claim follows a look that found work
        self.looked_at = 0.0  # time.monotonic() of the last look for work while hooks ran
        self.waiting: deque[_Waiting] = deque()
        self.pipelines: dict[str, PipelineRecord] = {}  # in a slot, by uuid
        self.deferred: dict[str, tuple[PipelineRecord, float, bool]] = {}  # claimed again while in a slot
        self.next_claim = 0.0  # time.monotonic() of the next claim when the last one came back short
        # while slow hooks run, a claim (a commit) runs in a thread of its own: the loop goes on
        self.claimer = ThreadPoolExecutor(1, thread_name_prefix="prorch-claim") if host.concurrency > 1 else None
        self.claiming: Future[passes.Claimed] | None = None
        self.claiming_args: tuple[float, int, bool] = (0.0, 0, False)  # its since, limit and mark
        self.summary = PassSummary()
        self.lags: list[float] = []
        self.period_started = time.perf_counter()
        self.log = SummaryLog()
        self.keeper = LeaseKeeper(host.store, host.lease_seconds, host.clock, host.extensions.lease_lost)

    def run(self) -> None:
        host = self.host
        slots: Slots[str, Result] = Slots(
            host.store, concurrency=host.concurrency, group=host.group_commit, window=host.group_window,
            broken=_broken, slowest=lambda: host.hooks.recent_slowest, spare=host.prefetch,
        )  # fmt: skip
        with self.keeper:
            self._period_start()
            try:
                while not (host.stopped.is_set() and self.held == 0):
                    self._turn(slots)
            except WorkerUnhealthyError:
                raise
            except Exception:
                logger.exception(
                    "the worker's loop failed; exiting once its running hooks end, so that the supervisor starts "
                    "a fresh worker (the pipelines it held resume when their leases run out)"
                )
                raise
            finally:
                if self.claimer is not None:
                    self.claimer.shutdown(wait=True)  # a claim in flight: its leases run out
                slots.close()
                passes.pass_ended(host, self.summary, self.lags, time.perf_counter() - self.period_started)
                self.log.add(self.summary, force=True)

    @property
    def held(self) -> int:
        """Pipelines this worker holds: in a slot, waiting for one, or claimed again (and one
        for a claim in flight, whose pipelines are not known yet)."""
        return len(self.pipelines) + len(self.waiting) + len(self.deferred) + (self.claiming is not None)

    def _turn(self, slots: Slots[str, Result]) -> None:
        host = self.host
        host.last_loop = time.monotonic()
        if self.claiming is not None and (self.claiming.done() or not slots.active):
            self._claimed(slots)  # (waited for when nothing else runs)
        if not host.stopped.is_set() and self._claimable(slots):
            self._claim(slots)
        elif host.stopped.is_set() and self.waiting:
            self._release_waiting()
        self._fill(slots)
        if slots.active:
            for uuid, result in slots.step(self._busy_timeout(slots), more=self._more(slots)):
                self._done(self.pipelines.pop(uuid), result)
            self._look_for_work(slots)
        elif not host.stopped.is_set():
            self._idle_wait(self._timeout())
        if time.perf_counter() - self.period_started >= self.interval:
            self._period_end()
            self._period_start()

    def _idle_wait(self, timeout: float) -> None:
        """Nothing runs: wait for work (a wake-up: ``prorch.engine.idle``), the next timer, a
        stop, or ``timeout`` seconds (the poll interval); claim at once after a wake-up."""
        host = self.host
        if idle.wait_for_work(
            host.store, host.extensions, host.clock, timeout, self.wake_poll, host.stopped, host.claimed_at
        ):
            self.next_claim = 0.0

    def _busy_timeout(self, slots: Slots[str, Result]) -> float:
        """How long to wait for a hook: with a slot free and nothing to fill it, at most
        ``BUSY_LOOK``, so that work arriving meanwhile is claimed soon, not at the interval."""
        timeout = self._timeout()
        return min(timeout, self.look_every) if slots.free > len(self.waiting) else timeout

    def _look_for_work(self, slots: Slots[str, Result]) -> None:
        """With a slot free, a wake-up (or a due timer) since the last look means: claim now."""
        now = time.monotonic()
        if self.host.stopped.is_set() or slots.free <= len(self.waiting) or now >= self.next_claim:
            return
        if now - self.looked_at < self.look_every:  # at most one look per look_every, however many hooks end
            return
        self.looked_at = now
        try:
            woken = self.host.store.wait_for_work(0)
            took = time.monotonic() - now
            self.look_floor = min(self.wake_poll, max(BUSY_LOOK, LOOK_SHARE * took))
            self.look_every = max(self.look_every, self.look_floor)
        except Exception:  # a store's wait never stops the worker: the interval finds the work
            return
        if woken:
            self.next_claim, self.woken = 0.0, True

    # --- claiming ---------------------------------------------------------------------------

    def _more(self, slots: Slots[str, Result]) -> bool:
        """A pipeline can start as soon as a slot is free: one is waiting (a suspect only in an
        empty worker), or a claim may find one now."""
        if self.waiting:
            return not (self.waiting[0].alone and slots.active)
        if self.claiming is not None:  # its end wakes the slots' wait (``Slots.wake_on``)
            return False
        return not self.host.stopped.is_set() and time.monotonic() >= self.next_claim and self._room(slots) > 0

    def _room(self, slots: Slots[str, Result]) -> int:
        """Pipelines a claim may take now: the slots' room (their spare is the prefetch), less
        what waits."""
        return slots.room - len(self.waiting) - len(self.deferred)

    def _claimable(self, slots: Slots[str, Result]) -> bool:
        """A slot is free with no claimed pipeline to fill it, or half the prefetch is used up
        (so that a slot freed meanwhile starts at once, not after a claim's commit); and the
        last claim found all it asked for or the interval has passed."""
        if self.claiming is not None:  # one claim at a time: its limit counted the room
            return False
        wanted = slots.free > len(self.waiting) or self._room(slots) >= max(1, (self.host.prefetch + 1) // 2)
        return wanted and time.monotonic() >= self.next_claim

    def _claim(self, slots: Slots[str, Result]) -> None:
        host = self.host
        limit = self._room(slots)
        if any(rule.rate is not None for rule in host.extensions.claim_limits().values()):
            limit = min(limit, slots.free - len(self.waiting))  # a rate counts claims: claim only what starts now
        if limit <= 0:
            return
        since = time.monotonic()  # before the lease's time is read: see LeaseKeeper
        mark = slots.grouped  # grouped, the claim stores the hook marks too (shared, as the group's would be)
        if self.claimer is not None and slots.active:
            # Hooks run: the claim (a commit, an fsync) goes to a thread of its own, and the loop
            # meanwhile stores and starts the hooks that return (quick hooks' too: at 200 creates
            # a second on PostgreSQL the loop spent a quarter of its time in claims). Nothing else
            # joins what this worker holds until it is back (``_claimable``), so ``limit`` stays
            # its bound.
            self.claiming = self.claimer.submit(passes.claim_and_read, host, limit, mark=mark)
            self.claiming_args = (since, limit, mark)
            slots.wake_on(self.claiming)
            return
        self._take(slots, since, limit, mark, lambda: (*passes.claim(host, limit, mark=mark), None))

    def _claimed(self, slots: Slots[str, Result]) -> None:
        """The claim in its thread is back (or nothing else runs: wait for it): take what it leased."""
        claiming, self.claiming = self.claiming, None
        if claiming is not None:
            self._take(slots, *self.claiming_args, claiming.result)

    def _take(
        self,
        slots: Slots[str, Result],
        since: float,
        limit: int,
        mark: bool,
        claimed_by: Callable[[], passes.Claimed],
    ) -> None:
        """Hold and queue what ``claimed_by`` leased (the claim, run now or back from its thread)."""
        host, keeper = self.host, self.keeper
        fresh: list[PipelineRecord] = []
        try:
            claimed, lags, steps = claimed_by()
            marked = passes.marked_by(claimed, host.claimed_at) if mark else frozenset()
            busy = self._busy()
            again = [pipeline for pipeline in claimed if pipeline.uuid in busy]
            fresh = [pipeline for pipeline in claimed if pipeline.uuid not in busy]
            keeper.hold(fresh, since)
            writings = passes.advancings(host, fresh, keeper, marked, steps)
        except RepositoryError as exc:  # the store is down: back off from claiming (logged once)
            for pipeline in fresh:  # their steps were not read: their leases are given back once the store is
                if isinstance(exc, StoreUnreachableError):
                    keeper.give_back_later(pipeline.uuid)
                keeper.drop(pipeline.uuid)
            self.next_claim = time.monotonic() + host.outage.failed(exc)
            return
        host.outage.recovered()
        keeper.give_back()  # the leases of advances the outage ended: claimable from the next claim
        if self.woken:  # work it cannot claim (another app's, limited): looks back off, up to wake_poll
            self.look_every = min(self.look_floor if claimed else 2 * self.look_every, self.wake_poll)
            self.woken = False
        if len(claimed) < limit:
            self.next_claim = time.monotonic() + self.interval
        self.summary.claimed += len(claimed)
        self.lags.extend(lags)
        for pipeline in again:  # its advance here is ending: it waits for that end
            self.deferred[pipeline.uuid] = (pipeline, since, pipeline.uuid in marked)
        self._queue(slots, fresh, writings, marked)

    def _busy(self) -> set[str]:
        """The pipelines this worker holds an advance of: in a slot, or waiting for one."""
        return {*self.pipelines, *(waiting.pipeline.uuid for waiting in self.waiting)}

    def _queue(
        self,
        slots: Slots[str, Result],
        claimed: list[PipelineRecord],
        writings: list[Writing[Result]],
        marked: frozenset[str],
    ) -> None:
        suspects = []
        for pipeline, writing in zip(claimed, writings, strict=True):
            # suspects of a crash in an earlier round run alone, so that a crash is pinned on one
            alone = passes.suspect(pipeline, marked)
            waiting = _Waiting(pipeline, writing, alone)
            if alone and slots.grouped:
                suspects.append(waiting)
            self.waiting.append(waiting)
        if suspects:
            self._charge_first(suspects)

    def _charge_first(self, suspects: list[_Waiting]) -> None:
        """The suspects' first writes that mark no hook (crash charges) are stored together
        now, so that a crash while one of them runs cannot charge the others again (as
        ``rounds`` does for a pass)."""
        unmarked: list[_Waiting] = []
        for waiting in suspects:
            step = _resume(waiting.writing, None)
            if isinstance(step, _Ended):
                self.waiting.remove(waiting)
                self._done(waiting.pipeline, step.value)
                continue
            waiting.first = step
            if not _marks_a_hook(step):
                unmarked.append(waiting)
        if not unmarked:
            return
        try:
            stored = list(self.host.store.commit_many([waiting.first for waiting in unmarked if waiting.first]))
        except Exception as exc:
            stored = [exc] * len(unmarked)
        for waiting, outcome in zip(unmarked, stored, strict=True):
            waiting.first, waiting.resumed = None, outcome

    def _fill(self, slots: Slots[str, Result]) -> None:
        """Start waiting pipelines in the free slots (a suspect only in an empty worker)."""
        while self.waiting and slots.free > 0:
            head = self.waiting[0]
            if head.alone and slots.active:
                return
            self.waiting.popleft()
            self.pipelines[head.pipeline.uuid] = head.pipeline
            slots.start(head.pipeline.uuid, head.writing, first=head.first, resumed=head.resumed, alone=head.alone)

    def _release_waiting(self) -> None:
        """Stopping: the pipelines claimed and not started give their leases back now, not once
        a slot frees (the runner parks a pipeline without running a hook once stopped)."""
        store = self.host.store
        while self.waiting:
            waiting = self.waiting.popleft()
            step = waiting.first if waiting.first is not None else _resume(waiting.writing, waiting.resumed)
            while not isinstance(step, _Ended):
                try:
                    store.commit_write(step)
                    stored: Exception | None = None
                except Exception as exc:  # told to the advance, as in a slot
                    stored = exc
                step = _resume(waiting.writing, stored)
            self._done(waiting.pipeline, step.value)

    def _done(self, pipeline: PipelineRecord, result: Result) -> None:
        """An advance ended: count it; a claim of the same pipeline that waited for this end
        takes its turn now."""
        passes.tally(self.host, self.summary, pipeline, result)
        if pipeline.uuid in self.deferred and pipeline.uuid not in self._busy():
            self._resume_deferred(pipeline.uuid)

    def _resume_deferred(self, uuid: str) -> None:
        """Hold the lease of a pipeline claimed again while it was in a slot (the slot's advance
        let go of it as it ended) and queue it; if its steps cannot be read, its lease runs out
        and it resumes then."""
        pipeline, since, marked = self.deferred.pop(uuid)
        keeper = self.keeper
        keeper.hold([pipeline], since)
        try:
            writings = passes.advancings(self.host, [pipeline], keeper, frozenset([uuid] if marked else []))
        except RepositoryError as exc:
            keeper.drop(uuid)
            logger.error("pipeline %s: could not read its steps (%s); it resumes when its lease runs out", uuid, exc)
            return
        self.waiting.append(_Waiting(pipeline, writings[0], False))

    def _timeout(self) -> float:
        """How long to wait for a hook: until the next claim or the end of the period."""
        now = time.monotonic()
        until_claim = self.next_claim - now if self.next_claim > now else self.interval
        until_period = self.interval - (time.perf_counter() - self.period_started)
        return max(0.001, min(until_claim, until_period))

    # --- the extensions' pass hooks, once per interval ---------------------------------------

    def _period_start(self) -> None:
        self.summary, self.lags = PassSummary(), []
        self.period_started = time.perf_counter()
        self.host.store.warn_if_unguarded()
        try:
            self.host.extensions.pass_started(self.summary)
        except RepositoryError as exc:
            self.next_claim = time.monotonic() + self.host.outage.failed(exc)

    def _period_end(self) -> None:
        host = self.host
        passes.pass_ended(host, self.summary, self.lags, time.perf_counter() - self.period_started)
        self.log.add(self.summary)
        if self.summary.abandoned_hooks > host.max_abandoned_hooks:
            host.stopped.set()
            raise WorkerUnhealthyError(
                f"{self.summary.abandoned_hooks} hung hook threads are still running (limit "
                f"{host.max_abandoned_hooks}); exiting so that the supervisor starts a fresh worker"
            )


class SummaryLog:
    """The worker's INFO lines: what it did, summed and logged once every ``LOG_EVERY``
    seconds (and when it stops) if there was work, so that a busy worker does not flood its log."""

    def __init__(self) -> None:
        self.totals = PassSummary()
        self.logged_at = time.monotonic()

    def add(self, period: PassSummary, *, force: bool = False) -> None:
        totals = self.totals
        totals.claimed += period.claimed
        totals.finished += period.finished
        totals.failed += period.failed
        totals.waiting += period.waiting
        totals.blocked.update(period.blocked)
        totals.errors.update(period.errors)
        seconds = time.monotonic() - self.logged_at
        if seconds < LOG_EVERY and not force:
            return
        if totals.did_something:
            logger.info("worker: %s in the last %.0fs", totals.counts(), seconds)
        self.totals, self.logged_at = PassSummary(), time.monotonic()


def _broken(uuid: str, error: Exception) -> Result:
    """A slot's advance raised what it should have caught (an engine bug): its end, as an error."""
    logger.error(
        "pipeline %s: its advance broke (%s: %s); it resumes when its lease runs out",
        uuid, type(error).__name__, error, exc_info=error, extra={"pipeline_uuid": uuid},
    )  # fmt: skip
    return f"{type(error).__name__}: {error}"
