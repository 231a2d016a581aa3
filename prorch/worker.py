"""The worker loop (``Orchestrator.run_forever``): continuous slots.

A worker keeps up to ``concurrency`` pipelines in progress (``prorch.engine.slots``) and refills
a slot as soon as one ends and its last transition is stored: a slow hook holds one slot, never
the others. It claims only what it has free slots for, plus at most ``prefetch`` pipelines
waiting for a slot (their leases renewed by the lease keeper like the others), so it never
holds many pipelines it is not running. The poll interval is only how often it looks for new
due work when the last claim found less than it asked for, and how often the extensions' pass
hooks run (schedules, retention, metrics).

On stop (SIGTERM, SIGINT, ``stop()``) it claims no more: the pipelines claimed and not started
are released without running a hook, the running hooks finish (within ``shutdown_grace``, see
``prorch.signals``), their transitions are stored, and the loop returns."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Protocol

from prorch.engine import Outcome, Writing
from prorch.engine.bounded_calls import HookCaller
from prorch.engine.extension import Extensions
from prorch.engine.outage import Outage
from prorch.engine.rounds import _Ended, _marks_a_hook, _resume
from prorch.engine.slots import Slots
from prorch.model.clock import Clock
from prorch.model.exceptions import RepositoryError, WorkerUnhealthyError
from prorch.model.records import PipelineRecord
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Store, Write
from prorch.summaries import PassSummary

Result = Outcome | str


class WorkerHost(Protocol):
    """What the worker loop needs of its ``Orchestrator``."""

    store: Store
    clock: Clock
    extensions: Extensions
    hooks: HookCaller
    stopped: threading.Event
    outage: Outage
    lease_seconds: float
    concurrency: int
    group_commit: int
    group_window: float
    prefetch: int
    max_abandoned_hooks: int
    last_loop: float

    def claim(self, limit: int, keeper: LeaseKeeper) -> tuple[list[PipelineRecord], list[float]]: ...
    def advancings(self, claimed: list[PipelineRecord], keeper: LeaseKeeper) -> list[Writing[Result]]: ...
    def tally(self, summary: PassSummary, pipeline: PipelineRecord, result: Result) -> None: ...
    def pass_ended(self, summary: PassSummary, lags: list[float], seconds: float) -> None: ...


class _Waiting:
    """A claimed pipeline waiting for a slot; a crash suspect's first write may be taken already."""

    __slots__ = ("alone", "first", "pipeline", "resumed", "writing")

    def __init__(self, pipeline: PipelineRecord, writing: Writing[Result], alone: bool) -> None:
        self.pipeline, self.writing, self.alone = pipeline, writing, alone
        self.first: Write | None = None
        self.resumed: Exception | None = None


class Worker:
    """One worker loop over ``host``; ``run`` returns once the host is stopped and drained."""

    def __init__(self, host: WorkerHost, interval: float) -> None:
        self.host = host
        self.interval = interval
        self.capacity = host.concurrency + host.prefetch
        self.waiting: deque[_Waiting] = deque()
        self.pipelines: dict[str, PipelineRecord] = {}  # in a slot, by uuid
        self.next_claim = 0.0  # time.monotonic() of the next claim when the last one came back short
        self.summary = PassSummary()
        self.lags: list[float] = []
        self.period_started = time.perf_counter()

    def run(self) -> None:
        host = self.host
        slots: Slots[str, Result] = Slots(
            host.store, concurrency=host.concurrency, group=host.group_commit, window=host.group_window
        )
        with LeaseKeeper(host.store, host.lease_seconds, host.clock, host.extensions.lease_lost) as keeper:
            self._period_start()
            try:
                while not (host.stopped.is_set() and not self.waiting and not slots.active):
                    host.last_loop = time.monotonic()
                    if not host.stopped.is_set() and self._claimable(slots):
                        self._claim(slots, keeper)
                    self._fill(slots)
                    if slots.active:
                        self._ended(slots.step(self._timeout()))
                    elif not host.stopped.is_set():
                        host.stopped.wait(self._timeout())
                    if time.perf_counter() - self.period_started >= self.interval:
                        self._period_end()
                        self._period_start()
            finally:
                slots.close()
                host.pass_ended(self.summary, self.lags, time.perf_counter() - self.period_started)

    # --- claiming ---------------------------------------------------------------------------

    def _claimable(self, slots: Slots[str, Result]) -> bool:
        """A slot is free with no claimed pipeline to fill it, and the last claim found all it
        asked for or the interval has passed."""
        return slots.free > len(self.waiting) and time.monotonic() >= self.next_claim

    def _claim(self, slots: Slots[str, Result], keeper: LeaseKeeper) -> None:
        host = self.host
        limit = self.capacity - slots.active - len(self.waiting)
        if any(rule.rate is not None for rule in host.extensions.claim_limits().values()):
            limit = min(limit, slots.free - len(self.waiting))  # a rate counts claims: claim only what starts now
        try:
            claimed, lags = host.claim(limit, keeper)
            writings = host.advancings(claimed, keeper)
        except RepositoryError as exc:  # the store is down: back off from claiming (logged once)
            self.next_claim = time.monotonic() + host.outage.failed(exc)
            return
        host.outage.recovered()
        if len(claimed) < limit:
            self.next_claim = time.monotonic() + self.interval
        self.summary.claimed += len(claimed)
        self.lags.extend(lags)
        suspects = []
        for pipeline, writing in zip(claimed, writings, strict=True):
            # suspects of a crash in an earlier round run alone, so that a crash is pinned on one
            alone = bool(pipeline.crashes or pipeline.hook_started_at is not None)
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
                self.host.tally(self.summary, waiting.pipeline, step.value)
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

    def _ended(self, ended: list[tuple[str, Result]]) -> None:
        for uuid, result in ended:
            self.host.tally(self.summary, self.pipelines.pop(uuid), result)

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
        host.pass_ended(self.summary, self.lags, time.perf_counter() - self.period_started)
        if self.summary.abandoned_hooks > host.max_abandoned_hooks:
            host.stopped.set()
            raise WorkerUnhealthyError(
                f"{self.summary.abandoned_hooks} hung hook threads are still running (limit "
                f"{host.max_abandoned_hooks}); exiting so that the supervisor starts a fresh worker"
            )
