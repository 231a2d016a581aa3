"""One pass of an orchestrator (``Orchestrator.execute_pipelines``, ``prorch run``): claim the due
pipelines, advance each, store their transitions, and say what happened; and the parts of it
that the worker's loop (``prorch.worker``) uses too: claiming, an advance, counting its end.

The functions take their orchestrator as a ``PassHost`` and read its settings when called, so
that a setting changed on the orchestrator (``concurrency``, for a test) applies to the next pass.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from prorch.engine.bounded_calls import HookCaller
from prorch.engine.extension import Extensions
from prorch.engine.rounds import write_each, write_in_rounds
from prorch.engine.runner import Runner
from prorch.engine.state import Outcome, Writing
from prorch.model.clock import Clock
from prorch.model.due import ClaimRequest, Runnable
from prorch.model.exceptions import (
    ConcurrentUpdateError,
    LeaseLostError,
    RepositoryError,
    StoreUnreachableError,
    UnconfirmedWriteError,
)
from prorch.model.records import PipelineRecord, StepRecord
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL, Status
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Store

logger = logging.getLogger("prorch.engine.passes")

Result = Outcome | str
"""An advance's end: its outcome, or the error that stopped it."""


@dataclass
class PassSummary:
    """What one pass did. ``errors`` maps a pipeline uuid to the error that stopped its advance
    (or ``schedule:NAME`` to the error that stopped a schedule creating its tick's pipeline);
    ``blocked`` maps a pipeline uuid to why its code is not available."""

    claimed: int = 0
    advanced: int = 0
    transitions: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    waiting: int = 0
    blocked: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    scheduled: int = 0  # pipelines created for schedule ticks at the start of the pass
    abandoned_hooks: int = 0  # hung hook threads of this orchestrator still running after the pass

    def add(self, outcome: Outcome) -> None:
        if outcome.blocked:
            self.blocked[outcome.uuid] = outcome.blocked
            return
        self.advanced += 1
        self.transitions += outcome.transitions
        if outcome.status == Status.FINISHED:
            self.finished += 1
        elif outcome.status == Status.FAILED:
            self.failed += 1
        elif outcome.status == Status.CANCELLED:
            self.cancelled += 1
        elif outcome.waiting_until is not None:
            self.waiting += 1

    @property
    def did_something(self) -> bool:
        return bool(self.claimed or self.errors)

    def counts(self) -> str:
        """The counts an operator reads in the log."""
        return (
            f"claimed {self.claimed}, finished {self.finished}, failed {self.failed}, waiting {self.waiting}, "
            f"blocked {len(self.blocked)}, errors {len(self.errors)}"
        )


class PassHost(Protocol):
    """What a pass needs of its ``Orchestrator``."""

    store: Store
    clock: Clock
    registry: Registry
    runner: Runner
    extensions: Extensions
    hooks: HookCaller
    lease_seconds: float
    batch_size: int
    group_commit: int
    concurrency: int
    claimed_at: datetime | None  # what the last claim read as now: the idle wait's timers start there

    def new_lease_token(self) -> str: ...


def run_pass(host: PassHost) -> PassSummary:
    """Claim up to ``batch_size`` due pipelines, advance each (their hooks up to ``concurrency``
    at once, their transitions in groups of ``group_commit``), and return what happened."""
    host.store.warn_if_unguarded()
    started = time.perf_counter()
    summary = PassSummary()
    host.extensions.pass_started(summary)
    with LeaseKeeper(host.store, host.lease_seconds, host.clock, host.extensions.lease_lost) as keeper:
        since = time.monotonic()  # before the lease's time is read: see LeaseKeeper
        # grouped, the claim stores the hook marks too (shared, as a round's would be): the
        # first hooks start after one commit, the claim, as in the worker
        mark = _grouped(host)
        claimed, lags = claim(host, host.batch_size, mark=mark)
        keeper.hold(claimed, since)
        summary.claimed = len(claimed)
        marked = marked_by(claimed, host.claimed_at) if mark else frozenset()
        results = _drive(host, claimed, advancings(host, claimed, keeper, marked), marked)
        # the leases of advances that ended on a store failure (an outage, a lost answer):
        # given back now if the store answers, so that the next pass (cron) resumes them at
        # once, not after the lease, with no crash charged; else they run out as before
        keeper.give_back()
    for pipeline, result in zip(claimed, results, strict=True):
        tally(host, summary, pipeline, result)
    pass_ended(host, summary, lags, time.perf_counter() - started)
    if summary.did_something:
        logger.info("pass: %s", summary.counts())
    return summary


def _grouped(host: PassHost) -> bool:
    """The pass stores its transitions in rounds of group commit (when it claims more than one)."""
    return host.group_commit > 1 and host.batch_size > 1 and host.store.has_transaction


def _drive(
    host: PassHost, claimed: list[PipelineRecord], writings: list[Writing[Result]], marked: frozenset[str]
) -> list[Result]:
    store = host.store
    if _grouped(host) and len(claimed) > 1:
        # suspects of a crash in an earlier round run alone, so that a crash is pinned on one
        # (a mark our claim stored is no suspect's: ``marked_by``)
        alone = [i for i, p in enumerate(claimed) if suspect(p, marked)]
        with store.session():
            return write_in_rounds(store, writings, group=host.group_commit, concurrency=host.concurrency, alone=alone)
    if host.concurrency > 1 and len(claimed) > 1:
        # No connection is held through a hook: with more pipelines at once than pooled
        # connections, each thread takes one only for its reads and commits.
        with ThreadPoolExecutor(host.concurrency, thread_name_prefix="prorch") as pool:
            return list(pool.map(functools.partial(write_each, store), writings))
    with store.session():  # one set of connections for the whole pass
        return [write_each(store, writing) for writing in writings]


def claim(host: PassHost, limit: int, *, mark: bool = False) -> tuple[list[PipelineRecord], list[float]]:
    """Claim up to ``limit`` due pipelines; with how late each was (seconds). The caller holds
    their leases (``LeaseKeeper.hold``, with ``time.monotonic()`` read before this call). With
    ``mark`` the claim stores the hook marks too, where the backend can (``ClaimRequest.mark``;
    which it did: ``marked_by``)."""
    now = host.clock.now()
    host.claimed_at = now
    lease_until = now + timedelta(seconds=host.lease_seconds)
    limits, classes = host.extensions.claim_limits(), runnable(host.registry)
    request = ClaimRequest(now, host.new_lease_token(), lease_until, limit, limits, classes, mark=mark)
    claimed = host.store.claim(request)
    return claimed, [(now - p.next_run_at).total_seconds() for p in claimed if p.next_run_at is not None]


Claimed = tuple[list[PipelineRecord], list[float], Mapping[str, list[StepRecord]] | None]
"""What a worker's claim brings back: the pipelines, how late each was, and their steps (None:
not read yet)."""


def claim_and_read(host: PassHost, limit: int, *, mark: bool = False) -> Claimed:
    """``claim``, then the claimed pipelines' steps (``Store.steps_of_many``: those it could not
    read are read by their advance), in the same thread: a worker's claim thread does both,
    so that its loop does not wait for the read (a round trip a claim)."""
    claimed, lags = claim(host, limit, mark=mark)
    return claimed, lags, host.store.steps_of_many([pipeline.uuid for pipeline in claimed])


def marked_by(claimed: list[PipelineRecord], now: datetime | None) -> frozenset[str]:
    """The claimed pipelines whose hook mark the claim made at ``now`` (``ClaimRequest.mark``):
    shared, no crash charged, and of the claim's time. A mark left by a dead worker is older
    than its lease, which ran out before this claim could take the pipeline."""
    if now is None:
        return frozenset()
    return frozenset(p.uuid for p in claimed if p.hook_shared and not p.crashes and p.hook_started_at == now)


def suspect(pipeline: PipelineRecord, marked: frozenset[str]) -> bool:
    """A suspect of a crash: a crash charged, or a hook mark that our claim did not store (a
    dead worker's); it runs alone, so that a crash is pinned on one."""
    return bool(pipeline.crashes or (pipeline.hook_started_at is not None and pipeline.uuid not in marked))


def advancings(
    host: PassHost,
    claimed: list[PipelineRecord],
    keeper: LeaseKeeper,
    marked: frozenset[str] = frozenset(),
    steps: Mapping[str, list[StepRecord]] | None = None,
) -> list[Writing[Result]]:
    """The advance of each claimed pipeline, to drive; their steps are read in one go (unless
    given: read by the worker's claim thread, ``claim_and_read``). ``marked``: those whose
    claim stored their hook mark (``marked_by``)."""
    if steps is None:
        steps = host.store.steps_of_many([pipeline.uuid for pipeline in claimed])  # one read, not one each
    return [
        advancing(host.runner, pipeline, keeper, steps.get(pipeline.uuid), marked=pipeline.uuid in marked)
        for pipeline in claimed
    ]


def tally(host: PassHost, summary: PassSummary, pipeline: PipelineRecord, result: Result) -> None:
    """Count one ended advance in ``summary`` (``on_ended`` told of a pipeline that ended)."""
    if isinstance(result, Outcome):
        summary.add(result)
        if result.status in TERMINAL:
            host.extensions.call("on_ended", pipeline, result.status)
    else:
        summary.errors[pipeline.uuid] = result


def pass_ended(host: PassHost, summary: PassSummary, lags: list[float], seconds: float) -> None:
    """Tell the extensions a pass (or a worker's interval of work) ended."""
    summary.abandoned_hooks = host.hooks.abandoned
    host.extensions.call("on_pass_end", summary, lags, seconds)


def runnable(registry: Registry) -> Runnable:
    """The (name, version) of every pipeline class registered here: what this worker claims."""
    return frozenset((name, version) for name, versions in registry.pipelines.items() for version in versions)


def advancing(
    runner: Runner,
    pipeline: PipelineRecord,
    keeper: LeaseKeeper,
    steps: list[StepRecord] | None,
    *,
    marked: bool = False,
) -> Writing[Result]:
    """One pipeline's advance; an error is logged and recorded on it, and the pass goes on."""
    try:
        return (yield from runner.advancing(pipeline, keeper, steps, marked=marked))
    except (LeaseLostError, UnconfirmedWriteError) as exc:
        logger.warning("%s", exc, extra={"pipeline_uuid": pipeline.uuid})
        return f"{type(exc).__name__}: {exc}"
    except ConcurrentUpdateError as exc:
        logger.warning(
            "pipeline %s: write refused, another orchestrator holds it: %s",
            pipeline.uuid,
            exc,
            extra={"pipeline_uuid": pipeline.uuid},
        )
        return f"{type(exc).__name__}: {exc}"
    except RepositoryError as exc:  # the store's failure, not the engine's: no traceback
        if isinstance(exc, StoreUnreachableError):  # our lease stays stored: give it back once the store is
            keeper.give_back_later(pipeline.uuid)
        logger.error(
            "pipeline %s: store error; what was not stored is done again in a later pass: %s",
            pipeline.uuid,
            exc,
            extra={"pipeline_uuid": pipeline.uuid},
        )
        runner.journal.record_error(pipeline, exc)
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        logger.exception("pipeline %s: advance failed: %s", pipeline.uuid, exc, extra={"pipeline_uuid": pipeline.uuid})
        keeper.releasing(pipeline.uuid)
        runner.journal.record_error(pipeline, exc)
        return f"{type(exc).__name__}: {exc}"
    finally:
        keeper.drop(pipeline.uuid)  # its last write is stored: the lease is released
