"""Every error prorch raises derives from ``ProrchError``; a subclass's docstring is its default
message. The prorch 1.0.1 names are kept as aliases at the bottom."""

from __future__ import annotations

from typing import Any


class ProrchError(Exception):
    """A prorch error."""

    def __init__(self, message: str | None = None, **context: Any) -> None:
        self.context = context
        super().__init__(message or (self.__doc__ or "").strip())


class RegistrationError(ProrchError):
    """A Pipeline or Step class cannot be registered."""


class PipelineNameNotDefinedError(RegistrationError):
    """A Pipeline subclass has no `name`: set `name = "MyPipeline"` on the class."""


class StepNameNotDefinedError(RegistrationError):
    """A Step subclass has no `name`: set `name = "MyStep"` on the class."""


class StepsNotDefinedError(RegistrationError):
    """A Pipeline subclass has no `steps`: set `steps = [FirstStep, SecondStep]` on the class."""


class DuplicateNameError(RegistrationError):
    """Another class is already registered under this name and version."""


class NotRegisteredError(ProrchError, LookupError):
    """No class is registered under this name (import the module that defines it, e.g. --app)."""


class InvalidParamsError(ProrchError, ValueError):
    """The pipeline's params are invalid; nothing was stored."""


class InvalidKeyError(InvalidParamsError):
    """A creation key is not a string of 1 to 200 characters without NUL; nothing was stored."""


class KeyConflictError(ProrchError, ValueError):
    """A creation key already names a pipeline of another name or with other params; nothing
    was stored."""


class KeyRunningError(KeyConflictError):
    """``create(key=..., if_running="error")``: a pipeline with that key has not ended yet;
    nothing was stored."""


class InvalidOutputError(ProrchError, ValueError):
    """A step's output is not valid JSON-compatible data or does not match its Output model."""


class InvalidMessageError(ProrchError, ValueError):
    """A message's name or payload is invalid; nothing was stored."""


class UnstorableValueError(ProrchError, ValueError):
    """A value is not JSON (NaN, infinity, a NUL character, a non-str key, or a non-JSON object)."""


class UnstorableResultError(ProrchError):
    """A hook's results (metadata, output, consumed messages) could not be stored: a failed attempt."""


class StepUsageError(ProrchError):
    """A step's control call (finish, fail, cancel, wait) was used the wrong way."""


class PipelineNotFoundError(ProrchError, LookupError):
    """No pipeline with this uuid is stored."""


class StepTimeoutError(ProrchError):
    """The step did not reach a verdict within its timeout."""


class HookTimeoutError(StepTimeoutError):
    """A hook call did not return within its bound; its thread was abandoned."""


class StepFailed(ProrchError):
    """A hook called ``fail(reason)``: the step failed at once, without a retry. Stored as the
    step's error type; ``str()`` is the reason."""


class WorkerCrashed(ProrchError):
    """Workers died again and again while one of a pipeline's hooks ran: it was quarantined
    (failed without rollback). Fix the cause, then ``prorch retry`` it."""


class WorkerUnhealthyError(ProrchError):
    """The worker holds more abandoned (hung) hook threads than allowed; restart it."""


class InvalidStateError(ProrchError):
    """The operation does not apply to a pipeline in its current status."""


class RepositoryError(ProrchError):
    """The repository failed; the driver's error is chained as the cause."""


class StoreUnreachableError(RepositoryError):
    """The store could not be reached (its server is down, the connection was lost): what was
    being written was not stored, and trying again later may succeed."""


class DuplicateRecordError(RepositoryError):
    """An insert met a record with the same uuid (another process created it at the same time)."""


class CorruptRecordError(RepositoryError):
    """A stored record does not match prorch's record schema."""


class CorruptStoreError(RepositoryError):
    """The store's file is not a valid store; it was left untouched."""


class ConcurrentUpdateError(RepositoryError):
    """The record changed since it was read (another orchestrator holds it); the write was refused."""


class UnconfirmedWriteError(ConcurrentUpdateError):
    """A write was refused, yet the pipeline, read again, is still ours and unchanged: most
    likely our own write, stored with its answer lost. The advance ends; its lease is given back."""


class LeaseLostError(ConcurrentUpdateError):
    """This worker no longer holds the pipeline's lease (a renewal was refused: it ran out and
    another worker claimed it), so it starts none of its hooks."""


class ConfigurationError(ProrchError, ValueError):
    """The configuration is invalid."""


class SchemaTooNewError(ConfigurationError):
    """The store was migrated by a newer prorch, in a way this one cannot work with; upgrade prorch."""


# --- prorch 1.0.1 names, kept so that code written for it still catches the same errors ---
StepsNotDefinedException = StepsNotDefinedError
PipelineNameNotDefinedException = PipelineNameNotDefinedError
StepNameNotDefinedException = StepNameNotDefinedError


class RepositoryNotDefinedException(ConfigurationError):
    """No repository was given: pass `repository=` (a URL, a backend or a repository class)."""


class PipelineNotDefinedException(ProrchError):
    """A step record needs the uuid of its pipeline."""


class PipelineFailedError(ProrchError):
    """A pipeline whose result was asked for ended failed or cancelled (``child_result``,
    ``Orchestrator.wait``): ``status`` says which, ``error`` why."""

    def __init__(self, message: str, *, uuid: str, status: str, error: str | None = None) -> None:
        super().__init__(message)
        self.uuid = uuid
        self.status = status
        self.error = error


class WaitTimeoutError(ProrchError, TimeoutError):
    """``Orchestrator.wait`` gave up before the pipeline ended."""
