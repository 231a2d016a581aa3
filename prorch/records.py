"""What is stored: the pydantic models of the four record kinds.

Records travel to and from repositories as plain JSON-compatible dicts (``to_dict`` /
``from_dict``), so any store can hold them. Timestamps are UTC ISO-8601 strings with a fixed
width, which sort correctly as text. Fields a prorch 1.0.1 store lacks have defaults, so such a
store loads as it is.
"""

from __future__ import annotations

import traceback as traceback_module
import uuid as uuid_module
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer

from prorch.status import EventType, RollbackState, Status

JSONDict = dict[str, Any]


def new_uuid() -> str:
    return str(uuid_module.uuid4())


def to_utc(moment: datetime) -> datetime:
    """Stored times are UTC; a naive time read back from a driver is taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def format_timestamp(moment: datetime) -> str:
    """Fixed-width UTC ISO-8601, so that text order is time order."""
    return to_utc(moment).isoformat(timespec="microseconds")


Timestamp = Annotated[
    datetime,
    AfterValidator(to_utc),
    PlainSerializer(format_timestamp, return_type=str, when_used="json"),
]


class Record(BaseModel):
    """Base of every stored record: validated on the way in and out, extra keys ignored."""

    model_config = ConfigDict(extra="ignore", validate_assignment=False)

    MODEL: ClassVar[str]

    uuid: str

    def to_dict(self) -> JSONDict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls: type[RecordT], data: Any) -> RecordT:
        return cls.model_validate(dict(data))


RecordT = TypeVar("RecordT", bound=Record)


MAX_ERROR_TEXT = 20_000
"""An error's message and traceback are cut to this many characters (a driver may quote rows)."""


def _storable(text: str) -> str:
    """Error text that any store takes: NUL shown as ``\\x00`` (PostgreSQL refuses it), cut."""
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + " [...]"


ErrorText = Annotated[str, AfterValidator(_storable)]


class ErrorInfo(BaseModel):
    """An exception as stored on a step or pipeline: enough to debug without the process."""

    type: str
    message: ErrorText
    traceback: ErrorText | None = None
    hook: str | None = None  # the hook that failed (on_start, on_continue, ...), when one did

    @classmethod
    def from_exception(cls, exc: BaseException, hook: str | None = None) -> ErrorInfo:
        text = "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type=type(exc).__name__, message=str(exc), traceback=text, hook=hook)


class PipelineRecord(Record):
    MODEL: ClassVar[str] = "PIPELINE"

    name: str
    version: int = 1
    status: Status
    params: JSONDict = Field(default_factory=dict)
    context: JSONDict = Field(default_factory=dict)  # {"tenant": ...} and the caller's own keys
    metadata: JSONDict = Field(default_factory=dict)  # the seed's {"current_step": uuid}
    priority: int = 0
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    next_run_at: Timestamp | None = None  # due when <= now; None on a pending record: due now
    lease_owner: str | None = None
    lease_expires_at: Timestamp | None = None
    last_error: ErrorInfo | None = None
    claims: int = 0  # claims since the last clean release (informational)
    cancel_requested: bool = False  # Orchestrator.cancel() while another worker held it
    revision: int = 0  # bumped on every write; compare-and-set target
    hook_started_at: Timestamp | None = None  # a hook is running (set before it, cleared with its result)
    hook_shared: bool = False  # that mark was stored by a round of group commit: a crash is not pinned on us
    crashes: int = 0  # workers that died in a row while one of this pipeline's hooks was running
    key: str | None = None  # the creator's key (create(key=...)): the uuid is derived from it


class StepRecord(Record):
    MODEL: ClassVar[str] = "STEP"

    pipeline_uuid: str
    name: str
    version: int = 1
    position: int | None = None  # None in a prorch 1.0.1 store: the pipeline's order is used
    status: Status
    metadata: JSONDict = Field(default_factory=dict)
    output: Any = None
    attempt: int = 0  # how many times on_start/on_continue raised or ran to a verdict
    error: ErrorInfo | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    next_run_at: Timestamp | None = None
    rollback: RollbackState | None = None  # None until on_rollback has run its course (or was skipped)
    rollback_attempt: int = 0
    revision: int = 0


class EventRecord(Record):
    MODEL: ClassVar[str] = "EVENT"

    pipeline_uuid: str
    step_uuid: str | None = None
    type: EventType
    at: Timestamp
    seq: int = 0  # orders the events of one pipeline: pipeline revision * 1000 + index
    data: JSONDict = Field(default_factory=dict)


class MessageRecord(Record):
    MODEL: ClassVar[str] = "MESSAGE"

    pipeline_uuid: str
    name: str
    payload: Any = None
    sent_at: Timestamp
    consumed_at: Timestamp | None = None


class Metadata:
    """Model names and their table names, as in prorch 1.0.1 (``Metadata.TABLE_NAMES[model]``)."""

    PIPELINES_MODEL = PipelineRecord.MODEL
    STEP_MODEL = StepRecord.MODEL
    EVENT_MODEL = EventRecord.MODEL
    MESSAGE_MODEL = MessageRecord.MODEL

    TABLE_NAMES: ClassVar[dict[str, str]] = {
        PIPELINES_MODEL: "pipelines",
        STEP_MODEL: "pipeline_steps",
        EVENT_MODEL: "pipeline_events",
        MESSAGE_MODEL: "pipeline_messages",
    }
