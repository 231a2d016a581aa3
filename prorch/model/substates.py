"""What a pending pipeline is doing, told apart from what its record says: running (a worker's
lease holds it now), due (its time has come and no worker holds it) or waiting (its time has
not come: a ``wait()``, a retry's backoff, a message or a child it waits for). Ended pipelines
have their status as their state. One rule for the listing's SQL, its Python fallback, the CLI
and the API."""

from __future__ import annotations

from datetime import datetime

from prorch.model.records import PipelineRecord
from prorch.model.status import Status

RUNNING = "running"
DUE = "due"
WAITING = "waiting"
SUBSTATES = (RUNNING, DUE, WAITING)
"""The states a pending pipeline splits into; ``--state`` takes these and the ended statuses."""
STATES = (*SUBSTATES, Status.CREATED.value, Status.FINISHED.value, Status.FAILED.value, Status.CANCELLED.value)


def state_of(record: PipelineRecord, now: datetime) -> str:
    """``running``, ``due`` or ``waiting`` for a pending pipeline, else its status."""
    if record.status != Status.PENDING:
        return str(record.status.value)
    if record.lease_expires_at is not None and record.lease_expires_at > now:
        return RUNNING
    if record.next_run_at is None or record.next_run_at <= now:
        return DUE
    return WAITING
