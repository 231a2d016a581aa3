"""``Orchestrator``: one repository's pipelines, resumed by a pass (``prorch.engine.passes``) or a
worker (``prorch.worker``), and the operations on one pipeline (read, cancel, retry)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prorch import bulk as bulk_actions
from prorch import worker
from prorch.engine import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_CRASHES,
    DEFAULT_MAX_TURNS_PER_PASS,
    Runner,
    passes,
)
from prorch.engine.bounded_calls import HookCaller
from prorch.engine.extension import Extension, Extensions, builtin_extensions
from prorch.engine.outage import Outage
from prorch.engine.policy import StepOverride
from prorch.model import defaults
from prorch.model.clock import Clock
from prorch.model.exceptions import (
    ConfigurationError,
    InvalidStateError,
    NotRegisteredError,
)
from prorch.model.records import MessageRecord, PipelineRecord
from prorch.model.registry import Registry, current_registry
from prorch.model.status import TERMINAL, Status
from prorch.pipeline import new_owner_id
from prorch.reads import Reads
from prorch.storage import forking, outside, purge
from prorch.storage.heartbeat import Heartbeat
from prorch.storage.purge import PurgeSummary
from prorch.storage.repository import RepositoryLike
from prorch.storage.store import Store
from prorch.summaries import PassSummary, PipelineState

__all__ = ["Orchestrator", "OrchestratorConfig", "PassSummary", "PipelineState"]


DEFAULT_CONCURRENCY = defaults.CONCURRENCY.default
DEFAULT_BATCH_SIZE = defaults.BATCH_SIZE.default
DEFAULT_GROUP_COMMIT = defaults.GROUP_COMMIT.default
DEFAULT_INTERVAL_SECONDS = defaults.INTERVAL.default
DEFAULT_WAKE_POLL = defaults.WAKE_POLL.default
DEFAULT_SHUTDOWN_GRACE_SECONDS = defaults.SHUTDOWN_GRACE.default
DEFAULT_GROUP_WINDOW_SECONDS = defaults.GROUP_WINDOW.default
DEFAULT_PREFETCH = defaults.PREFETCH.default


@dataclass
class OrchestratorConfig:
    """The prorch 1.0.1 way to configure an Orchestrator: ``OrchestratorConfig(repository_class=R)``."""

    repository_class: RepositoryLike


class Orchestrator(Reads):
    """Resumes every due pipeline of one repository: ``execute_pipelines()`` for one pass (cron),
    ``run_forever()`` for a worker."""

    def __init__(
        self,
        repository: RepositoryLike | None = None,
        *,
        config: OrchestratorConfig | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        batch_size: int = DEFAULT_BATCH_SIZE,
        group_commit: int = DEFAULT_GROUP_COMMIT,
        group_window: float = DEFAULT_GROUP_WINDOW_SECONDS,
        prefetch: int = DEFAULT_PREFETCH,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_turns_per_pass: int = DEFAULT_MAX_TURNS_PER_PASS,
        max_crashes: int = DEFAULT_MAX_CRASHES,
        step_overrides: Mapping[str, StepOverride] | None = None,
        hook_timeout: float | None = None,
        max_abandoned_hooks: int | None = None,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_SECONDS,
        retention: timedelta | None = None,
        clock: Clock | None = None,
        registry: Registry | None = None,
        extensions: Iterable[Extension] = (),
    ) -> None:
        if repository is None and config is not None:
            repository = config.repository_class
        _check_settings(
            concurrency=concurrency,
            batch_size=batch_size,
            group_commit=group_commit,
            group_window=group_window,
            prefetch=prefetch,
            lease_seconds=lease_seconds,
            max_crashes=max_crashes,
            hook_timeout=hook_timeout,
            max_abandoned_hooks=max_abandoned_hooks,
            shutdown_grace=shutdown_grace,
        )
        if not (retention is None or _non_negative(retention)):
            raise ConfigurationError(
                f"Orchestrator(retention={retention!r}): retention must be None or a timedelta >= 0"
            )
        self.store = Store(repository)
        self.stopped = threading.Event()
        self._stop = self.stopped
        self.clock: Clock = self.store.clock(clock)
        self.registry = registry or current_registry()
        self.owner = new_owner_id()
        self._claims = itertools.count(1)
        self.batch_size = batch_size
        self.group_commit = group_commit
        self.group_window = group_window
        self.prefetch = prefetch
        self.lease_seconds = lease_seconds
        self.shutdown_grace = shutdown_grace
        self.retention = retention
        self.last_loop = time.monotonic()  # when run_forever last started a pass
        self.claimed_at: datetime | None = None
        """The time the last claim read as now: what became due since, it missed."""
        self.app_version: str | None = None
        """The version of the user's code (the ``--app`` modules' ``__version__``), on the worker's row."""
        self.heartbeat: Heartbeat | None = None
        """The worker's row and health while ``run_forever`` runs (``prorch.storage.heartbeat``)."""
        self.outage = Outage(DEFAULT_INTERVAL_SECONDS)
        """Whether run_forever finds the store unreachable (health checks say so)."""
        self.extensions = Extensions()
        """The features attached (``prorch.engine.extension``): the built-in ones, then ``extensions``."""
        # Hooks run in threads only on a backend that says it is thread-safe.
        self.concurrency = concurrency if self.store.thread_safe else 1
        self.max_abandoned_hooks = concurrency if max_abandoned_hooks is None else max_abandoned_hooks
        self.hooks = HookCaller()
        self.runner = Runner(
            self.store,
            self.registry,
            self.clock,
            lease_seconds=lease_seconds,
            max_turns=max_turns_per_pass,
            max_crashes=max_crashes,
            step_overrides=step_overrides,
            hook_timeout=hook_timeout,
            hooks=self.hooks,
            should_stop=self._stopping,
            request_stop=self.stop,
            extensions=self.extensions,
        )
        for extension in [*builtin_extensions(self), *self.registry.extensions, *extensions]:
            self.add_extension(extension)

    def add_extension(self, extension: Extension) -> None:
        """Attach a feature (``extension.setup(self)`` first); a worker already running does
        not call its ``start``. One already attached is not attached again."""
        if extension in self.extensions:
            return
        extension.setup(self)
        self.extensions.add(extension)

    # --- the pass -------------------------------------------------------------------------------

    def new_lease_token(self) -> str:
        """A token for one claim: a lease is ours only while the stored token is this one, so a
        hook thread abandoned in an earlier pass can never write over a later claim."""
        return f"{self.owner}#{next(self._claims)}"

    def execute_pipelines(self) -> PassSummary:
        """One pass: claim the due pipelines (up to ``batch_size``), advance each, and return
        what happened. One pipeline's error is logged and recorded, and the pass goes on."""
        if not self.extensions.by_hook["around_pass"]:
            return passes.run_pass(self)
        with self.extensions.around_pass():
            return passes.run_pass(self)

    def run_forever(self, interval: float = DEFAULT_INTERVAL_SECONDS, wake_poll: float = DEFAULT_WAKE_POLL) -> None:
        """Run as a worker until ``stop()`` or SIGTERM/SIGINT: up to ``concurrency`` pipelines in
        progress at once, each slot refilled as soon as its pipeline's advance ends
        (``prorch.worker``); ``interval`` is how often it looks for new due work when there was
        none, and runs the extensions' pass hooks. On stop, running hooks finish and what was
        claimed and not started is released. Raises ``WorkerUnhealthyError`` when more hung hook
        threads were abandoned than ``max_abandoned_hooks``, for a supervisor to restart the
        process. An idle worker wakes when work arrives (``prorch.engine.idle``: NOTIFY on
        PostgreSQL, a look every ``wake_poll`` seconds at other processes' writes on SQLite and
        TinyDB, at once for this process's), at its next timer, or after ``interval``."""
        _check_settings(interval=interval, wake_poll=wake_poll)
        worker.run_forever(self, interval, wake_poll)

    def purge(
        self,
        older_than: timedelta,
        statuses: tuple[Status | str, ...] = purge.DEFAULT_STATUSES,
        batch_size: int = purge.DEFAULT_BATCH,
        dry_run: bool = False,
    ) -> PurgeSummary:
        """Delete ended pipelines (default: finished and cancelled) last changed more than
        ``older_than`` ago, with their steps, events and messages, ``batch_size`` per short
        transaction so that running workers wait at most one batch. ``dry_run`` only counts."""
        return purge.purge(self.store, self.clock, older_than, statuses, batch_size, dry_run)

    def close(self) -> None:
        """Stop the event loop of async hooks (``run_forever`` does it on its way out). The
        orchestrator stays usable: the next async hook starts a new loop."""
        self.hooks.close()

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Stop claiming and starting hooks: running hooks finish, their transitions are written,
        the leases held are released, and ``run_forever`` returns."""
        self._stop.set()

    def _stopping(self) -> bool:
        return self._stop.is_set()

    # --- acting --------------------------------------------------------------------------------

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


def _non_negative(value: Any) -> bool:
    return isinstance(value, timedelta) and value >= timedelta(0)


def _check_settings(**settings: Any) -> None:
    """One ``ConfigurationError`` naming the first bad ``Orchestrator`` argument and what it takes,
    by the rule the settings' fields use too (``prorch.model.defaults``)."""
    for name, value in settings.items():
        rule = defaults.RULES[name]
        if not rule.admits(value):
            raise ConfigurationError(f"Orchestrator({name}={value!r}): {name} must be {rule.wanted()}")
