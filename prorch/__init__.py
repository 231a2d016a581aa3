"""prorch: resumable step pipelines for Python applications.

Declare ``Pipeline`` and ``Step`` subclasses, store runs through any ``IRepository`` backend, and
let an ``Orchestrator`` (cron or worker) resume every pipeline that has work due.
"""

from prorch import features as _features  # noqa: F401 - registers the built-in features (schedules, reactions, ...)
from prorch import legacy as _legacy
from prorch.engine import Outcome
from prorch.engine.extension import Extension
from prorch.features.reactions import ReactionContext, on_event
from prorch.features.tenant_plugins import register_plugin
from prorch.model.clock import Clock, FakeClock, SystemClock
from prorch.model.exceptions import (
    ConcurrentUpdateError,
    ConfigurationError,
    CorruptRecordError,
    CorruptStoreError,
    DuplicateNameError,
    InvalidKeyError,
    InvalidMessageError,
    InvalidOutputError,
    InvalidParamsError,
    InvalidStateError,
    KeyConflictError,
    KeyRunningError,
    NotRegisteredError,
    PipelineFailedError,
    PipelineNameNotDefinedError,
    PipelineNotFoundError,
    ProrchError,
    RegistrationError,
    RepositoryError,
    SchemaTooNewError,
    StepFailed,
    StepNameNotDefinedError,
    StepsNotDefinedError,
    StepUsageError,
    StoreUnreachableError,
    WaitTimeoutError,
    WorkerCrashed,
)
from prorch.model.mixins import OnContinueMixin, OnStartMixin
from prorch.model.records import (
    ErrorInfo,
    EventRecord,
    MessageRecord,
    Metadata,
    PipelineRecord,
    StepRecord,
    StreamRecord,
)
from prorch.model.registry import Registry, register_pipeline, register_step
from prorch.model.status import EventType, RollbackState, Status
from prorch.model.step import Step
from prorch.orchestrator import Orchestrator, OrchestratorConfig
from prorch.pipeline import Pipeline
from prorch.storage.listing import PipelinePage
from prorch.storage.repository import (
    IRepository,
    PipelineQuery,
    RepositoryLike,
    SavedItem,
    SupportsClaim,
    SupportsCompareAndSet,
    SupportsDueQuery,
    SupportsMessageQuery,
    SupportsPartialUpdate,
    SupportsPipelineQuery,
    SupportsSearchMany,
    SupportsTransaction,
)
from prorch.summaries import PassSummary, PipelineState

_legacy.install()

__version__ = "2.0.0.dev0"

__all__ = [
    "Clock",
    "ConcurrentUpdateError",
    "ConfigurationError",
    "CorruptRecordError",
    "CorruptStoreError",
    "DuplicateNameError",
    "ErrorInfo",
    "EventRecord",
    "EventType",
    "Extension",
    "FakeClock",
    "IRepository",
    "InvalidKeyError",
    "InvalidMessageError",
    "InvalidOutputError",
    "InvalidParamsError",
    "InvalidStateError",
    "KeyConflictError",
    "KeyRunningError",
    "MessageRecord",
    "Metadata",
    "NotRegisteredError",
    "OnContinueMixin",
    "OnStartMixin",
    "Orchestrator",
    "OrchestratorConfig",
    "Outcome",
    "PassSummary",
    "Pipeline",
    "PipelineFailedError",
    "PipelineNameNotDefinedError",
    "PipelineNotFoundError",
    "PipelinePage",
    "PipelineQuery",
    "PipelineRecord",
    "PipelineState",
    "ProrchError",
    "ReactionContext",
    "RegistrationError",
    "Registry",
    "RepositoryError",
    "RepositoryLike",
    "RollbackState",
    "SavedItem",
    "SchemaTooNewError",
    "Status",
    "Step",
    "StepFailed",
    "StepNameNotDefinedError",
    "StepRecord",
    "StepUsageError",
    "StepsNotDefinedError",
    "StoreUnreachableError",
    "StreamRecord",
    "SupportsClaim",
    "SupportsCompareAndSet",
    "SupportsDueQuery",
    "SupportsMessageQuery",
    "SupportsPartialUpdate",
    "SupportsPipelineQuery",
    "SupportsSearchMany",
    "SupportsTransaction",
    "SystemClock",
    "WaitTimeoutError",
    "WorkerCrashed",
    "on_event",
    "register_pipeline",
    "register_plugin",
    "register_step",
]
