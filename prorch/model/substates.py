"""What a pending pipeline is doing, told apart from what its record says: running (a worker's
lease holds it now), paused (a pause holds it: ``prorch.model.pauses``), held by its class's limit
(``max-running``: as many as ``max_running`` run now; ``rate-limited``: its ``rate_limit`` is
spent for now), due (its time has come and nothing holds it) or waiting (its time has not come: a
``wait()``, a retry's backoff, a message or a child it waits for). Ended pipelines have their
status as their state. One rule for the listing's SQL, its Python fallback, the CLI and the API."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from prorch.model.pauses import Pause, Paused, scopes_of
from prorch.model.records import PipelineRecord
from prorch.model.status import Status

RUNNING = "running"
DUE = "due"
WAITING = "waiting"
PAUSED = "paused"
MAX_RUNNING = "max-running"
RATE_LIMITED = "rate-limited"
LIMITED = (MAX_RUNNING, RATE_LIMITED)
SUBSTATES = (RUNNING, DUE, WAITING, PAUSED, MAX_RUNNING, RATE_LIMITED)
"""The states a pending pipeline splits into; ``--state`` takes these and the ended statuses."""
STATES = (*SUBSTATES, Status.CREATED.value, Status.FINISHED.value, Status.FAILED.value, Status.CANCELLED.value)


@dataclass(frozen=True)
class Limited:
    """A pipeline class held by its limit now: which state, and why in words."""

    state: str
    why: str


@dataclass(frozen=True)
class Holds:
    """What holds due work back at one moment: the stored pauses, and the classes at their
    ``max_running`` or out of their ``rate_limit`` (by name). A full tenant or key of a class is
    not told (its due pipelines show as due): no index answers "due and not of these tenants",
    so the overview's due count would compare every due row of the class (docs/concepts.md)."""

    paused: Paused = field(default_factory=Paused)
    limited: Mapping[str, Limited] = field(default_factory=dict)

    def names_in(self, state: str) -> tuple[str, ...]:
        """The class names held in ``state`` (``max-running`` or ``rate-limited``)."""
        return tuple(sorted(name for name, held in self.limited.items() if held.state == state))

    def pause_of(self, record: PipelineRecord) -> Pause | None:
        return self.paused.holding(scopes_of(record.name, record.version, record.uuid, record.context))


NO_HOLDS = Holds()


def state_of(record: PipelineRecord, now: datetime, holds: Holds = NO_HOLDS) -> str:
    """The state of a pipeline (see the module): a pending one's, else its status. A lease
    comes first (a paused pipeline's running hook finishes), then a pause, then the time."""
    if record.status != Status.PENDING:
        return str(record.status.value)
    if record.lease_expires_at is not None and record.lease_expires_at > now:
        return RUNNING
    if holds.paused and holds.pause_of(record) is not None:
        return PAUSED
    if record.next_run_at is None or record.next_run_at <= now:
        held = holds.limited.get(record.name)
        return held.state if held is not None else DUE
    return WAITING


def why(record: PipelineRecord, state: str, holds: Holds) -> str | None:
    """What holds a paused or limited pipeline, in words (None for the other states)."""
    if state == PAUSED:
        pause = holds.pause_of(record)
        return pause.describe() if pause is not None else None
    if state in LIMITED:
        held = holds.limited.get(record.name)
        return held.why if held is not None else None
    return None
