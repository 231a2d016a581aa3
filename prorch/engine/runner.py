"""``Runner``: advancing one pipeline. Run its current step's hooks, persist each transition,
start the next step when one finishes, roll finished steps back when one fails for good, and
stop at a wait, a verdict, or the per-pass bound. The parts: ``transitions`` (the state machine,
pure), ``journal`` (load and commit), ``hookcalls`` (one bounded hook call), ``turns`` (a step's
hooks and their results) and ``endings`` (rollback, cancel, quarantine)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from prorch.engine import transitions
from prorch.engine.bounded_calls import HookCaller
from prorch.engine.endings import Endings
from prorch.engine.extension import Extensions
from prorch.engine.journal import Journal
from prorch.engine.policy import Policies, StepOverride
from prorch.engine.rounds import write_each
from prorch.engine.state import Outcome, Run, Writing
from prorch.engine.step_hooks import HookInvoker
from prorch.engine.turns import Turns
from prorch.model import defaults, patches
from prorch.model.clock import Clock
from prorch.model.exceptions import NotRegisteredError, ProrchError, StepTimeoutError
from prorch.model.pauses import Paused, scopes_of
from prorch.model.records import PipelineRecord, StepRecord
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL
from prorch.model.step_logs import install_capture
from prorch.storage.leases import LeaseKeeper
from prorch.storage.store import Store

logger = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = defaults.LEASE_SECONDS.default
DEFAULT_MAX_TURNS_PER_PASS = 100
"""How many step hooks one pipeline may run in one pass before it yields to the others."""
DEFAULT_MAX_CRASHES = defaults.MAX_CRASHES.default
DEFAULT_STEP_LOG_LINES = defaults.STEP_LOG_LINES.default
"""How many workers in a row may die while one of a pipeline's hooks runs before it is quarantined."""


PAUSE_LOOK_SECONDS = 1.0
"""How old the pauses may be that a runner checks between two hooks of one claim (the claim
itself reads them in its statement): a pause stored while a hook runs holds the next one."""


class PauseLook:
    """The stored pauses as last read, read again when older than ``PAUSE_LOOK_SECONDS``: a
    look between two hooks costs no read on most turns."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: tuple[float, Paused] = (-PAUSE_LOOK_SECONDS, Paused())

    def holds(self, pipeline: PipelineRecord) -> bool:
        at, paused = self._seen
        if time.monotonic() - at > PAUSE_LOOK_SECONDS:
            with contextlib.suppress(ProrchError):  # the store is down: the next write says so
                paused = self.store.paused()
            self._seen = (time.monotonic(), paused)
        return bool(paused) and paused.holding(scopes_of(pipeline.name, pipeline.version, pipeline.uuid,
                                                         pipeline.context)) is not None  # fmt: skip


class Runner:
    """Advances pipelines against one store with one clock."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        clock: Clock,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_turns: int = DEFAULT_MAX_TURNS_PER_PASS,
        max_crashes: int = DEFAULT_MAX_CRASHES,
        step_overrides: Mapping[str, StepOverride] | None = None,
        hook_timeout: float | None = None,
        hooks: HookCaller | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        request_stop: Callable[[], None] | None = None,
        extensions: Extensions | None = None,
        step_log_lines: int = DEFAULT_STEP_LOG_LINES,
        capture_logging: bool = False,
    ) -> None:
        self.clock = clock
        self.max_turns = max_turns
        self.max_crashes = max_crashes
        self.policies = Policies(step_overrides)
        self.hooks = hooks or HookCaller()
        self.should_stop = should_stop
        self.request_stop = request_stop
        self.extensions = extensions or Extensions()
        """The features' hooks the runner calls: ``around_hook``, ``on_hook_end``, ``on_transition``."""
        self.pauses = PauseLook(store)
        self.journal = Journal(store, registry, clock, self.policies, lease_seconds, self.extensions)
        self.invoker = HookInvoker(self.journal, self.hooks, clock, self.policies, hook_timeout, self.extensions)
        self.turns = Turns(self.journal, self.invoker, registry, clock, self.policies)
        self.turns.log_lines, self.turns.capture_logging = step_log_lines, capture_logging
        self.invoker.log_lines, self.invoker.capture_logging = step_log_lines, capture_logging
        if capture_logging:
            install_capture()
        self.endings = Endings(self.journal, self.invoker, self.turns, clock, self.policies, max_crashes)

    # --- entry points ----------------------------------------------------------------------

    def advance(self, pipeline: PipelineRecord, keeper: LeaseKeeper | None = None) -> Outcome:
        """Run the pipeline's due work now, one commit per transition."""
        return write_each(self.journal.store, self.advancing(pipeline, keeper))

    def advancing(
        self,
        pipeline: PipelineRecord,
        keeper: LeaseKeeper | None = None,
        steps: list[StepRecord] | None = None,
        *,
        marked: bool = False,
    ) -> Writing[Outcome]:
        """The pipeline's due work, yielding each transition to store (see ``Writing``). The
        record must be claimed by this runner (its ``lease_owner`` is our lease token), or the
        store must be one without claims, used by a single orchestrator. ``steps``: its steps,
        when they were read after the claim (see ``Store.steps_of_many``). ``marked``: the
        claim stored its hook mark (``ClaimRequest.mark``), which is then no dead worker's."""
        try:
            run = self.journal.load(pipeline, steps)
            if not pipeline.cancel_requested:  # a cancel still runs: it is how a stranded pipeline ends
                patches.check(run.definition, pipeline)
        except NotRegisteredError as exc:
            logger.warning("pipeline %s is blocked: %s", pipeline.uuid, exc, extra={"pipeline_uuid": pipeline.uuid})
            if keeper is not None:
                keeper.releasing(pipeline.uuid)
            return (yield from self.journal.leave_blocked(pipeline, str(exc), unmark=marked))
        run.token, run.keeper = pipeline.lease_owner, keeper
        try:
            if not marked and transitions.charge_crash(run):  # the claim's own mark is no dead worker's
                self._log_crash(run)
                # stored before any hook runs, with no hook marked: a crash from here on is a new one
                yield from self.journal.commit(run, [], stop=False, mark=False)
            elif run.crashed_hook_at is not None:
                logger.warning(
                    "pipeline %s: a worker died or vanished during a round of group commit that included "
                    "this pipeline; not charged, its hooks now run alone until they pass",
                    pipeline.uuid, extra={"pipeline_uuid": pipeline.uuid},
                )  # fmt: skip
            if pipeline.status not in TERMINAL and pipeline.crashes >= self.max_crashes:
                yield from self.endings.quarantine(run)
            elif pipeline.cancel_requested and pipeline.status not in TERMINAL:
                yield from self._cancel(run)
            else:
                if transitions.settle(run, self.clock.now()):
                    yield from self.journal.commit(run, [], stop=run.pipeline.status in TERMINAL)
                yield from self._loop(run)
        except KeyboardInterrupt:
            yield from self._interrupted(run)
        return transitions.outcome(run, self.clock.now())

    def cancel(self, pipeline: PipelineRecord, note: dict[str, str] | None = None) -> Outcome:
        """Cancel a pipeline that has not ended; the current step's ``on_cancel`` runs. ``note``
        (an operator's actor and reason) goes into the ``pipeline.cancelled`` event."""
        run = self.journal.load(pipeline)
        run.token = pipeline.lease_owner
        run.note = dict(note or {})
        write_each(self.journal.store, self.endings.cancel(run))
        return transitions.outcome(run, self.clock.now())

    def retry(self, pipeline: PipelineRecord, note: dict[str, str] | None = None) -> Outcome:
        """Put a failed pipeline back to pending from its failed step, with fresh attempts."""
        run = self.journal.load(pipeline)
        changed = transitions.reset_for_retry(run, self.clock.now(), note)
        write_each(self.journal.store, self.journal.commit(run, changed, stop=True))
        return transitions.outcome(run, self.clock.now())

    # --- the loop --------------------------------------------------------------------------

    def _loop(self, run: Run) -> Writing[None]:
        ran = False
        while run.pipeline.status not in TERMINAL:
            if run.pipeline.cancel_requested:  # merged from an outside write while we ran
                yield from self._cancel(run)
                return
            now = self.clock.now()
            step, rollback = run.next_step()
            if step is None:  # pragma: no cover - derive_pipeline_status makes this terminal
                return
            deadline = None if rollback else transitions.deadline(run, step, self.policies)
            if deadline is not None and deadline <= now:
                timeout = self.policies.of(run.classes[step.uuid]).timeout or 0
                error = StepTimeoutError(f"step {step.name} timed out: no verdict within {timeout:g}s of its start")
                if not (yield from self.turns.time_out(run, step, now, error)):
                    return
                continue
            if step.next_run_at is not None and step.next_run_at > now:
                if rollback or not self.journal.has_mail(run):
                    yield from self.journal.park(run)
                    return
                step.next_run_at = None  # woken by a message before its wait was over
            if run.transitions >= self.max_turns or run.hooks_left == 0 or self.should_stop():
                yield from self.journal.park(run)
                return
            if ran and self.pauses.holds(run.pipeline):  # paused while its last hook ran
                yield from self.journal.park(run)
                return
            yield from self.journal.mark_hook_running(run)  # a no-op when the last write did it
            if self.should_stop():  # asked for while that was stored (in a round of group commit)
                yield from self.journal.park(run)
                return
            if run.hooks_left is not None:
                run.hooks_left -= 1
            ran = True
            turn = self.endings.roll_back(run, step, now) if rollback else self.turns.turn(run, step, now)
            if not (yield from turn):
                return

    def _cancel(self, run: Run) -> Writing[None]:
        """Cancel the run's pipeline (its ``on_cancel`` runs); once stopping, put it back instead,
        its cancel request kept for the next worker: no hook starts after a stop (a worker
        releases what it claimed and did not start without running a hook, outside its slots)."""
        if self.should_stop():
            yield from self.journal.park(run)
        else:
            yield from self.endings.cancel(run)

    def _log_crash(self, run: Run) -> None:
        pipeline = run.pipeline
        logger.warning(
            "pipeline %s: a worker died or vanished while one of its hooks was running (since %s); "
            "crash %d of %d before quarantine",
            pipeline.uuid, run.crashed_hook_at.isoformat() if run.crashed_hook_at else "?", pipeline.crashes,
            self.max_crashes, extra={"pipeline_uuid": pipeline.uuid},
        )  # fmt: skip

    def _interrupted(self, run: Run) -> Writing[None]:
        """A hook raised KeyboardInterrupt: stop the worker as SIGINT does, and put this
        pipeline back, due now, without blame (its hook runs again: at least once)."""
        logger.warning(
            "pipeline %s: a hook raised KeyboardInterrupt; stopping the worker as on SIGINT",
            run.pipeline.uuid,
            extra={"pipeline_uuid": run.pipeline.uuid},
        )
        run.forget_pending()
        if self.request_stop is not None:
            self.request_stop()  # first: the other pipelines of a round start no hook from now on
        yield from self.journal.park(run)
        if self.request_stop is None:
            raise KeyboardInterrupt
