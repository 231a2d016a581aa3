"""What a hook may reach beyond its own step, lent for one hook call: messages (``receive``),
plugins (``plugins``), child pipelines (``start_child``, ``child_result``) and, for reactions,
starting pipelines. Its effects join the transition
only if the hook returns without raising."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prorch.engine.state import Run
from prorch.engine.transitions import new_event
from prorch.model.clock import Clock
from prorch.model.definition import PipelineDefinition
from prorch.model.exceptions import StepUsageError
from prorch.model.records import EventRecord, JSONDict, MessageRecord, StreamRecord
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL, EventType
from prorch.model.step import Step
from prorch.storage.creation import create_pipelines
from prorch.storage.outside import NO_PAYLOAD
from prorch.storage.results import CHILD_ENDED, result_of
from prorch.storage.store import MESSAGE_PAGE, Store

logger = logging.getLogger("prorch.engine.runtime")
PROGRESS_EVERY = 0.5
"""Seconds between two live writes of one hook call's ``progress()``: a hook reporting in a
tight loop writes a few times a second; its last report is stored with its transition."""


@dataclass
class Inbox:
    """The unread messages of one name this hook call has read, oldest first; the next page
    is read (after ``after``) only when these do not have what the hook asks for."""

    unread: dict[str, MessageRecord] = field(default_factory=dict)
    """By uuid, oldest first."""
    by_child: dict[str, list[str]] = field(default_factory=dict)
    """``CHILD_ENDED`` messages: a child's uuid -> its messages' uuids, oldest first."""
    after: tuple[datetime, str] | None = None
    complete: bool = False

    def add(self, message: MessageRecord) -> None:
        self.unread[message.uuid] = message
        child = _child_of(message)
        if child is not None:
            self.by_child.setdefault(child, []).append(message.uuid)

    def remove(self, message: MessageRecord) -> None:
        del self.unread[message.uuid]
        child = _child_of(message)
        if child is not None:
            self.by_child[child].remove(message.uuid)
            if not self.by_child[child]:
                del self.by_child[child]


def _child_of(message: MessageRecord) -> str | None:
    """The child whose end a ``CHILD_ENDED`` message tells; None for any other message."""
    if message.name != CHILD_ENDED or not isinstance(message.payload, dict):
        return None
    child = message.payload.get("child")
    return child if isinstance(child, str) else None


class HookRuntime:
    """What one hook call may reach beyond its step: messages, plugins, creating pipelines.
    Implements ``prorch.model.step.StepRuntime``."""

    def __init__(self, store: Store, registry: Registry, clock: Clock, run: Run, now: datetime) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.run = run
        self.now = now
        self.consumed: list[MessageRecord] = []
        self.events: list[EventRecord] = []
        self.inboxes: dict[str, Inbox] = {}
        self.lock = threading.Lock()
        self.closed = False  # the hook call ended (returned, raised or ran past its timeout)
        self.progress_at: float | None = None  # time.monotonic() of the last live progress write
        self.progress_live = True  # False once a write found the lease lost or the store keeps it for the transition

    def close(self) -> None:
        """The hook call ended: a thread of it still running (past its timeout) writes nothing more."""
        with self.lock:
            self.closed = True

    def emit_now(self, step: Step, value: Any) -> None:
        """Store one stream entry at once, numbered after the last stored one, while this
        worker holds the pipeline's lease (``Store.append_stream``); the hook's other entries,
        stored with its transition, are numbered after it."""
        with self.lock:
            if self.closed:
                raise StepUsageError("emit(now=True) after its hook call ended (it ran past its timeout)")
            run, uuid = self.run, self.run.pipeline.uuid
            if run.stream_seq is None:
                run.stream_seq = self.store.last_stream_seq(uuid)
            seq = run.stream_seq + 1
            entry = StreamRecord(uuid=f"{uuid}:{seq}", pipeline_uuid=uuid, seq=seq, at=self.clock.now(), value=value)
            self.store.append_stream(entry, run.token)
            run.stream_seq = seq

    def progress_now(self, step: Step, progress: JSONDict) -> None:
        """Store ``progress()`` at once for ``prorch show`` and the dashboard, at most every
        ``PROGRESS_EVERY`` seconds, while this worker holds the lease. Never fails the hook:
        a store error or a lost lease is logged, and the transition stores the last report."""
        with self.lock:
            now = time.monotonic()
            if self.closed or not self.progress_live:
                return
            if self.progress_at is not None and now - self.progress_at < PROGRESS_EVERY:
                return
            self.progress_at = now
            record = next(s for s in self.run.steps if s.uuid == step.uuid)
            try:
                stored = self.store.write_progress(record, self.run.token, progress)
            except Exception as exc:  # a store error: the transition stores it
                logger.warning("step %s of %s: storing its progress failed: %s", step.name, record.pipeline_uuid, exc)
                return
            if stored:
                record.progress = progress  # kept by the transition, also when the hook raises
                return
            self.progress_live = False  # the lease is lost, or the store keeps progress for the transition
            if stored is False:
                logger.warning("step %s of %s: its lease is lost; progress not stored", step.name, record.pipeline_uuid)

    def receive(self, step: Step, name: str) -> Any:
        inbox = self._inbox(name)
        while not inbox.unread and not inbox.complete:
            self._read_page(name, inbox)
        message = next(iter(inbox.unread.values()), None)
        if message is None:
            return None
        self._take(step, inbox, message)
        return message.payload if message.payload is not None else NO_PAYLOAD  # stored before None was refused

    def _inbox(self, name: str) -> Inbox:
        inbox = self.inboxes.get(name)
        if inbox is None:
            inbox = self.inboxes[name] = Inbox()
        return inbox

    def _read_page(self, name: str, inbox: Inbox) -> None:
        """Read the next page of the pipeline's unread messages ``name`` into ``inbox``: one
        indexed read, of unread rows only, so a hook's reads cost what it receives."""
        page = self.store.unread_messages(self.run.pipeline.uuid, name, inbox.after)
        inbox.complete = len(page) < MESSAGE_PAGE
        taken = {m.uuid for m in self.run.consumed}  # read by an earlier hook, not yet stored
        for message in page:
            inbox.after = (message.sent_at, message.uuid)
            if message.uuid not in taken:
                inbox.add(message)

    def _take(self, step: Step, inbox: Inbox, message: MessageRecord) -> None:
        """Mark ``message`` read with this hook's transition."""
        inbox.remove(message)
        message.consumed_at = self.now
        self.consumed.append(message)
        record = next(s for s in self.run.steps if s.uuid == step.uuid)
        received = EventType.MESSAGE_RECEIVED
        self.events.append(new_event(self.run, received, record, self.now, name=message.name, message=message.uuid))

    def plugins(self, step: Step, point: str, kwargs: dict[str, Any]) -> list[Any]:
        found = self.registry.plugins_for(step.name or "", point, step.tenant)
        return [plugin.func(step, **kwargs) for plugin in found]

    def create_pipeline(self, pipeline: Any, params: Any, uuid: str, options: dict[str, Any]) -> None:
        """Create a pipeline with a given uuid, once (for reactions). ``options``: ``tenant``,
        ``context``, ``priority`` and ``version``, as ``Pipeline.create`` takes them."""
        version = options.pop("version", None)
        definition: type[PipelineDefinition] = (
            pipeline if isinstance(pipeline, type) else self.registry.pipeline(pipeline)
        )
        if version is not None and version != definition.version:
            definition = self.registry.pipeline(definition.name or "", version)
        create_pipelines(
            self.store, definition, [params], [None], registry=self.registry, clock=self.clock, uuid=uuid, **options
        )

    def start_child(self, step: Step, pipeline: Any, params: Any, key: str | None) -> str:
        definition: type[PipelineDefinition] = (
            pipeline if isinstance(pipeline, type) else self.registry.pipeline(pipeline)
        )
        parent = self.run.pipeline.uuid
        child_key = f"child:{parent}:{step.name}:{key if key is not None else definition.name}"
        ((record, _),) = create_pipelines(
            self.store, definition, [params], [child_key], registry=self.registry, clock=self.clock,
            tenant=step.tenant, parent_uuid=parent,
        )  # fmt: skip
        return record.uuid

    def child_result(self, step: Step, uuid: str) -> Any:
        record = self.store.get_pipeline(uuid)
        if record is None or record.parent_uuid != self.run.pipeline.uuid:
            raise StepUsageError(f"child_result({uuid!r}): no child of this pipeline has that uuid")
        result = result_of(record, self.store.steps_of(uuid), self.registry)
        if record.status in TERMINAL:  # its wake-up message is read: it wakes nothing again
            inbox = self._inbox(CHILD_ENDED)
            while uuid not in inbox.by_child and not inbox.complete:
                self._read_page(CHILD_ENDED, inbox)
            if uuid in inbox.by_child:
                self._take(step, inbox, inbox.unread[inbox.by_child[uuid][0]])
        return result

    def merge(self) -> None:
        """The hook returned: its effects join the run's next transition."""
        self.run.consumed.extend(self.consumed)
        self.run.events.extend(self.events)
