"""How a pipeline ends other than by its steps' verdicts: compensation (``on_rollback`` of the
finished steps once one failed for good), cancel (``on_cancel``), and quarantine (workers kept
dying in its hooks)."""

from __future__ import annotations

import logging
from datetime import datetime

from prorch.engine import transitions
from prorch.engine.journal import Journal
from prorch.engine.policy import Policies
from prorch.engine.state import Run, Writing
from prorch.engine.step_hooks import HookInvoker
from prorch.engine.turns import Turns
from prorch.model.clock import Clock
from prorch.model.exceptions import WorkerCrashed
from prorch.model.records import ErrorInfo, StepRecord
from prorch.model.status import EventType, Status

logger = logging.getLogger(__name__)


class Endings:
    """Rollback, cancel and quarantine of one run."""

    def __init__(
        self, journal: Journal, invoker: HookInvoker, turns: Turns, clock: Clock, policies: Policies, max_crashes: int
    ) -> None:
        self.journal = journal
        self.invoker = invoker
        self.turns = turns
        self.clock = clock
        self.policies = policies
        self.max_crashes = max_crashes

    def roll_back(self, run: Run, step: StepRecord, now: datetime) -> Writing[bool]:
        """Run one finished step's ``on_rollback``; retried like a hook, then given up on."""
        run.transitions += 1
        step.rollback_attempt += 1
        error = yield from self.invoker.call_guarded(run, step, now, "on_rollback")
        if error is not None:
            if step.rollback_attempt < self.policies.of(run.classes[step.uuid]).max_attempts:
                yield from self.turns.retry_later(run, step, step.rollback_attempt, error.message, now, rollback=True)
                return False
            logger.error(
                "on_rollback of step %s in pipeline %s failed for good: %s", step.name, run.pipeline.uuid, error.message
            )
        transitions.rolled_back(run, step, now, error)
        return (yield from self.journal.commit(run, [step], stop=False))

    def cancel(self, run: Run) -> Writing[None]:
        """Cancel the run's pipeline; the current step's ``on_cancel`` runs first."""
        now = self.clock.now()
        step = run.current_step()
        if step is not None:
            yield from self.invoker.call_on_cancel(run, step, now)
            transitions.end_step(run, step, Status.CANCELLED, EventType.STEP_CANCELLED, now)
        run.pipeline.cancel_requested = False  # only now: a crash in on_cancel leaves the request
        yield from self.journal.commit(run, [step] if step else [], stop=True)

    def quarantine(self, run: Run) -> Writing[None]:
        """Workers died again and again while this pipeline's hooks ran: fail it instead of
        running its hooks once more."""
        error = ErrorInfo(
            type=WorkerCrashed.__name__,
            message=(
                f"quarantined: a worker died {run.pipeline.crashes} times in a row while a hook of this "
                f"pipeline was running (limit {self.max_crashes}); fix the cause, then retry it "
                f"(prorch retry {run.pipeline.uuid})"
            ),
        )
        logger.error("pipeline %s %s", run.pipeline.uuid, error.message, extra={"pipeline_uuid": run.pipeline.uuid})
        changed = transitions.quarantine(run, self.clock.now(), error)
        yield from self.journal.commit(run, changed, stop=True)
