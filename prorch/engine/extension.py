"""``Extension``: the one way a feature attaches to the engine (schedules, retention, limits,
reactions, children, tracing and metrics are extensions, and so is a user's audit log).

An extension overrides the hooks it needs; the others are no-ops, and the engine calls a hook
only on the extensions that override it (``Extensions`` keeps one list per hook), so a hook
nobody implements costs a list test. The engine sits above this module and calls it; the
features sit above the engine and implement it.

An extension's exception never stops a pass or the lease keeper: it is logged with the
extension's name and the pass goes on. Two hooks keep today's deliberate errors:
``on_pass_start``'s failure is an error of the pass (under ``extension:NAME``; a store that
cannot be reached, ``RepositoryError``, ends the pass), and ``on_transition``'s failure is the
pipeline's error (its transition is not stored without the records the extension adds, and is
done again in a later pass)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol

from prorch.model.clock import Clock
from prorch.model.exceptions import RepositoryError
from prorch.model.limit_rules import ClaimLimit
from prorch.model.records import EventRecord, PipelineRecord, Record, StepRecord
from prorch.model.registry import Registry
from prorch.model.status import Status
from prorch.storage.store import Store

__all__ = ["Extension", "Extensions", "Host", "PassReport", "builtin_extensions", "register_builtin"]

logger = logging.getLogger("prorch.engine.extension")


class PassReport(Protocol):
    """What a pass did so far (``prorch.PassSummary``): what ``on_pass_start`` adds to, and
    what ``on_pass_end`` reads."""

    scheduled: int
    claimed: int
    errors: dict[str, str]


class Host(Protocol):
    """What an extension is given by ``setup``: the orchestrator's store, clock, registry and
    settings, its stop signal, and a cancel of one pipeline in this process."""

    store: Store
    clock: Clock
    registry: Registry
    retention: timedelta | None
    shutdown_grace: float
    stopped: threading.Event
    tenant_weights: tuple[tuple[str, float], ...]  # fair classes' weights unless they declare their own

    def cancel_here(self, uuid: str) -> PipelineRecord | None: ...


class Extension:
    """Base class of a feature: override the hooks you need (each is documented as a no-op
    here) and pass an instance to ``Orchestrator(extensions=[...])``."""

    name: str = ""
    """Names it in logs and errors (default: the class's name)."""

    def setup(self, host: Host) -> None:
        """Called once, when the orchestrator takes the extension: keep what you need of ``host``."""

    def start(self) -> None:
        """The worker (``run_forever``) starts: start a background task here."""

    def stop(self) -> None:
        """The worker stops: end the background task (wait at most ``host.shutdown_grace``)."""

    def claim_limits(self) -> Mapping[str, ClaimLimit]:
        """Limits on what a pass claims, by pipeline name (merged over the extensions)."""
        return {}

    def around_pass(self) -> contextlib.AbstractContextManager[Any]:
        """A context manager around one whole pass (a tracing span)."""
        return contextlib.nullcontext()

    def on_pass_start(self, summary: PassReport) -> None:
        """Before the pass claims (create scheduled pipelines, and add to ``summary``)."""

    def around_hook(
        self, pipeline: PipelineRecord, step: StepRecord, hook: str
    ) -> contextlib.AbstractContextManager[Any]:
        """A context manager around one hook call of ``step`` (a tracing span); it cannot
        swallow the hook's exception."""
        return contextlib.nullcontext()

    def on_hook_end(self, pipeline_name: str, step_name: str, hook: str, seconds: float) -> None:
        """After one hook call, however it ended: how long it took."""

    def on_transition(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> Sequence[Record]:
        """A transition with these events is about to be stored: records to store in the same
        commit (reaction tasks), or none. Called before the commit, so a refused write calls
        it again; what happens outside the store belongs in ``on_pass_end`` or after ``now``."""
        return ()

    def on_ended(self, pipeline: PipelineRecord, status: Status) -> None:
        """A pipeline ended (finished, failed, cancelled) in this process: tell its parent."""

    def on_pass_end(self, summary: PassReport, lags: Sequence[float], seconds: float) -> None:
        """After a pass: what it did, each claimed pipeline's seconds from due to claim, and
        the pass's own seconds."""

    def on_lease_lost(self, pipeline_name: str) -> None:
        """A lease this worker held was lost (its renewal was refused)."""

    def next_due(self, now: datetime) -> datetime | None:
        """When this feature next has work for a pass (a schedule's next tick), or None: an
        idle worker wakes then at the latest."""
        return None


HOOKS = (
    "start", "stop", "claim_limits", "around_pass", "on_pass_start", "around_hook", "on_hook_end",
    "on_transition", "on_ended", "on_pass_end", "on_lease_lost", "next_due",
)  # fmt: skip


def implements(extension: object, hook: str) -> bool:
    """Whether ``extension`` overrides ``hook`` (an object that is no ``Extension`` subclass
    implements the hooks it has)."""
    own = getattr(type(extension), hook, None)
    return own is not None and own is not getattr(Extension, hook)


class Extensions:
    """The extensions of one orchestrator, with one list per hook of those that implement it:
    the engine tests a list before calling anything, so an unused hook costs nothing."""

    def __init__(self, extensions: Iterable[Extension] = ()) -> None:
        self.all: list[Extension] = []
        self.by_hook: dict[str, list[Extension]] = {hook: [] for hook in HOOKS}
        for extension in extensions:
            self.add(extension)

    def add(self, extension: Extension) -> None:
        """Add an extension (once: one already here is not added again)."""
        if extension in self:
            return
        self.all.append(extension)
        for hook, found in self.by_hook.items():
            if implements(extension, hook):
                found.append(extension)

    def __contains__(self, extension: object) -> bool:
        return any(extension is known for known in self.all)

    def find(self, kind: type[Extension]) -> Extension | None:
        """The first extension of that class, if any."""
        return next((e for e in self.all if isinstance(e, kind)), None)

    @property
    def around_hook(self) -> list[Extension]:
        return self.by_hook["around_hook"]

    @property
    def on_hook_end(self) -> list[Extension]:
        return self.by_hook["on_hook_end"]

    @property
    def on_transition(self) -> list[Extension]:
        return self.by_hook["on_transition"]

    # --- calling them: each extension's error is its own ---------------------------------

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on each extension that implements it; an error is logged, with the
        extension's name, and the others are called."""
        for extension in self.by_hook[hook]:
            try:
                getattr(extension, hook)(*args)
            except Exception:
                logger.exception("extension %s: %s failed", _name(extension), hook)

    def claim_limits(self) -> dict[str, ClaimLimit]:
        limits: dict[str, ClaimLimit] = {}
        for extension in self.by_hook["claim_limits"]:
            try:
                limits.update(extension.claim_limits())
            except Exception:
                logger.exception("extension %s: claim_limits failed; its limits are left out", _name(extension))
        return limits

    def next_due(self, now: datetime) -> datetime | None:
        """The earliest ``next_due`` of the extensions; one that fails is logged and left out."""
        found: list[datetime] = []
        for extension in self.by_hook["next_due"]:
            try:
                moment = extension.next_due(now)
            except Exception:
                logger.exception("extension %s: next_due failed; left out", _name(extension))
                continue
            if moment is not None:
                found.append(moment)
        return min(found, default=None)

    def pass_started(self, summary: PassReport) -> None:
        """``on_pass_start``: an extension's failure is an error of the pass (``extension:NAME``,
        or what the extension put in ``summary.errors``); ``RepositoryError`` ends the pass."""
        for extension in self.by_hook["on_pass_start"]:
            try:
                extension.on_pass_start(summary)
            except RepositoryError:
                raise
            except Exception as exc:
                logger.exception("extension %s: on_pass_start failed", _name(extension))
                summary.errors[f"extension:{_name(extension)}"] = f"{type(exc).__name__}: {exc}"

    def around_pass(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for extension in self.by_hook["around_pass"]:
            _enter(stack, extension, "around_pass", extension.around_pass)
        return stack

    def hook_context(self, pipeline: PipelineRecord, step: StepRecord, hook: str) -> contextlib.ExitStack:
        """Every ``around_hook`` of one hook call, entered in order."""
        stack = contextlib.ExitStack()
        for extension in self.by_hook["around_hook"]:
            _enter(stack, extension, "around_hook", extension.around_hook, pipeline, step, hook)
        return stack

    def records_for(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> list[Record]:
        """What the extensions add to a commit storing ``events``. An error is the pipeline's
        (raised, after logging which extension): its transition is not stored without them."""
        added: list[Record] = []
        for extension in self.by_hook["on_transition"]:
            try:
                added += extension.on_transition(pipeline_name, events, now)
            except Exception:
                logger.error("extension %s: on_transition failed; the transition is not stored", _name(extension))
                raise
        return added

    def lease_lost(self, pipeline_name: str) -> None:
        self.call("on_lease_lost", pipeline_name)


def _name(extension: object) -> str:
    name = getattr(extension, "name", None)
    return name if isinstance(name, str) and name else type(extension).__name__


def _enter(
    stack: contextlib.ExitStack,
    extension: Extension,
    hook: str,
    make: Callable[..., contextlib.AbstractContextManager[Any]],
    *args: Any,
) -> None:
    try:
        manager = make(*args)
        manager.__enter__()
    except Exception:
        logger.exception("extension %s: %s failed on entry; skipped", _name(extension), hook)
        return

    def leave(kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        """The manager's exit: its own error is logged; the block's exception is never swallowed."""
        try:
            manager.__exit__(kind, error, trace)
        except Exception as exc:
            if exc is not error:
                logger.exception("extension %s: %s failed on exit", _name(extension), hook)

    stack.push(leave)


_builtins: list[Callable[[Host], Extension | None]] = []


def register_builtin(factory: Callable[[Host], Extension | None]) -> None:
    """Make a feature one every orchestrator has: ``factory(host)`` is called once per
    orchestrator (None leaves the feature out, e.g. tracing without an SDK, retention without
    the setting). ``prorch.features`` registers the built-in ones."""
    if factory not in _builtins:
        _builtins.append(factory)


def builtin_extensions(host: Host) -> list[Extension]:
    """The built-in features that apply to ``host``, in registration order."""
    return [extension for factory in _builtins if (extension := factory(host)) is not None]
