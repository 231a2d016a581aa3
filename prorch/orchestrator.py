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

from prorch import worker
from prorch.actions import Actions
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
    RegistrationError,
)
from prorch.model.limit_rules import checked_weights
from prorch.model.registry import Registry, current_registry
from prorch.model.status import Status
from prorch.pipeline import new_owner_id
from prorch.storage import purge
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


class Orchestrator(Actions):
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
        prefetch: int | None = DEFAULT_PREFETCH,
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
        tenant_weights: Mapping[Any, float] | None = None,
        step_log_lines: int = defaults.STEP_LOG_LINES.default,
        capture_logging: bool = False,
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
            step_log_lines=step_log_lines,
        )
        if type(capture_logging) not in (bool, int) or capture_logging not in (0, 1):
            raise ConfigurationError(
                f"Orchestrator(capture_logging={capture_logging!r}): capture_logging must be a bool"
            )
        if not (retention is None or _non_negative(retention)):
            raise ConfigurationError(
                f"Orchestrator(retention={retention!r}): retention must be None or a timedelta >= 0"
            )
        self.tenant_weights = _checked_weights(tenant_weights)
        """The weights of the groups of every fair class that declares none (fair claims)."""
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
        self.prefetch = defaults.prefetch_for(self.concurrency) if prefetch is None else prefetch
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
            step_log_lines=step_log_lines,
            capture_logging=capture_logging,
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
        ``older_than`` ago, with their steps, events, messages and stream entries, ``batch_size`` per short
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


def _non_negative(value: Any) -> bool:
    return isinstance(value, timedelta) and value >= timedelta(0)


def _checked_weights(weights: Mapping[Any, float] | None) -> tuple[tuple[str, float], ...]:
    """``tenant_weights`` as the claim takes them; a ConfigurationError names what is wrong."""
    if weights is None:
        return ()
    try:
        return checked_weights(weights, "Orchestrator(tenant_weights=...)")
    except RegistrationError as exc:
        raise ConfigurationError(str(exc)) from None


def _check_settings(**settings: Any) -> None:
    """One ``ConfigurationError`` naming the first bad ``Orchestrator`` argument and what it takes,
    by the rule the settings' fields use too (``prorch.model.defaults``)."""
    for name, value in settings.items():
        rule = defaults.RULES[name]
        if not rule.admits(value):
            raise ConfigurationError(f"Orchestrator({name}={value!r}): {name} must be {rule.wanted()}")
