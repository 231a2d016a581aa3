"""Reading a pipeline's records into a ``Run`` and writing each transition back as one unit.

A transition is one ``Write``, yielded to whoever drives the runner (``rounds``): the changed
steps, the pipeline record (status derived from the steps, lease renewed or released) and the
transition's events, stored together, by compare-and-set on the pipeline's revision. A worker
that lost its lease has its write refused; a write refused while we still hold the lease was an
outside request (a message's wake-up, a cancel request, a priority change), which ``merge``
takes in before the write is made again."""

from __future__ import annotations

import enum
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from prorch.engine import transitions
from prorch.engine.extension import Extensions
from prorch.engine.policy import Policies
from prorch.engine.state import Outcome, Run, Writing
from prorch.model.clock import Clock
from prorch.model.exceptions import ConcurrentUpdateError, UnconfirmedWriteError
from prorch.model.jsonvalue import copy_json
from prorch.model.records import ErrorInfo, PipelineRecord, Record, StepRecord, StreamRecord
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL, Status
from prorch.model.step import Step, StepRuntime
from prorch.storage.store import Store, Write

logger = logging.getLogger(__name__)

MAX_MERGES = 1000
"""Outside writes merged into one transition before giving up (a safety net, never reached)."""


class Merge(enum.Enum):
    """What ``Journal.merge`` found after our write was refused."""

    MERGED = "merged"  # we still hold the lease: the outside change is taken in, write again
    LEASE_LOST = "lease lost"  # another worker holds the pipeline now (or it ended): stop
    UNMOVED = "unmoved"  # still ours and unchanged: another record (a step) refused it, no merge helps


class Journal:
    """Loads runs and commits their transitions, against one store."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        clock: Clock,
        policies: Policies,
        lease_seconds: float,
        extensions: Extensions | None = None,
    ) -> None:
        self.store = store
        self.extensions = extensions or Extensions()
        self.registry = registry
        self.clock = clock
        self.policies = policies
        self.lease_seconds = lease_seconds

    # --- reading -------------------------------------------------------------------------------

    def load(self, pipeline: PipelineRecord, steps: list[StepRecord] | None = None) -> Run:
        """The run of a pipeline: its steps in order (read now, unless given as read with the
        pipeline's claim) and their registered classes. Raises ``NotRegisteredError`` when this
        worker does not have the code for it."""
        pipeline_cls = self.registry.pipeline(pipeline.name, pipeline.version)
        order = {cls.name: index for index, cls in enumerate(pipeline_cls.steps)}
        steps = sorted(
            self.store.steps_of(pipeline.uuid) if steps is None else steps,
            key=lambda s: s.position if s.position is not None else order.get(s.name, len(order)),
        )
        classes = {s.uuid: self.registry.step(s.name, s.version) for s in steps}
        params: Any = pipeline.params
        if pipeline_cls.Params is not None:
            params = pipeline_cls.Params.model_validate(pipeline.params)
        outputs = {s.name: s.output for s in steps if s.status == Status.FINISHED}
        # a rate limit counts claims (prorch.model.limit_rules): one claim, one hook
        hooks_left = 1 if pipeline_cls.rate_limit is not None else None
        return Run(
            pipeline=pipeline, steps=steps, classes=classes, params=params, outputs=outputs, hooks_left=hooks_left,
            definition=pipeline_cls, stored=self.store.tracking([pipeline, *steps]),
        )  # fmt: skip

    def emitted(self, run: Run, values: list[Any], now: datetime) -> None:
        """A hook's ``emit`` values join the run's next transition, numbered after the last
        stored entry (read once per claim: the lease keeps other writers out)."""
        if not values:
            return
        if run.stream_seq is None:
            run.stream_seq = self.store.last_stream_seq(run.pipeline.uuid)
        uuid = run.pipeline.uuid
        seq = run.stream[-1].seq if run.stream else run.stream_seq
        for offset, value in enumerate(values, start=1):
            run.stream.append(
                StreamRecord(uuid=f"{uuid}:{seq + offset}", pipeline_uuid=uuid, seq=seq + offset, at=now, value=value)
            )

    def reload(self, run: Run) -> bool:
        """Read the run's records again, dropping what was not written; False if the lease is lost."""
        fresh = self.store.get_pipeline(run.pipeline.uuid)
        if fresh is None or (run.token is not None and fresh.lease_owner != run.token):
            self._not_ours(run, fresh)
            return False
        reloaded = self.load(fresh)
        run.pipeline, run.steps, run.outputs = reloaded.pipeline, reloaded.steps, reloaded.outputs
        run.stored = reloaded.stored
        run.forget_pending()
        return True

    def has_mail(self, run: Run) -> bool:
        return self.store.has_unread_messages(run.pipeline.uuid)

    @staticmethod
    def instance(run: Run, step: StepRecord, now: datetime, runtime: StepRuntime | None = None) -> Step:
        """A step object for one hook call. It gets its own copies of the params and outputs, so
        a hook that changes them changes nothing stored."""
        params = run.params.model_copy(deep=True) if isinstance(run.params, BaseModel) else copy_json(run.params)
        outputs = copy_json(run.outputs)
        cls = run.classes[step.uuid]
        instance = cls(record=step, pipeline=run.pipeline, params=params, outputs=outputs, now=now, runtime=runtime)
        instance._definition = run.definition
        return instance

    # --- writing -------------------------------------------------------------------------------

    def commit(self, run: Run, steps: list[StepRecord], *, stop: bool, mark: bool = True) -> Writing[bool]:
        """Persist one transition (yield it; resumed once stored); returns whether the pass goes
        on with this pipeline. Going on, the write marks the next hook running, unless ``mark``
        is False. Raises ``ConcurrentUpdateError`` when the lease was lost."""
        since = time.monotonic()  # before the lease's time is read: see LeaseKeeper
        now = self.clock.now()
        transitions.settle(run, now)
        pipeline = run.pipeline
        stop = stop or pipeline.status in TERMINAL
        if stop and run.keeper is not None:
            run.keeper.releasing(pipeline.uuid)
        for merged in range(MAX_MERGES):
            if merged:
                since = time.monotonic()
                now = self.clock.now()
            transitions.schedule(
                run, stop=stop, now=now, lease_seconds=self.lease_seconds, policies=self.policies, mark=mark
            )
            added: list[Record] = [*run.events, *run.stream]
            if self.extensions.on_transition:
                added += self.extensions.records_for(pipeline.name, run.events, now)
            try:
                yield Write.of([*steps, pipeline], added, run.consumed, snapshots=run.stored, token=run.token)
                break
            except ConcurrentUpdateError as exc:
                merge = self.merge(run)
                if merge is Merge.UNMOVED:
                    raise self._unconfirmed(run) from exc
                if merge is not Merge.MERGED:
                    raise
        else:  # pragma: no cover - MAX_MERGES outside writes during one transition
            raise ConcurrentUpdateError(f"pipeline {pipeline.uuid} kept changing; giving up this transition")
        if not stop and run.keeper is not None:
            run.keeper.renewed(pipeline.uuid, since)
        if run.stream:  # stored: the next entries follow these
            run.stream_seq, run.stream = run.stream[-1].seq, []
        run.forget_pending()
        run.dirty = False
        return not stop

    def merge(self, run: Run) -> Merge:
        """Our write was refused. If our lease token still holds the pipeline, someone wrote it
        from outside: take their changes (revision, cancel request, priority) in. Without a
        transaction nothing is merged (the write's steps may be stored already), nor when the
        pipeline has not moved: another of the write's records refused it, and writing again
        would be refused again (it was, ``MAX_MERGES`` times)."""
        if run.token is None:
            return Merge.LEASE_LOST
        fresh = self.store.get_pipeline(run.pipeline.uuid)
        if fresh is None or fresh.lease_owner != run.token:
            self._not_ours(run, fresh)
            return Merge.LEASE_LOST
        if fresh.status in TERMINAL or not self.store.has_transaction:
            return Merge.LEASE_LOST
        pipeline = run.pipeline
        if fresh.revision == pipeline.revision:  # e.g. our own write, stored with its answer lost, moved a step
            return Merge.UNMOVED
        pipeline.revision = fresh.revision
        pipeline.priority = fresh.priority
        pipeline.cancel_requested = pipeline.cancel_requested or fresh.cancel_requested
        run.woken = True  # a message may have arrived: be due again at once
        return Merge.MERGED

    @staticmethod
    def _unconfirmed(run: Run) -> UnconfirmedWriteError:
        """Our write, reported failed, left the pipeline ours and unchanged (likely stored, its
        answer lost): nothing of it runs here any more, so its lease, and the hook mark it may
        have stored, are given back at the keeper's next chance, not left to run out (the mark
        would then charge a crash). ``give_back`` is a compare-and-set on our token: safe
        whatever was stored."""
        uuid = run.pipeline.uuid
        if run.keeper is not None:
            run.keeper.give_back_later(uuid)
        return UnconfirmedWriteError(
            f"pipeline {uuid}: write refused, yet the pipeline is still ours and unchanged (likely our own "
            "write, stored with its answer lost); its lease is given back, it resumes at the next claim",
            uuid=uuid,
        )

    @staticmethod
    def _not_ours(run: Run, fresh: PipelineRecord | None) -> None:
        """Read again after a write of ours failed, the stored lease is not our token: tell the
        keeper at once (before its next turn could see it), which decides whether it was lost."""
        if fresh is not None and run.keeper is not None:
            run.keeper.taken(run.pipeline.uuid, fresh.lease_owner)

    def mark_hook_running(self, run: Run) -> Writing[None]:
        """Store that a hook is about to run, unless the last write already did (it does when
        the pass goes on with this pipeline): one write per advance, not per hook. Then make
        sure our lease is live for a safe margin, or raise (``LeaseKeeper.confirm``): that last
        write may have been stored a while ago (in a round of group commit, behind a slow
        store), and its lease may have run out since."""
        if run.pipeline.hook_started_at is None:
            yield from self.commit(run, [], stop=False)
        if run.keeper is not None:
            run.keeper.confirm(run.pipeline.uuid)

    def park(self, run: Run) -> Writing[None]:
        """Stop for now without running a hook: release the lease, be due again when the next
        step's wait, backoff or deadline says (at once when it is due now). Writes nothing when
        the stored record says so already."""
        pipeline = run.pipeline
        until = transitions.wake_time(run, self.clock.now(), self.policies)
        unchanged = pipeline.lease_owner is None and pipeline.hook_started_at is None and not run.dirty
        if unchanged and pipeline.next_run_at == until:
            return
        yield from self.commit(run, [], stop=True)

    def record_error(self, claimed: PipelineRecord, exc: Exception) -> None:
        """An advance failed in the engine (not in a hook): keep the error on the pipeline for a
        look and release its lease, best effort (the repository may be what failed). An error
        is not a crash: no crash is charged."""
        try:
            record = self.store.get_pipeline(claimed.uuid)
            if record is None or record.status in TERMINAL:
                return
            stored = self.store.tracking([record])
            record.last_error = ErrorInfo.from_exception(exc)
            if claimed.lease_owner is None or record.lease_owner == claimed.lease_owner:
                transitions.release(record)
                record.hook_started_at = None
            self.store.commit([record], snapshots=stored)
        except Exception as again:  # the repository is still down: the lease expires by itself
            logger.warning("pipeline %s: could not record the error: %s", claimed.uuid, again)

    def leave_blocked(self, pipeline: PipelineRecord, reason: str, *, unmark: bool = False) -> Writing[Outcome]:
        """Code for this record is not deployed: touch nothing but our own lease (and the hook
        mark our claim stored, with ``unmark``)."""
        if pipeline.lease_owner is not None:
            stored = self.store.tracking([pipeline])
            token = pipeline.lease_owner
            transitions.release(pipeline)
            if unmark:
                pipeline.hook_started_at, pipeline.hook_shared = None, False
            pipeline.next_run_at = self.clock.now() + timedelta(seconds=self.lease_seconds)
            yield Write.of([pipeline], snapshots=stored, token=token)
        return Outcome(pipeline.uuid, pipeline.status, blocked=reason)
