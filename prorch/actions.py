"""The orchestrator's actions on stored pipelines from outside a pass (``Orchestrator.cancel``,
``retry``, ``rerun``, ``send``, ``bulk``), a part of ``Orchestrator`` kept in a module of its
own, as its reads are (``prorch.reads``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prorch import bulk as bulk_actions
from prorch.engine.extension import Extensions
from prorch.engine.runner import Runner
from prorch.model.exceptions import InvalidStateError, NotRegisteredError
from prorch.model.pauses import Pause, make_pause
from prorch.model.records import EventRecord, MessageRecord, PipelineRecord, new_uuid
from prorch.model.status import TERMINAL, EventType, Status
from prorch.reads import Reads
from prorch.storage import creation, forking, outside
from prorch.summaries import PipelineState

logger = logging.getLogger("prorch.actions")


class Actions(Reads):
    """Cancelling, retrying, rerunning, messaging, and the same by filter; ``Orchestrator`` has
    these methods."""

    runner: Runner
    extensions: Extensions
    lease_seconds: float
    owner: str
    """This process's worker id: the stem of its lease tokens."""
    _claims: Iterator[int]

    def new_lease_token(self) -> str:
        """A token for one claim (a pass's, a worker's, a cancel's): a lease is ours only while
        the stored token is this one, so a hook thread abandoned in an earlier pass can never
        write over a later claim."""
        return f"{self.owner}#{next(self._claims)}"

    def cancel(self, uuid: str, *, actor: str | None = None, reason: str | None = None) -> PipelineState:
        """Cancel a pipeline that has not ended; its current step's ``on_cancel()`` runs once.
        ``actor`` and ``reason`` (who asked, and why) are recorded in the history event.

        If another worker holds the pipeline, a cancel request is stored instead: that worker's
        next transition is refused and it cancels the pipeline then (or the next worker does)."""
        note = outside.operator_note(actor, reason)
        record = self._require(uuid)
        if record.status in TERMINAL:
            raise InvalidStateError(f"pipeline {uuid} is already {record.status.value}; nothing to cancel")
        self._require_code(record, "cancelled")  # before the claim: a refusal leaves no lease behind
        cancelled = self.cancel_here(uuid, note)
        if cancelled is not None:
            self.extensions.call("on_ended", cancelled, Status.CANCELLED)
        return self.get(uuid)

    def cancel_here(self, uuid: str, note: dict[str, str] | None = None) -> PipelineRecord | None:
        """Cancel a pipeline in this process and return it, with no ``on_ended`` told; None when
        it had ended already, or another worker holds it (a cancel request is stored for that
        worker). ``note`` (an operator's actor and reason) goes into the event written."""
        now = self.clock.now()
        claimed = self.store.claim_one(uuid, now, self.new_lease_token(), now + timedelta(seconds=self.lease_seconds))
        if claimed is None:
            outside.request_cancel(self.store, self.clock, uuid, note)
            return None
        if claimed.status in TERMINAL:
            return None
        self.runner.cancel(claimed, note)
        return claimed

    def retry(self, uuid: str, *, actor: str | None = None, reason: str | None = None) -> PipelineState:
        """Resume a failed pipeline from its failed step, with fresh attempts. The errors it
        clears stay in the ``pipeline.retried`` event, with ``actor`` and ``reason``."""
        note = outside.operator_note(actor, reason)
        record = self._require(uuid)
        if record.status != Status.FAILED:
            raise InvalidStateError(f"pipeline {uuid} is {record.status.value}; only a failed pipeline can be retried")
        self._require_code(record, "retried")
        if record.key is None:
            self.runner.retry(record, note)
            return self.get(uuid)
        with self.store.transaction():  # under the key's lock, as a keyed create is
            self.store.lock_key(record.key)
            holder = creation.live_holder(self.store, record.key, other_than=uuid)
            if holder is not None:
                raise InvalidStateError(
                    f"pipeline {uuid} has key {record.key!r}, and key {record.key!r} names pipeline {holder.name} "
                    f"{holder.uuid}, which has not ended ({holder.status.value}): a retry would run two pipelines "
                    "of one key; wait for that one to end (or cancel it), or rerun this one (a rerun has no key)"
                )
            self.runner.retry(record, note)
        return self.get(uuid)

    def rerun(
        self,
        uuid: str,
        from_step: str,
        params: dict[str, Any] | None = None,
        *,
        cancel_original: bool = False,
        actor: str | None = None,
        reason: str | None = None,
    ) -> PipelineState:
        """Start a new pipeline of the same class and version that reuses the outputs of the
        steps before ``from_step`` and runs from it on; ``params`` replaces the fields it names.
        A live original is refused unless ``cancel_original`` (it is cancelled first); the
        original is otherwise left as it is, with a ``pipeline.rerun`` event naming the new one.
        ``actor`` and ``reason`` go into both pipelines' events (and the cancel's)."""
        note = outside.operator_note(actor, reason)
        record = self._require(uuid)
        self._require_code(record, "rerun")
        plan = forking.plan_rerun(record, self.store.steps_of(uuid), from_step, registry=self.registry, params=params)
        if record.status not in TERMINAL:
            if not cancel_original:
                raise InvalidStateError(
                    f"pipeline {uuid} is {record.status.value}, still running: rerun an ended pipeline, or cancel "
                    "it first with cancel_original=True (the CLI's --cancel-original)"
                )
            self.cancel(uuid, actor=actor, reason=reason)
            plan = forking.plan_rerun(
                self._require(uuid), self.store.steps_of(uuid), from_step, registry=self.registry, params=params
            )
        return self.get(forking.store_rerun(self.store, plan, self.clock, self.registry, note).uuid)

    def bulk(
        self,
        action: str | bulk_actions.BulkAction,
        filters: bulk_actions.Filters,
        *,
        dry_run: bool = False,
        batch_size: int = bulk_actions.DEFAULT_BATCH,
        progress: bulk_actions.Progress | None = None,
    ) -> bulk_actions.BulkSummary:
        """Cancel, retry, rerun or purge every pipeline ``filters`` match (those of ``query``), a
        page of ``batch_size`` at a time, each as its single action would; ``dry_run`` counts.
        Give a ``BulkAction`` for rerun's step and params or purge's age and statuses."""
        chosen = bulk_actions.BulkAction(action) if isinstance(action, str) else action
        return bulk_actions.apply(
            self, chosen, filters, self._act_on, dry_run=dry_run, batch_size=batch_size, progress=progress
        )

    def _act_on(self, action: bulk_actions.BulkAction, uuid: str) -> str | None:
        """A bulk action's single action on pipeline ``uuid``; the uuid of the pipeline a rerun
        created, else None."""
        if action.action == "cancel":
            self.cancel(uuid, actor=action.actor, reason=action.reason)
            return None
        if action.action == "retry":
            self.retry(uuid, actor=action.actor, reason=action.reason)
            return None
        rerun = self.rerun(uuid, action.from_step or "", action.params, cancel_original=action.cancel_original,
                           actor=action.actor, reason=action.reason)  # fmt: skip
        return rerun.pipeline.uuid

    def send(self, uuid: str, name: str, payload: Any = outside.NO_PAYLOAD) -> MessageRecord:
        """Store a message for pipeline ``uuid`` and make it due at once, even while it waits;
        a hook reads it with ``self.receive(name)``, exactly once. Without a payload, the
        message carries True; a payload of None is refused (``receive`` returns None for no
        message, so the receiver could not tell it from none)."""
        record = self._require(uuid)
        if record.status in TERMINAL:
            raise InvalidStateError(f"pipeline {uuid} is {record.status.value}; a message to it would never be read")
        return outside.send(self.store, self.clock, uuid, name, payload)

    def pause(
        self,
        *,
        name: str | None = None,
        version: int | None = None,
        tenant: str | None = None,
        uuid: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
    ) -> Pause:
        """Stop claiming the work of one scope until ``resume``: a class (``name``; every version,
        or ``version``), a ``tenant``, or one pipeline (``uuid``). One row is stored, whatever
        the number of pipelines, and it holds the pipelines created while it lasts; a hook
        running now finishes and stores its transition, and the next one waits. ``actor`` and
        ``reason`` are kept with the pause (and in a pipeline's history, for one pipeline)."""
        note = outside.operator_note(actor, reason)
        pause = make_pause(name=name, version=version, tenant=tenant, uuid=uuid, since=self.clock.now(), **note)
        if uuid is not None:
            record = self._require(uuid)
            if record.status in TERMINAL:
                raise InvalidStateError(f"pipeline {uuid} is already {record.status.value}; nothing to pause")
        with self.store.transaction():
            if not self.store.add_pause(pause):
                held = self.store.paused().by_scope.get(pause.scope)
                raise InvalidStateError(f"{held.describe() if held else pause.label()}: it is paused already")
            if uuid is not None:
                self._pause_event(uuid, EventType.PIPELINE_PAUSED, note)
        logger.info("%s", pause.describe())
        return pause

    def resume(
        self,
        *,
        name: str | None = None,
        version: int | None = None,
        tenant: str | None = None,
        uuid: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
    ) -> Pause:
        """End the pause of one scope (as ``pause`` names it) and return it; its due work is
        claimed at once (idle workers are woken, as by a create). A pipeline waiting for a
        time still waits for it."""
        note = outside.operator_note(actor, reason)
        wanted = make_pause(name=name, version=version, tenant=tenant, uuid=uuid)
        removed = self.store.remove_pause(wanted.scope)  # its own transaction: the wake-up follows its commit
        if removed is None:
            paused = ", ".join(p.label() for p in self.store.pauses()) or "nothing"
            raise InvalidStateError(f"{wanted.label()} is not paused (paused now: {paused})")
        if uuid is not None and self.store.get_pipeline(uuid) is not None:
            self._pause_event(uuid, EventType.PIPELINE_RESUMED, note)
        logger.info("resumed %s", removed.label())
        return removed

    def pauses(self) -> list[Pause]:
        """Every pause now in force, oldest first."""
        return self.store.pauses()

    def _pause_event(self, uuid: str, kind: EventType, note: dict[str, str]) -> None:
        """A pipeline's own pause or resume, in its history: after the outside events of its
        revision (a pause and its resume change no record, so they share one)."""
        base = (self._require(uuid).revision + 1) * 1000
        seq = max((e.seq + 1 for e in self.history(uuid) if base <= e.seq < base + 999), default=base)
        event = EventRecord(uuid=new_uuid(), pipeline_uuid=uuid, type=kind, at=self.clock.now(), seq=seq,
                            data=dict(note))  # fmt: skip
        self.store.insert_all([event])

    def _require_code(self, record: PipelineRecord, done: str) -> None:
        """``NotRegisteredError`` before anything is claimed or written, when the code of the
        pipeline or of its steps is not loaded in this process (the CLI without ``--app``)."""
        missing = self.blocked_reason(record, self.store.steps_of(record.uuid), patches=False)
        if missing is not None:
            raise NotRegisteredError(
                f"pipeline {record.uuid} ({record.name} v{record.version}) cannot be {done} here, its code is "
                f"not loaded: {missing}",
                name=record.name,
            )
