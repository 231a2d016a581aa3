"""What is stored: the four record kinds, as msgspec Structs.

Records travel to and from repositories as plain JSON-compatible dicts (``to_dict`` /
``from_dict``), so any store can hold them. They are Structs rather than pydantic models because
the engine builds, changes and writes several per transition: a Struct is made, changed and
converted many times faster, and msgspec still validates every record on the way in
(``from_dict``). Pydantic stays at the edges: a pipeline's ``Params`` and a step's ``Output``.
Timestamps are UTC ISO-8601 strings with a fixed width, which sort correctly as text. Fields a
prorch 1.0.1 store lacks have defaults, so such a store loads as it is.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import os
import traceback as traceback_module
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

import msgspec

from prorch.model.status import EventType, RollbackState, Status

JSONDict = dict[str, Any]
RecordError = msgspec.ValidationError
"""What ``from_dict`` raises for data that is not a valid record."""


def new_uuid() -> str:
    """A random (version 4) uuid as text, exactly ``str(uuid.uuid4())``. Each call reads the
    system's randomness, so a forked process (gunicorn's preload, multiprocessing's fork) never
    repeats its parent's uuids, as a buffer of random bits copied into the child did. Formatted
    from the hex digits directly: ``uuid.UUID`` builds an int and checks its arguments, 4x the
    cost, and a transition makes one per event."""
    digits = _urandom(16).hex()
    # the version (4) replaces the 13th digit; the variant (RFC 4122: 0b10) the top bits of the 17th
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{_VARIANT[digits[16]]}{digits[17:20]}-{digits[20:]}"


_urandom = os.urandom
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def to_utc(moment: datetime) -> datetime:
    """Stored times are UTC; a naive time read back from a driver is taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def format_timestamp(moment: datetime) -> str:
    """Fixed-width UTC ISO-8601, so that text order is time order. Cached by the UTC time: one
    transition writes the same ``now`` in several places (updated_at, started_at, its events).
    Not by a local time: the two instants of a repeated hour (``fold`` 0 and 1) are equal keys."""
    if moment.tzinfo is not timezone.utc:  # the engine's own times are UTC already
        moment = to_utc(moment)
    return _format_utc(moment)


@functools.lru_cache(maxsize=512)
def _format_utc(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


class Record(msgspec.Struct, kw_only=True):
    """Base of every stored record: validated on the way in, extra keys ignored."""

    MODEL: ClassVar[str]
    TIMES: ClassVar[tuple[str, ...]] = ()  # the timestamp fields, kept in UTC
    JSON: ClassVar[frozenset[str]] = frozenset()  # the fields that hold JSON values

    uuid: str

    def __post_init__(self) -> None:
        for name in self.TIMES:
            moment = getattr(self, name)
            if moment is not None and moment.tzinfo is not timezone.utc:
                setattr(self, name, to_utc(moment))

    def to_dict(self) -> JSONDict:
        data: JSONDict = msgspec.to_builtins(self, builtin_types=(datetime,))
        for name in self.TIMES:
            moment = data[name]
            if moment is not None:
                data[name] = format_timestamp(moment)
        return data

    @classmethod
    def from_dict(cls: type[RecordT], data: Any) -> RecordT:
        """A record from stored data; raises ``RecordError`` (msgspec's ValidationError) naming
        the field when the data is not one."""
        data = dict(data)
        try:
            return msgspec.convert(data, cls, strict=False)
        except RecordError:
            if all(type(key) is str for key in data):
                raise
            # a str subclass as a key (a driver's quoted column name): msgspec wants plain str
            return msgspec.convert({str(key): value for key, value in data.items()}, cls, strict=False)


RecordT = TypeVar("RecordT", bound=Record)


Snapshot = tuple[Any, ...]
"""What the store holds of a record, as the record's field values in order, its JSON values as
their encoding (None as it is) (``snapshot``): what ``changes`` compares a record with to find
what to write."""


class _Layout(msgspec.Struct, frozen=True):
    """A record class's fields as ``snapshot`` and ``changes`` walk them, worked out once."""

    names: tuple[str, ...]
    encoded: tuple[int, ...]  # the positions of the JSON fields
    times: frozenset[int]  # of the timestamps
    at_revision: int  # of ``revision`` (-1: none)
    positions: dict[str, int]


@functools.cache
def _layout(cls: type[Record]) -> _Layout:
    names: tuple[str, ...] = cls.__struct_fields__
    return _Layout(
        names=names,
        encoded=tuple(index for index, name in enumerate(names) if name in cls.JSON),
        times=frozenset(index for index, name in enumerate(names) if name in cls.TIMES),
        at_revision=names.index("revision") if "revision" in names else -1,
        positions={name: index for index, name in enumerate(names)},
    )


def snapshot(record: Record, revision: int | None = None) -> Snapshot:
    """The record's field values as stored (with ``revision`` when given). JSON values are kept
    as their encoding: a hook that changes one in place must not change the snapshot, and
    ``1 == 1.0 == True`` in Python, but a change between those must be written."""
    return _snapshot(record, _layout(type(record)), revision)


def _snapshot(record: Record, layout: _Layout, revision: int | None) -> Snapshot:
    values = list(msgspec.structs.astuple(record))
    try:
        for index in layout.encoded:
            if values[index] is not None:  # None stays None: as unlike any encoding as b"null"
                values[index] = _encode(values[index])
    except TypeError:  # a value msgspec cannot encode (rare): the slow way, field by field
        values = list(msgspec.structs.astuple(record))
        for index in layout.encoded:
            if values[index] is not None:
                values[index] = _encoded(values[index])
    if revision is not None:
        values[layout.at_revision] = revision
    return tuple(values)


def changes(record: Record, stored: Snapshot, revision: int) -> tuple[JSONDict, Snapshot]:
    """The fields of ``record`` that differ from ``stored`` (``revision`` given as the one to
    write), as stored values, and the snapshot of the record once they are written. Every
    changed record of every transition comes here: its layout is looked up once."""
    layout = _layout(type(record))
    names, times = layout.names, layout.times
    now = _snapshot(record, layout, revision)
    data: JSONDict = {}
    for index in itertools.compress(range(len(now)), map(operator.ne, now, stored)):
        value = now[index]  # a JSON field's is its encoding: its value is read from the record
        if index in times:
            data[names[index]] = None if value is None else format_timestamp(value)
        elif type(value) in _PLAIN:
            data[names[index]] = value
        else:
            value = getattr(record, names[index])
            data[names[index]] = msgspec.to_builtins(value, builtin_types=_KEPT)
    data["revision"] = revision
    return data, now


def changes_again(
    record: Record, name: str, stored: Snapshot | None, data: JSONDict, now: Snapshot | None
) -> tuple[JSONDict, Snapshot | None]:
    """``changes``' result (``data``, ``now``) once the plain field ``name`` of ``record`` was
    set again since it was made: exactly what ``changes`` would give now (``stored`` None: a
    whole record's ``data``), without comparing every field again. Group commit sets the hook
    mark's ``hook_shared`` after a transition's write is built."""
    layout = _layout(type(record))
    position = layout.positions
    at = position[name]
    assert at not in layout.times and at not in layout.encoded, f"{name} is not a plain field"
    value = getattr(record, name)
    after = None if now is None else (*now[:at], value, *now[at + 1 :])
    if stored is None:  # a whole record: every field is written, in place
        return {**data, name: value}, after
    result: JSONDict = {}
    placed = value == stored[at]  # unchanged from the store: not written
    for key, written in data.items():  # field order, as ``changes`` writes them
        if key == name:
            continue
        if not placed and position[key] > at:
            result[name], placed = value, True
        result[key] = written
    if not placed:
        result[name] = value
    return result, after


_PLAIN = frozenset({str, int, float, bool, type(None)})
_KEPT = (datetime,)  # msgspec's builtins keep these as they are
_encode = msgspec.json.Encoder().encode


def _encoded(value: Any) -> bytes:
    try:
        return _encode(value)
    except TypeError:  # a value msgspec cannot encode: compare the standard library's text
        return json.dumps(value, sort_keys=False, default=str).encode()


MAX_ERROR_TEXT = 20_000
"""An error's message and traceback are cut to this many characters (a driver may quote rows)."""


def _storable(text: str) -> str:
    """Error text that any store takes: NUL shown as ``\\x00`` (PostgreSQL refuses it), cut."""
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + " [...]"


class ErrorInfo(msgspec.Struct, kw_only=True):
    """An exception as stored on a step or pipeline: enough to debug without the process."""

    type: str
    message: str
    traceback: str | None = None
    hook: str | None = None  # the hook that failed (on_start, on_continue, ...), when one did

    def __post_init__(self) -> None:
        self.message = _storable(self.message)
        if self.traceback is not None:
            self.traceback = _storable(self.traceback)

    @classmethod
    def from_exception(cls, exc: BaseException, hook: str | None = None) -> ErrorInfo:
        text = "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type=type(exc).__name__, message=str(exc), traceback=text, hook=hook)


class PipelineRecord(Record, kw_only=True):
    MODEL: ClassVar[str] = "PIPELINE"
    JSON: ClassVar[frozenset[str]] = frozenset({"params", "context", "metadata", "last_error", "trace", "attributes"})
    TIMES: ClassVar[tuple[str, ...]] = (
        "created_at",
        "updated_at",
        "next_run_at",
        "lease_expires_at",
        "hook_started_at",
    )

    name: str
    version: int = 1
    status: Status
    params: JSONDict = msgspec.field(default_factory=dict)
    context: JSONDict = msgspec.field(default_factory=dict)  # {"tenant": ...} and the caller's own keys
    metadata: JSONDict = msgspec.field(default_factory=dict)  # the seed's {"current_step": uuid}
    priority: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    next_run_at: datetime | None = None  # due when <= now; None on a pending record: due now
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    last_error: ErrorInfo | None = None
    claims: int = 0  # claims since the last clean release (informational)
    cancel_requested: bool = False  # Orchestrator.cancel() while another worker held it
    revision: int = 0  # bumped on every write; compare-and-set target
    hook_started_at: datetime | None = None  # a hook is running (set before it, cleared with its result)
    hook_shared: bool = False  # that mark was stored by a round of group commit: a crash is not pinned on us
    crashes: int = 0  # workers that died in a row while one of this pipeline's hooks was running
    key: str | None = None  # the creator's key (create(key=...)): the uuid is derived from it
    parent_uuid: str | None = None  # the pipeline whose hook started this one (self.start_child)
    trace: JSONDict | None = None  # the W3C trace context it was created in (prorch[otel])
    concurrency_key: str | None = None  # its class's concurrency key value as JSON text, stored at create
    attributes: dict[str, str] = msgspec.field(default_factory=dict)  # search attributes (prorch.model.attributes)


class StepRecord(Record, kw_only=True):
    MODEL: ClassVar[str] = "STEP"
    TIMES: ClassVar[tuple[str, ...]] = ("started_at", "finished_at", "next_run_at")
    JSON: ClassVar[frozenset[str]] = frozenset({"metadata", "output", "error", "progress", "logs"})

    pipeline_uuid: str
    name: str
    version: int = 1
    position: int | None = None  # None in a prorch 1.0.1 store: the pipeline's order is used
    status: Status
    metadata: JSONDict = msgspec.field(default_factory=dict)
    output: Any = None
    attempt: int = 0  # how many times on_start/on_continue raised or ran to a verdict
    error: ErrorInfo | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    next_run_at: datetime | None = None
    rollback: RollbackState | None = None  # None until on_rollback has run its course (or was skipped)
    rollback_attempt: int = 0
    revision: int = 0
    progress: JSONDict | None = None  # the last self.progress(): {"done", "total", "note", "at"}
    logs: list[JSONDict] | None = None  # what its hooks logged, attempt by attempt (prorch.model.step_logs)


class EventRecord(Record, kw_only=True):
    MODEL: ClassVar[str] = "EVENT"
    TIMES: ClassVar[tuple[str, ...]] = ("at",)

    pipeline_uuid: str
    step_uuid: str | None = None
    type: EventType
    at: datetime
    seq: int = 0  # orders the events of one pipeline: pipeline revision * 1000 + index
    data: JSONDict = msgspec.field(default_factory=dict)


class MessageRecord(Record, kw_only=True):
    MODEL: ClassVar[str] = "MESSAGE"
    TIMES: ClassVar[tuple[str, ...]] = ("sent_at", "consumed_at")

    pipeline_uuid: str
    name: str
    payload: Any = None
    sent_at: datetime
    consumed_at: datetime | None = None


class StreamRecord(Record, kw_only=True):
    """One entry of a pipeline's stream (``self.emit``, ``prorch.model.streams``); ``seq`` is
    its cursor, 1, 2, 3... per pipeline. ``uuid`` is ``PIPELINE_UUID:SEQ``."""

    MODEL: ClassVar[str] = "STREAM"
    TIMES: ClassVar[tuple[str, ...]] = ("at",)

    pipeline_uuid: str
    seq: int
    at: datetime
    value: Any = None


class Metadata:
    """Model names and their table names, as in prorch 1.0.1 (``Metadata.TABLE_NAMES[model]``)."""

    PIPELINES_MODEL = PipelineRecord.MODEL
    STEP_MODEL = StepRecord.MODEL
    EVENT_MODEL = EventRecord.MODEL
    MESSAGE_MODEL = MessageRecord.MODEL
    STREAM_MODEL = StreamRecord.MODEL

    TABLE_NAMES: ClassVar[dict[str, str]] = {
        PIPELINES_MODEL: "pipelines",
        STEP_MODEL: "pipeline_steps",
        EVENT_MODEL: "pipeline_events",
        MESSAGE_MODEL: "pipeline_messages",
        STREAM_MODEL: "pipeline_stream",
    }
