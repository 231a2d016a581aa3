"""``Runner``: advancing one pipeline. Run its current step's hooks, persist each transition,
start the next step when one finishes, roll finished steps back when one fails for good, and
stop at a wait, a verdict, or the per-pass bound. The parts: ``transitions`` (the state machine,
pure), ``journal`` (load and commit), ``hookcalls`` (one bounded hook call), ``turns`` (a step's
hooks and their results) and ``endings`` (rollback, cancel, quarantine)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from prorch.clock import Clock
from prorch.exceptions import NotRegisteredError, StepTimeoutError
from prorch.hooks import HookCaller
from prorch.leases import LeaseKeeper
from prorch.policy import Policies, StepOverride
from prorch.records import PipelineRecord
from prorch.registry import Registry
from prorch.runner import transitions
from prorch.runner.endings import Endings
from prorch.runner.hookcalls import HookInvoker
from prorch.runner.journal import Journal
from prorch.runner.state import Outcome, Run
from prorch.runner.turns import Turns
from prorch.status import TERMINAL
from prorch.store import Store

logger = logging.getLogger("prorch.runner")

DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_MAX_TURNS_PER_PASS = 100
"""How many step hooks one pipeline may run in one pass before it yields to the others."""
DEFAULT_MAX_CRASHES = 3
"""How many workers in a row may die while one of a pipeline's hooks runs before it is quarantined."""


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
    ) -> None:
        self.clock = clock
        self.max_turns = max_turns
        self.max_crashes = max_crashes
        self.policies = Policies(step_overrides)
        self.hooks = hooks or HookCaller()
        self.should_stop = should_stop
        self.request_stop = request_stop
        self.journal = Journal(store, registry, clock, self.policies, lease_seconds)
        self.invoker = HookInvoker(self.journal, self.hooks, clock, self.policies, hook_timeout)
        self.turns = Turns(self.journal, self.invoker, registry, clock, self.policies)
        self.endings = Endings(self.journal, self.invoker, self.turns, clock, self.policies, max_crashes)

    # --- entry points ----------------------------------------------------------------------

    def advance(self, pipeline: PipelineRecord, keeper: LeaseKeeper | None = None) -> Outcome:
        """Run the pipeline's due work now. The record must be claimed by this runner (its
        ``lease_owner`` is our lease token), or the store must be one without claims, used by a
        single orchestrator."""
        try:
            run = self.journal.load(pipeline)
        except NotRegisteredError as exc:
            logger.warning("pipeline %s is blocked: %s", pipeline.uuid, exc, extra={"pipeline_uuid": pipeline.uuid})
            return self.journal.leave_blocked(pipeline, str(exc))
        run.token, run.keeper = pipeline.lease_owner, keeper
        try:
            if transitions.charge_crash(run):
                self._log_crash(run)
            if pipeline.status not in TERMINAL and pipeline.crashes >= self.max_crashes:
                self.endings.quarantine(run)
            elif pipeline.cancel_requested and pipeline.status not in TERMINAL:
                self.endings.cancel(run)
            else:
                if transitions.settle(run, self.clock.now()):
                    self.journal.commit(run, [], stop=run.pipeline.status in TERMINAL)
                self._loop(run)
        except KeyboardInterrupt:
            self._interrupted(run)
        return transitions.outcome(run, self.clock.now())

    def cancel(self, pipeline: PipelineRecord) -> Outcome:
        """Cancel a pipeline that has not ended; the current step's ``on_cancel`` runs."""
        run = self.journal.load(pipeline)
        run.token = pipeline.lease_owner
        self.endings.cancel(run)
        return transitions.outcome(run, self.clock.now())

    def retry(self, pipeline: PipelineRecord) -> Outcome:
        """Put a failed pipeline back to pending from its failed step, with fresh attempts."""
        run = self.journal.load(pipeline)
        changed = transitions.reset_for_retry(run, self.clock.now())
        self.journal.commit(run, changed, stop=True)
        return transitions.outcome(run, self.clock.now())

    # --- the loop --------------------------------------------------------------------------

    def _loop(self, run: Run) -> None:
        while run.pipeline.status not in TERMINAL:
            if run.pipeline.cancel_requested:  # merged from an outside write while we ran
                self.endings.cancel(run)
                return
            now = self.clock.now()
            step, rollback = run.next_step()
            if step is None:  # pragma: no cover - derive_pipeline_status makes this terminal
                return
            deadline = None if rollback else transitions.deadline(run, step, self.policies)
            if deadline is not None and deadline <= now:
                timeout = self.policies.of(run.classes[step.uuid]).timeout or 0
                error = StepTimeoutError(f"step {step.name} timed out: no verdict within {timeout:g}s of its start")
                if not self.turns.time_out(run, step, now, error):
                    return
                continue
            if step.next_run_at is not None and step.next_run_at > now:
                if rollback or not self.journal.has_mail(run):
                    self.journal.park(run)
                    return
                step.next_run_at = None  # woken by a message before its wait was over
            if run.transitions >= self.max_turns or self.should_stop():
                self.journal.park(run)
                return
            go_on = self.endings.roll_back(run, step, now) if rollback else self.turns.turn(run, step, now)
            if not go_on:
                return

    def _log_crash(self, run: Run) -> None:
        pipeline = run.pipeline
        logger.warning(
            "pipeline %s: a worker died or vanished while one of its hooks was running (since %s); "
            "crash %d of %d before quarantine",
            pipeline.uuid, run.crashed_hook_at.isoformat() if run.crashed_hook_at else "?", pipeline.crashes,
            self.max_crashes, extra={"pipeline_uuid": pipeline.uuid},
        )  # fmt: skip

    def _interrupted(self, run: Run) -> None:
        """A hook raised KeyboardInterrupt: stop the worker as SIGINT does, and put this
        pipeline back, due now, without blame (its hook runs again: at least once)."""
        logger.warning(
            "pipeline %s: a hook raised KeyboardInterrupt; stopping the worker as on SIGINT",
            run.pipeline.uuid,
            extra={"pipeline_uuid": run.pipeline.uuid},
        )
        run.forget_pending()
        self.journal.park(run)
        if self.request_stop is None:
            raise KeyboardInterrupt
        self.request_stop()
