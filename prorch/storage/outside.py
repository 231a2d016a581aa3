"""Writes from outside the worker that holds a pipeline: a cancel request and a message's
wake-up. Each is a compare-and-set on the pipeline record, read again and retried when another
writer got there first; the holder's next write is then refused, and it merges the change
(``Journal.merge``), so an outside write never costs it its transition."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from prorch.model.clock import Clock
from prorch.model.exceptions import (
    ConcurrentUpdateError,
    InvalidMessageError,
    InvalidParamsError,
    InvalidStateError,
    PipelineNotFoundError,
    UnstorableValueError,
)
from prorch.model.jsonvalue import checked_copy
from prorch.model.records import EventRecord, MessageRecord, PipelineRecord, new_uuid
from prorch.model.status import TERMINAL, EventType, Status
from prorch.storage.store import Store

logger = logging.getLogger(__name__)

CHANGE_ATTEMPTS = 20
"""Reads and writes of one outside change before giving up (other writers kept winning)."""

MAX_NOTE = 1000
"""Characters an operator's actor or reason may have."""

MAX_MESSAGE_NAME = 200
"""Characters a message's name may have (the stores' ``messages.name`` column)."""

Change = Callable[[PipelineRecord, datetime], list[EventRecord] | None]
"""Applies a change to a freshly read record; returns the events to store with it, or None when
there is nothing to write."""


def change_pipeline(store: Store, clock: Clock, uuid: str, change: Change, attempts: int = CHANGE_ATTEMPTS) -> bool:
    """Read the pipeline, apply ``change``, write it by compare-and-set; read again and retry
    when another writer got there first. False when every attempt was beaten."""
    for _ in range(attempts):
        record = store.get_pipeline(uuid)
        if record is None:
            raise PipelineNotFoundError(f"no pipeline with uuid {uuid} is stored", uuid=uuid)
        stored = store.tracking([record])
        events = change(record, clock.now())
        if events is None:
            return True
        try:
            store.commit([record], events, snapshots=stored)
            return True
        except ConcurrentUpdateError:
            continue
    return False


def operator_note(actor: str | None = None, reason: str | None = None) -> dict[str, str]:
    """Who acted and why, for the data of the history event an operator's cancel, retry or rerun
    writes (only what was given); a value that is not a short text is refused before anything
    is written."""
    note: dict[str, str] = {}
    for name, value in (("actor", actor), ("reason", reason)):
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > MAX_NOTE or "\x00" in value:
            raise InvalidParamsError(
                f"{name} must be a text of at most {MAX_NOTE} characters without NUL, got {type(value).__name__} "
                f"of length {len(value) if isinstance(value, str) else '-'}"
            )
        if value.strip():
            note[name] = value.strip()
    return note


def request_cancel(store: Store, clock: Clock, uuid: str, note: dict[str, str] | None = None) -> None:
    """Store a cancel request for the worker holding the pipeline (it cancels at its next
    transition, or the next worker does); ``note`` (an operator's actor and reason) goes into
    the request's event."""

    def change(record: PipelineRecord, now: datetime) -> list[EventRecord] | None:
        if record.status in TERMINAL:
            return None
        record.cancel_requested = True
        record.next_run_at = now
        event = EventRecord(
            uuid=new_uuid(),
            pipeline_uuid=uuid,
            type=EventType.PIPELINE_CANCEL_REQUESTED,
            at=now,
            seq=(record.revision + 1) * 1000,
            data={"held_by": record.lease_owner, **(note or {})},
        )
        return [event]

    if not change_pipeline(store, clock, uuid, change):
        raise InvalidStateError(f"pipeline {uuid} kept changing while a cancel was requested; try again")


NO_PAYLOAD = True
"""What a message sent without a payload carries: ``receive()`` returns None only when no
message waits, so such a message must be something else."""


def send(store: Store, clock: Clock, uuid: str, name: str, payload: Any = NO_PAYLOAD) -> MessageRecord:
    """Store a message for a pipeline that has not ended and make the pipeline due at once. A
    payload of None is refused: the receiver would take the message for none."""
    if not isinstance(name, str) or not name:
        raise InvalidMessageError("a message needs a non-empty name")
    if len(name) > MAX_MESSAGE_NAME:
        raise InvalidMessageError(f"a message name is at most {MAX_MESSAGE_NAME} characters, got {len(name)}")
    if "\x00" in name:
        raise InvalidMessageError(f"message name {name!r} has a NUL character (\\x00), which PostgreSQL cannot store")
    if payload is None:
        raise InvalidMessageError(
            f"message {name!r} has the payload None, which its receiver could not tell from no message "
            "(receive() returns None when no message waits): leave the payload out (the message then "
            "carries True) or send a value such as {}"
        )
    try:
        payload = checked_copy(payload, "payload")
    except UnstorableValueError as exc:
        raise InvalidMessageError(f"message payload cannot be stored: {exc}") from exc
    sent_at = clock.now()
    last = store.last_sent_at(uuid)
    if last is not None and last >= sent_at:  # keep "oldest first" well defined
        sent_at = last + timedelta(microseconds=1)
    message = MessageRecord(uuid=new_uuid(), pipeline_uuid=uuid, name=name, payload=payload, sent_at=sent_at)
    store.insert_all([message])
    wake(store, clock, uuid)
    return message


def wake(store: Store, clock: Clock, uuid: str) -> None:
    """Make the pipeline due now. A worker holding it sees its next write refused and merges
    the wake-up."""

    def change(record: PipelineRecord, now: datetime) -> list[EventRecord] | None:
        if record.status != Status.PENDING:
            return None
        held = record.lease_expires_at is not None and record.lease_expires_at > now
        if not held and record.next_run_at is not None and record.next_run_at <= now:
            return None  # already due, and nobody to tell
        record.next_run_at = now if record.next_run_at is None else min(record.next_run_at, now)
        return []

    if not change_pipeline(store, clock, uuid, change):
        logger.warning("pipeline %s kept changing; its message is stored and will be read at its next run", uuid)
