"""The orchestrator's actions on stored pipelines from outside a pass (``Orchestrator.cancel``,
``retry``, ``rerun``, ``send``, ``bulk``), a part of ``Orchestrator`` kept in a module of its
own, as its reads are (``prorch.reads``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prorch import bulk as bulk_actions
from prorch.engine.extension import Extensions
from prorch.engine.runner import Runner
from prorch.model.exceptions import InvalidStateError, NotRegisteredError
from prorch.model.records import MessageRecord, PipelineRecord
from prorch.model.status import TERMINAL, Status
from prorch.reads import Reads
from prorch.storage import forking, outside
from prorch.summaries import PipelineState


class Actions(Reads):
    """Cancelling, retrying, rerunning, messaging, and the same by filter; ``Orchestrator`` has
    these methods."""

    runner: Runner
    extensions: Extensions
    lease_seconds: float

    def new_lease_token(self) -> str:  # pragma: no cover - the Orchestrator's
        raise NotImplementedError

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
        return bulk_actions.apply(self, chosen, filters, dry_run=dry_run, batch_size=batch_size, progress=progress)

    def send(self, uuid: str, name: str, payload: Any = outside.NO_PAYLOAD) -> MessageRecord:
        """Store a message for pipeline ``uuid`` and make it due at once, even while it waits;
        a hook reads it with ``self.receive(name)``, exactly once. Without a payload, the
        message carries True; a payload of None is refused (``receive`` returns None for no
        message, so the receiver could not tell it from none)."""
        record = self._require(uuid)
        if record.status in TERMINAL:
            raise InvalidStateError(f"pipeline {uuid} is {record.status.value}; a message to it would never be read")
        return outside.send(self.store, self.clock, uuid, name, payload)

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
