"""``Orchestrator``: the pass that resumes every due pipeline, the worker loop around it, and the
operations on one pipeline (read, cancel, retry)."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prorch import signals
from prorch.engine import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_CRASHES,
    DEFAULT_MAX_TURNS_PER_PASS,
    Outcome,
    Runner,
    Writing,
    idle,
    write_each,
    write_in_rounds,
)
from prorch.engine.bounded_calls import HookCaller
from prorch.engine.extension import Extension, Extensions, builtin_extensions
from prorch.engine.outage import Outage
from prorch.engine.policy import StepOverride
from prorch.model import defaults
from prorch.model.clock import Clock
from prorch.model.due import Runnable
from prorch.model.exceptions import (
    ConcurrentUpdateError,
    ConfigurationError,
    InvalidStateError,
    LeaseLostError,
    NotRegisteredError,
    PipelineNotFoundError,
    ProrchError,
    RepositoryError,
    WaitTimeoutError,
    WorkerUnhealthyError,
)
from prorch.model.keys import uuid_for_key
from prorch.model.records import EventRecord, MessageRecord, PipelineRecord, StepRecord
from prorch.model.registry import Registry, current_registry
from prorch.model.status import TERMINAL, Status
from prorch.pipeline import new_owner_id
from prorch.storage import outside, purge
from prorch.storage.heartbeat import Heartbeat, beat_seconds
from prorch.storage.leases import LeaseKeeper
from prorch.storage.listing import PipelinePage
from prorch.storage.purge import PurgeSummary
from prorch.storage.repository import PipelineQuery, RepositoryLike
from prorch.storage.results import result_of
from prorch.storage.store import Store
from prorch.summaries import PassSummary, PipelineState

__all__ = ["Orchestrator", "OrchestratorConfig", "PassSummary", "PipelineState"]

logger = logging.getLogger("prorch.orchestrator")

DEFAULT_CONCURRENCY = defaults.CONCURRENCY.default
DEFAULT_BATCH_SIZE = defaults.BATCH_SIZE.default
DEFAULT_GROUP_COMMIT = defaults.GROUP_COMMIT.default
DEFAULT_INTERVAL_SECONDS = defaults.INTERVAL.default
DEFAULT_WAKE_POLL = defaults.WAKE_POLL.default
DEFAULT_SHUTDOWN_GRACE_SECONDS = defaults.SHUTDOWN_GRACE.default


@dataclass
class OrchestratorConfig:
    """The prorch 1.0.1 way to configure an Orchestrator: ``OrchestratorConfig(repository_class=R)``."""

    repository_class: RepositoryLike


class Orchestrator:
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
            return self._pass()
        with self.extensions.around_pass():
            return self._pass()

    def _pass(self) -> PassSummary:
        self.store.warn_if_unguarded()
        started = time.perf_counter()
        summary = PassSummary()
        self.extensions.pass_started(summary)
        since = time.monotonic()  # before the lease's time is read: see LeaseKeeper
        now = self.clock.now()
        self.claimed_at = now
        lease_until = now + timedelta(seconds=self.lease_seconds)
        claimed = self.store.claim_due(
            now, self.new_lease_token(), lease_until, self.batch_size, self.extensions.claim_limits(), self.runnable()
        )
        summary.claimed = len(claimed)
        lags = [(now - p.next_run_at).total_seconds() for p in claimed if p.next_run_at is not None]
        with LeaseKeeper(self.store, self.lease_seconds, self.clock, self.extensions.lease_lost) as keeper:
            keeper.hold(claimed, since)
            steps = self.store.steps_of_many([pipeline.uuid for pipeline in claimed])  # one read, not one each
            writings = [self._advancing(pipeline, keeper, steps.get(pipeline.uuid)) for pipeline in claimed]
            if self.group_commit > 1 and len(claimed) > 1 and self.store.has_transaction:
                # suspects of a crash in an earlier round run alone, so that a crash is pinned on one
                alone = [i for i, p in enumerate(claimed) if p.crashes or p.hook_started_at is not None]
                with self.store.session():
                    results = write_in_rounds(
                        self.store, writings, group=self.group_commit, concurrency=self.concurrency, alone=alone
                    )
            elif self.concurrency > 1 and len(claimed) > 1:
                # No connection is held through a hook: with more pipelines at once than pooled
                # connections, each thread takes one only for its reads and commits.
                with ThreadPoolExecutor(self.concurrency, thread_name_prefix="prorch") as pool:
                    results = list(pool.map(functools.partial(write_each, self.store), writings))
            else:
                with self.store.session():  # one set of connections for the whole pass
                    results = [write_each(self.store, writing) for writing in writings]
        for pipeline, result in zip(claimed, results, strict=True):
            if isinstance(result, Outcome):
                summary.add(result)
                if result.status in TERMINAL:
                    self.extensions.call("on_ended", pipeline, result.status)
            else:
                summary.errors[pipeline.uuid] = result
        summary.abandoned_hooks = self.hooks.abandoned
        self.extensions.call("on_pass_end", summary, lags, time.perf_counter() - started)
        if summary.did_something:
            logger.info(
                "pass: claimed %d, finished %d, failed %d, waiting %d, blocked %d, errors %d",
                summary.claimed,
                summary.finished,
                summary.failed,
                summary.waiting,
                len(summary.blocked),
                len(summary.errors),
            )
        return summary

    def runnable(self) -> Runnable:
        """The (name, version) of every pipeline class registered here: what this worker claims."""
        return frozenset((name, version) for name, versions in self.registry.pipelines.items() for version in versions)

    def _advancing(
        self, pipeline: PipelineRecord, keeper: LeaseKeeper, steps: list[StepRecord] | None
    ) -> Writing[Outcome | str]:
        """One pipeline's advance; an error is logged and recorded on it, and the pass goes on."""
        try:
            return (yield from self.runner.advancing(pipeline, keeper, steps))
        except LeaseLostError as exc:
            logger.warning("%s", exc, extra={"pipeline_uuid": pipeline.uuid})
            return f"{type(exc).__name__}: {exc}"
        except ConcurrentUpdateError as exc:
            logger.warning(
                "pipeline %s: write refused, another orchestrator holds it: %s",
                pipeline.uuid,
                exc,
                extra={"pipeline_uuid": pipeline.uuid},
            )
            return f"{type(exc).__name__}: {exc}"
        except RepositoryError as exc:  # the store's failure, not the engine's: no traceback
            logger.error(
                "pipeline %s: store error; what was not stored is done again in a later pass: %s",
                pipeline.uuid,
                exc,
                extra={"pipeline_uuid": pipeline.uuid},
            )
            self.runner.journal.record_error(pipeline, exc)
            return f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            logger.exception(
                "pipeline %s: advance failed: %s", pipeline.uuid, exc, extra={"pipeline_uuid": pipeline.uuid}
            )
            keeper.releasing(pipeline.uuid)
            self.runner.journal.record_error(pipeline, exc)
            return f"{type(exc).__name__}: {exc}"
        finally:
            keeper.drop(pipeline.uuid)  # its last write is stored: the lease is released

    def run_forever(self, interval: float = DEFAULT_INTERVAL_SECONDS, wake_poll: float = DEFAULT_WAKE_POLL) -> None:
        """Run passes until ``stop()`` or SIGTERM/SIGINT; a pass with a full batch is followed at
        once by the next. Between passes the worker waits until work may have arrived, the
        next timer, or ``interval`` seconds at most (``prorch.engine.idle``); ``wake_poll``:
        seconds between its looks for other processes' writes on SQLite and TinyDB. Raises
        ``WorkerUnhealthyError`` when more hung hook threads were abandoned than
        ``max_abandoned_hooks``, for a supervisor to restart the process."""
        _check_settings(interval=interval, wake_poll=wake_poll)
        restore = signals.stop_on_signals(self.stop, self._stopping, self.shutdown_grace)
        if not self.outage.down:
            self.outage = Outage(interval)
        self.extensions.call("start")
        try:
            with self._heartbeat():
                self._loop(interval, wake_poll)
        finally:
            restore()
            self.extensions.call("stop")  # a background task ends what it is doing, within shutdown_grace
            self.close()

    def _heartbeat(self) -> Heartbeat:
        self.heartbeat = Heartbeat(
            self.store, self.clock, self.owner, concurrency=self.concurrency, in_flight=lambda: self.hooks.in_flight,
            app_version=self.app_version, every=beat_seconds(self.lease_seconds),
        )  # fmt: skip
        return self.heartbeat

    def _loop(self, interval: float, wake_poll: float) -> None:
        """Passes until stopped; a pass that claimed a full batch is followed at once by the next."""
        while not self._stop.is_set():
            self.last_loop = time.monotonic()
            try:
                summary = self.execute_pipelines()
            except RepositoryError as exc:  # the store is down: keep the worker, back off (logged once)
                self._stop.wait(self.outage.failed(exc))
                continue
            self.outage.recovered()
            if summary.abandoned_hooks > self.max_abandoned_hooks:
                raise WorkerUnhealthyError(
                    f"{summary.abandoned_hooks} hung hook threads are still running (limit "
                    f"{self.max_abandoned_hooks}); exiting so that the supervisor starts a fresh worker"
                )
            if summary.claimed < self.batch_size:
                idle.wait_for_work(
                    self.store, self.extensions, self.clock, interval, wake_poll, self._stop, self.claimed_at
                )

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

    # --- reading -------------------------------------------------------------------------------

    def list_pipelines(self, status: Status | str | None = None, name: str | None = None) -> list[PipelineRecord]:
        """Stored pipelines, newest first; filtered by status and name when given."""
        found = self.store.pipelines_with_status(Status(status)) if status is not None else self.store.all_pipelines()
        if name is not None:
            found = [p for p in found if p.name == name]
        epoch = datetime.min.replace(tzinfo=self.clock.now().tzinfo)
        return sorted(found, key=lambda p: p.created_at or epoch, reverse=True)

    def query(
        self,
        *,
        status: Status | str | None = None,
        name: str | None = None,
        version: int | None = None,
        tenant: str | None = None,
        key: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        updated_since: datetime | None = None,
        updated_until: datetime | None = None,
        param: tuple[str, str | int | float | bool] | None = None,
        limit: int = 50,
        after: str | None = None,
        count: bool = False,
    ) -> PipelinePage:
        """A page of stored pipelines, newest first, by the store's indexes where it has them.

        Filters combine; ``since``/``until`` bound ``created_at`` (until excluded), ``param`` is
        ``(field, value)`` on a top-level params field. Pass the page's ``next_after`` as
        ``after`` for the next page; ``count=True`` adds the total number of matches."""
        query = PipelineQuery(
            status=Status(status).value if status is not None else None,
            name=name, version=version, tenant=tenant, key=key,
            created_since=since, created_until=until,
            updated_since=updated_since, updated_until=updated_until,
            param=param, limit=limit, count=count,
        )  # fmt: skip
        return self.store.query_pipelines(query, after=after)

    def get(self, uuid: str, *, workers_code: bool = True) -> PipelineState:
        """The pipeline ``uuid`` with its steps in order, its children, and why it is blocked,
        if it is. ``workers_code=False`` says this process has not loaded the workers' code (the
        CLI without ``--app``): a pipeline whose code is missing here is then reported as
        ``code_missing``, not as blocked, since the workers may well run it."""
        record = self._require(uuid)
        steps = sorted(self.store.steps_of(uuid), key=lambda s: (s.position is None, s.position or 0))
        missing = self.blocked_reason(record, steps)
        children = self.store.children_of(uuid)
        if record.status in TERMINAL or not workers_code:  # an ended pipeline waits for nothing
            return PipelineState(record, steps, code_missing=missing, children=children)
        return PipelineState(record, steps, blocked=missing, children=children)

    def result(self, uuid: str) -> Any:
        """The result of pipeline ``uuid``: its last step's output (or its ``Output`` model) once
        it finished, None while it runs; ``PipelineFailedError`` if it failed or was cancelled."""
        record = self._require(uuid)
        return result_of(record, self.store.steps_of(uuid), self.registry)

    def wait(self, uuid: str, timeout: float | None = None, poll: float = 0.2) -> Any:
        """Block until pipeline ``uuid`` ends and return its result (as ``result``); a
        worker elsewhere runs it. ``WaitTimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(poll, 0.05)
        while True:
            record = self._require(uuid)
            if record.status in TERMINAL:
                return result_of(record, self.store.steps_of(uuid), self.registry)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"pipeline {uuid} did not end within {timeout:g}s (it is {record.status.value})", uuid=uuid
                )
            pause = delay if deadline is None else max(min(delay, deadline - time.monotonic()), 0)
            time.sleep(pause)
            delay = min(delay * 2, poll)

    def get_by_key(self, key: str, *, workers_code: bool = True) -> PipelineState:
        """The pipeline created with ``key`` (``create(key=...)``), with its steps (``workers_code``
        as for ``get``)."""
        uuid = uuid_for_key(key)
        try:
            return self.get(uuid, workers_code=workers_code)
        except PipelineNotFoundError:
            raise PipelineNotFoundError(f"no pipeline was created with key {key!r}", uuid=uuid) from None

    def history(self, uuid: str) -> list[EventRecord]:
        """The pipeline's events, oldest first."""
        self._require(uuid)
        return self.store.events_of(uuid)

    def blocked_on_page(self, records: list[PipelineRecord]) -> dict[str, str]:
        """Why each unended pipeline whose class (name, version) is not registered here is
        blocked, by uuid: with the workers' code loaded, those no worker claims (``prorch list``)."""
        found = {}
        for record in records:
            if record.status not in TERMINAL:
                reason = self.blocked_reason(record, [])
                if reason is not None:
                    found[record.uuid] = reason
        return found

    def blocked_reason(self, record: PipelineRecord, steps: list[StepRecord]) -> str | None:
        try:
            self.registry.pipeline(record.name, record.version)
            for step in steps:
                self.registry.step(step.name, step.version)
        except ProrchError as exc:
            return str(exc)
        return None

    # --- acting --------------------------------------------------------------------------------

    def cancel(self, uuid: str) -> PipelineState:
        """Cancel a pipeline that has not ended; its current step's ``on_cancel()`` runs once.

        If another worker holds the pipeline, a cancel request is stored instead: that worker's
        next transition is refused and it cancels the pipeline then (or the next worker does)."""
        record = self._require(uuid)
        if record.status in TERMINAL:
            raise InvalidStateError(f"pipeline {uuid} is already {record.status.value}; nothing to cancel")
        self._require_code(record, "cancelled")  # before the claim: a refusal leaves no lease behind
        cancelled = self.cancel_here(uuid)
        if cancelled is not None:
            self.extensions.call("on_ended", cancelled, Status.CANCELLED)
        return self.get(uuid)

    def cancel_here(self, uuid: str) -> PipelineRecord | None:
        """Cancel a pipeline in this process and return it, with no ``on_ended`` told; None when
        it had ended already, or another worker holds it (a cancel request is stored for that
        worker)."""
        now = self.clock.now()
        claimed = self.store.claim_one(uuid, now, self.new_lease_token(), now + timedelta(seconds=self.lease_seconds))
        if claimed is None:
            outside.request_cancel(self.store, self.clock, uuid)
            return None
        if claimed.status in TERMINAL:
            return None
        self.runner.cancel(claimed)
        return claimed

    def retry(self, uuid: str) -> PipelineState:
        """Resume a failed pipeline from its failed step, with fresh attempts."""
        record = self._require(uuid)
        if record.status != Status.FAILED:
            raise InvalidStateError(f"pipeline {uuid} is {record.status.value}; only a failed pipeline can be retried")
        self._require_code(record, "retried")
        self.runner.retry(record)
        return self.get(uuid)

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
        missing = self.blocked_reason(record, self.store.steps_of(record.uuid))
        if missing is not None:
            raise NotRegisteredError(
                f"pipeline {record.uuid} ({record.name} v{record.version}) cannot be {done} here, its code is "
                f"not loaded: {missing}",
                name=record.name,
            )

    def _require(self, uuid: str) -> PipelineRecord:
        record = self.store.get_pipeline(uuid)
        if record is None:
            raise PipelineNotFoundError(f"no pipeline with uuid {uuid} is stored", uuid=uuid)
        return record


def _non_negative(value: Any) -> bool:
    return isinstance(value, timedelta) and value >= timedelta(0)


def _check_settings(**settings: Any) -> None:
    """One ``ConfigurationError`` naming the first bad ``Orchestrator`` argument and what it takes,
    by the rule the settings' fields use too (``prorch.model.defaults``)."""
    for name, value in settings.items():
        rule = defaults.RULES[name]
        if not rule.admits(value):
            raise ConfigurationError(f"Orchestrator({name}={value!r}): {name} must be {rule.wanted()}")
