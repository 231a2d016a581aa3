"""``Step``: what a hook sees (``self.params``, ``self.metadata``, ``self.outputs``...) and the calls
it makes to reach a verdict. The calls only record the verdict; the engine persists it after the
hook returns, so a hook that raises afterwards changes nothing."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ValidationError

from prorch.model import attributes as search_attributes
from prorch.model import defaults, streams
from prorch.model.exceptions import InvalidOutputError, StepUsageError, UnstorableValueError
from prorch.model.jsonvalue import ParamsDict, checked_copy, copy_json
from prorch.model.mixins import HookResult
from prorch.model.patches import is_patched
from prorch.model.records import JSONDict, PipelineRecord, StepRecord
from prorch.model.step_logs import LogBuffer, StepLog

logger = logging.getLogger("prorch.model.step")


class StepRuntime(Protocol):
    """What the engine lends a hook for calls that reach beyond the step (messages, plugins,
    starting pipelines from a reaction)."""

    def receive(self, step: Step, name: str) -> Any: ...

    def plugins(self, step: Step, point: str, kwargs: dict[str, Any]) -> list[Any]: ...

    def create_pipeline(self, pipeline: Any, params: Any, uuid: str, options: dict[str, Any]) -> None: ...

    def start_child(self, step: Step, pipeline: Any, params: Any, key: str | None) -> str: ...

    def child_result(self, step: Step, uuid: str) -> Any: ...

    def emit_now(self, step: Step, value: Any) -> None: ...

    def progress_now(self, step: Step, progress: JSONDict) -> None: ...


@dataclass(frozen=True)
class Verdict:
    """What a hook decided: finish, fail, cancel, or wait until a time."""

    kind: Literal["finish", "fail", "cancel", "wait"]
    output: Any = None
    reason: str | None = None
    until: datetime | None = None


class Step:
    """Base class of a step. Subclass it with ``OnStartMixin`` and/or ``OnContinueMixin``, set
    ``name``, and register it with ``@register_step``.

    Optional class attributes: ``version`` (int, default 1), ``timeout`` (seconds from the
    step's start), ``max_attempts`` (default 1: no retry; also bounds ``on_rollback`` attempts),
    ``retry_delay`` and ``retry_max_delay`` (the exponential backoff's base and cap, in seconds),
    ``never_retry`` (exception types that fail the step at once), ``Output`` (a pydantic model
    for ``finish(output)``).
    """

    name: ClassVar[str | None] = None
    version: ClassVar[int] = 1
    timeout: ClassVar[float | None] = None
    max_attempts: ClassVar[int] = 1
    retry_delay: ClassVar[float] = 1.0
    retry_max_delay: ClassVar[float] = 300.0
    never_retry: ClassVar[tuple[type[BaseException], ...]] = ()
    Output: ClassVar[type[BaseModel] | None] = None
    plugin_points: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Plugin points this step offers and their keyword arguments, e.g. {"format": ("text",)}."""
    _definition: Any = None  # the pipeline's registered class, set by the engine for each hook call

    def __init__(
        self,
        *,
        record: StepRecord,
        pipeline: PipelineRecord,
        params: Any,
        outputs: dict[str, Any],
        now: datetime,
        runtime: StepRuntime | None = None,
    ) -> None:
        self._runtime = runtime
        self._record = record
        self._pipeline = pipeline
        self._now = now
        self._verdict: Verdict | None = None
        self.params = guarded_params(params, pipeline.name)
        self.metadata: JSONDict = dict(record.metadata)
        self.outputs = outputs
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._context: JSONDict | None = None
        self._progress: JSONDict | None = None
        self._attributes: dict[str, str] | None = None  # the pipeline's, once set_attribute() changed them
        self.emitted: list[Any] = []  # this hook call's stream entries (emit), stored with its transition
        self.log_buffer = LogBuffer(defaults.STEP_LOG_LINES.default)  # the engine sets its cap
        self._log: Any = None  # a StepLog, made when first used (or what a step of older code set)

    # --- what a hook reads ---------------------------------------------------------------------

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry this pipeline's and step's uuids."""
        if self._logger is None:
            self._logger = logging.LoggerAdapter(
                logging.getLogger(f"prorch.steps.{self.name}"),
                {"pipeline_uuid": self._record.pipeline_uuid, "step_uuid": self._record.uuid},
            )
        return self._logger

    @property
    def log(self) -> StepLog:
        """``self.logger``, whose lines are also stored with this step attempt (``prorch show
        --logs``, the dashboard), with the transition that records this hook's outcome, also
        when it raises. A hook whose worker dies loses them with its transition."""
        if self._log is None:
            self._log = StepLog(self.logger.logger, dict(self.logger.extra or {}), self.log_buffer)
        return self._log  # type: ignore[no-any-return]

    @log.setter
    def log(self, value: Any) -> None:
        """Steps written before ``self.log`` existed may use the name for their own things."""
        self._log = value

    @property
    def uuid(self) -> str:
        return self._record.uuid

    @property
    def pipeline_uuid(self) -> str:
        return self._record.pipeline_uuid

    @property
    def status(self) -> str:
        return self._record.status.value

    @property
    def attempt(self) -> int:
        """1 on the first run of this step, 2 on the first retry, and so on."""
        return max(self._record.attempt, 1)

    @property
    def idempotency_key(self) -> str:
        """The same on every run of this step, across retries and crashes: pass it to external
        services so that a repeated call is not acted on twice."""
        return f"prorch-{self._record.uuid}"

    @property
    def context(self) -> JSONDict:
        """The pipeline's context (tenant and the caller's keys): this hook's own copy."""
        if self._context is None:
            self._context = copy_json(self._pipeline.context)
        return self._context

    @property
    def tenant(self) -> str | None:
        tenant = self._pipeline.context.get("tenant")
        return str(tenant) if tenant is not None else None

    @property
    def now(self) -> datetime:
        """The time the engine is running this hook at (the orchestrator's clock)."""
        return self._now

    @property
    def verdict(self) -> Verdict | None:
        return self._verdict

    # --- what a hook calls ----------------------------------------------------------------------

    def finish(self, output: Any = None) -> None:
        """The step is done; ``output`` is stored and visible to later steps as ``outputs[name]``."""
        self._decide(Verdict("finish", output=self._validate_output(output)))

    def fail(self, reason: str | BaseException = "the step called fail()") -> None:
        """The step fails at once, without retries."""
        self._decide(Verdict("fail", reason=str(reason)))

    def cancel(self) -> None:
        """Cancel the whole pipeline; this step's ``on_cancel()`` runs."""
        self._decide(Verdict("cancel"))

    def wait(self, seconds: float | None = None, until: datetime | None = None) -> None:
        """Return at once; the pipeline is not resumed before ``now + seconds`` or ``until``, then
        ``on_continue`` runs. A step without ``on_continue`` finishes when ``on_start`` returns, so
        a wait there is refused (it would run ``on_start`` again after every wait, for ever)."""
        if not _has_on_continue(type(self)):
            raise StepUsageError(
                f"step {self.name} called wait() but defines no on_continue(), so nothing would run after the "
                "wait: define on_continue() (the code to run once the wait is over), e.g. with OnContinueMixin"
            )
        if (seconds is None) == (until is None):
            raise StepUsageError("wait() takes exactly one of seconds=... or until=...")
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
                raise StepUsageError(f"wait(seconds=...) needs a number >= 0, got {seconds!r}")
            until = self._now + timedelta(seconds=seconds)
        assert until is not None
        if until.tzinfo is None:
            raise StepUsageError("wait(until=...) needs a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
        self._decide(Verdict("wait", until=until))

    def progress(self, done: float, total: float | None = None, note: str | None = None) -> None:
        """Report how far this step has come (``done`` of ``total``, with an optional note),
        shown by ``Orchestrator.get()``, ``prorch show`` and the dashboard. In ``on_start`` and
        ``on_continue`` run by prorch it is stored at once, while the hook still runs (at most
        every half second; with a user's four-method repository, with the transition only);
        the last report is stored with the step's next transition, which this hook's return
        writes. A failed or refused early write is logged, never raised."""
        for label, value in (("done", done), ("total", total)):
            if value is None and label == "total":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise StepUsageError(f"progress({label}=...) needs a number >= 0, got {value!r}")
        if total is not None and done > total:
            raise StepUsageError(f"progress(done={done!r}, total={total!r}): done is more than total")
        if note is not None and not isinstance(note, str):
            raise StepUsageError(f"progress(note=...) needs a str, got {type(note).__name__}")
        self._progress = {"done": done, "total": total, "note": note, "at": datetime.now(timezone.utc).isoformat()}
        if self._runtime is not None:
            self._runtime.progress_now(self, self._progress)

    @property
    def attributes(self) -> dict[str, str]:
        """The pipeline's search attributes, with this hook's ``set_attribute`` calls (a copy)."""
        return dict(self._pipeline.attributes if self._attributes is None else self._attributes)

    def set_attribute(self, name: str, value: str | None) -> None:
        """Set the pipeline's search attribute ``name`` to ``value`` (a string; None removes
        it). Stored with this hook's transition, all or nothing: if the hook raises, nothing
        is set. A bad name or value raises ``StepUsageError`` here."""
        found = search_attributes.problem(name, "" if value is None else value)
        if found is not None:
            raise StepUsageError(f"set_attribute: {found}")
        changed = self.attributes
        if value is None:
            changed.pop(name, None)
        else:
            changed[name] = value
        if len(changed) > search_attributes.MAX_ATTRIBUTES:
            raise StepUsageError(
                f"set_attribute({name!r}): a pipeline has at most {search_attributes.MAX_ATTRIBUTES} attributes"
            )
        self._attributes = changed

    def emit(self, value: Any, *, now: bool = False) -> None:
        """Append ``value`` (a JSON value, at most ``prorch.model.streams.MAX_ENTRY_BYTES`` of
        JSON) to the pipeline's stream (``Orchestrator.stream``, ``prorch stream``). Stored with
        this hook's transition, all or nothing: if the hook raises, or its worker dies first,
        nothing of this call is stored, and a rerun emits again. ``now=True`` (``on_start`` and
        ``on_continue`` only): stored at once, for live progress, ahead of the hook's other
        entries, and kept whatever the hook does next (a rerun emits it again). A bad value
        raises ``StepUsageError`` here."""
        if len(self.emitted) >= streams.MAX_HOOK_ENTRIES:
            raise StepUsageError(f"emit(): one hook call may emit at most {streams.MAX_HOOK_ENTRIES} entries")
        entry = streams.checked_entry(value)
        if not now:
            self.emitted.append(entry)
        elif self._runtime is None:
            raise StepUsageError(
                "emit(now=True) works only in on_start and on_continue run by prorch; emit without now= "
                "elsewhere (stored with the hook's transition)"
            )
        else:
            self._runtime.emit_now(self, entry)

    @property
    def changed_attributes(self) -> dict[str, str] | None:
        """The pipeline's attributes after this hook's ``set_attribute`` calls; None without any."""
        return self._attributes

    @property
    def reported_progress(self) -> JSONDict | None:
        """What ``progress()`` reported during this hook, if it was called."""
        return self._progress

    def patched(self, patch: str) -> bool:
        """Whether this pipeline was created by code with ``patch`` (an id in its class's
        ``patches``): True for pipelines created after that code was deployed, False for older
        ones, the same answer on every call for one pipeline. True for an id in
        ``deprecated_patches`` (older pipelines are not run then). An id the class declares in
        neither list raises ``StepUsageError``: a typo must not answer False."""
        if self._definition is None:
            raise StepUsageError("patched() works only inside a hook run by prorch")
        return is_patched(self._definition, self._pipeline, patch)

    def start_child(self, pipeline: Any, params: Any = None, key: str | None = None) -> str:
        """Create a child pipeline (a ``Pipeline`` class or a registered name) and return its
        uuid. Idempotent: when this hook runs again, the same call returns the same child (it is
        keyed by this pipeline, this step and ``key``, default the child's name; give distinct
        keys to start several of one kind). Its end wakes this pipeline; read its result with
        ``child_result``."""
        return self._require_runtime("start_child").start_child(self, pipeline, params, key)

    def child_result(self, child: str) -> Any:
        """None until the child ends; then its result (its last step's output, or its
        ``Output`` model). Raises ``PipelineFailedError`` when it failed or was cancelled."""
        return self._require_runtime("child_result").child_result(self, child)

    def receive(self, name: str) -> Any:
        """The payload of the oldest unconsumed message ``name`` sent to this pipeline
        (``Orchestrator.send``), consumed exactly once when this hook's transition is recorded;
        None when there is none. A message sent without a payload carries True. Within one
        hook call, a name's unread messages are read once: one sent meanwhile wakes the
        pipeline again."""
        return self._require_runtime("receive").receive(self, name)

    def plugins(self, point: str, **kwargs: Any) -> list[Any]:
        """Run the plugins registered for this step's ``point`` and this pipeline's tenant, in
        order, and return their results. A plugin's exception is this hook's exception."""
        declared = self.plugin_points.get(point)
        if declared is None:
            raise StepUsageError(f"step {self.name} declares no plugin point {point!r} in plugin_points")
        if set(kwargs) != set(declared):
            raise StepUsageError(
                f"plugin point {point!r} of step {self.name} takes {', '.join(declared) or 'no arguments'}, "
                f"got {', '.join(kwargs) or 'none'}"
            )
        return self._require_runtime("plugins").plugins(self, point, kwargs)

    def _require_runtime(self, call: str) -> StepRuntime:
        if self._runtime is None:
            raise StepUsageError(f"{call}() works only inside a hook run by prorch")
        return self._runtime

    # --- hooks a step may override (no-ops by default) -----------------------------------------

    def on_cancel(self) -> HookResult:
        """Runs once when the pipeline is cancelled while this step is current."""

    def on_rollback(self) -> HookResult:
        """Compensation: runs for this finished step when a later step fails for good."""

    def on_timeout(self) -> HookResult:
        """Runs when this step's ``timeout`` has passed, before it fails with a timeout error."""

    # --- internals -----------------------------------------------------------------------------

    def _decide(self, verdict: Verdict) -> None:
        if self._verdict is not None:
            raise StepUsageError(
                f"step {self.name} already called {self._verdict.kind}(); call only one of "
                "finish(), fail(), cancel() or wait() per hook"
            )
        self._verdict = verdict

    def _validate_output(self, output: Any) -> Any:
        if self.Output is not None:
            try:
                model = output if isinstance(output, self.Output) else self.Output.model_validate(output)
            except ValidationError as exc:
                raise InvalidOutputError(f"output of step {self.name} does not match its Output model: {exc}") from exc
            output = model.model_dump(mode="json")
        elif isinstance(output, BaseModel):
            output = output.model_dump(mode="json")
        try:
            return checked_copy(output, "output")
        except UnstorableValueError as exc:
            raise InvalidOutputError(
                f"output of step {self.name} cannot be stored: {exc}; pass dicts, lists, strings, finite "
                "numbers, booleans and None, or declare an Output pydantic model"
            ) from exc


def _has_on_continue(cls: type) -> bool:
    """Whether a step class has a real ``on_continue`` (not ``OnContinueMixin``'s placeholder;
    ``prorch.model.mixins.defines_hook``, which this layer cannot import)."""
    for klass in cls.__mro__:
        if "on_continue" in vars(klass):
            return klass.__module__ != "prorch.model.mixins"
    return False


_guarded: weakref.WeakKeyDictionary[type[BaseModel], type[BaseModel]] = weakref.WeakKeyDictionary()


def guarded_params(params: Any, pipeline: str) -> Any:
    """``params`` as a hook reads them, with an error that names the right form when it uses the
    wrong one: ``self.params["x"]`` on a declared ``Params`` model, ``self.params.x`` on a dict."""
    if type(params) is dict:
        wrapped = ParamsDict(params)
        wrapped.pipeline = pipeline
        return wrapped
    if isinstance(params, BaseModel) and not hasattr(type(params), "__getitem__"):
        cls = _guarded.get(type(params)) or _guard(type(params))
        return cls.model_construct(params.model_fields_set, **dict(params))
    return params


def _guard(model: type[BaseModel]) -> type[BaseModel]:
    """A subclass of the pipeline's ``Params`` whose ``[]`` says to read attributes instead."""

    def __getitem__(self: BaseModel, key: Any) -> Any:
        raise TypeError(
            f"this pipeline declares a Params model ({model.__name__}), so self.params is that model: "
            f"read self.params.{key}, not self.params[{key!r}]"
        )

    def __eq__(self: BaseModel, other: object) -> bool:  # equal to the model it stands for, both ways
        return model.model_construct(self.model_fields_set, **dict(self)) == other

    namespace = {
        "__getitem__": __getitem__,
        "__eq__": __eq__,
        "__hash__": model.__hash__,
        "__module__": model.__module__,
    }
    guarded = type(model.__name__, (model,), namespace)
    _guarded[model] = guarded
    return guarded
