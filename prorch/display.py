"""How times, durations and step limits read to a person: one rule for ``prorch show``,
``prorch list`` and the dashboard."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prorch.model.exceptions import ProrchError
from prorch.model.records import PipelineRecord, StepRecord, format_timestamp
from prorch.model.registry import Registry
from prorch.model.status import TERMINAL
from prorch.model.substates import NO_HOLDS, RUNNING, Holds, state_of
from prorch.model.workers import WorkerRow, stranded_until, worker_of


def format_time(moment: datetime | None) -> str:
    """A stored time with its zone (stored times are UTC); ``-`` for none."""
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z") if moment is not None else "-"


def format_seconds(seconds: float | None) -> str:
    """``0.004s``, ``12.5s``, ``3m07s``, ``2h05m``; ``-`` for none."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.3f}s" if seconds < 10 else f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def step_seconds(step: StepRecord, now: datetime) -> float | None:
    """How long a step took, or has taken so far when it has not ended; None before it started."""
    if step.started_at is None:
        return None
    end = step.finished_at or (now if step.status not in TERMINAL else None)
    return (end - step.started_at).total_seconds() if end is not None else None


def step_limits(registry: Registry, steps: list[StepRecord]) -> dict[str, int]:
    """Each step's ``max_attempts``, for the steps whose code is loaded here."""
    limits: dict[str, int] = {}
    for step in steps:
        try:
            limits[step.name] = registry.step(step.name, step.version).max_attempts
        except ProrchError:
            continue
    return limits


def app_loaded(registry: Registry) -> bool:
    """Whether this process has the app's own pipeline classes (prorch's internal ones, such as
    ``prorch.Reaction``, are always there). Without them a pipeline's class is missing here for
    every pipeline, which says nothing about whether the workers have it: nothing is blocked."""
    return any(not name.startswith("prorch.") for name in registry.pipelines)


def lease_holder(record: PipelineRecord, workers: list[WorkerRow], now: datetime) -> dict[str, Any] | None:
    """Which worker runs the pipeline and since when (its hook's start, else its last change),
    and whether it is stranded: its holder's heartbeat is late, so it resumes when the lease
    runs out. None when no live lease holds it."""
    if record.status in TERMINAL or record.lease_expires_at is None or record.lease_expires_at <= now:
        return None
    since = record.hook_started_at or record.updated_at
    resumes = stranded_until(record.lease_owner, record.lease_expires_at, workers, now)
    return {
        "worker": worker_of(record.lease_owner),
        "since": format_timestamp(since) if since is not None else None,
        "stranded": resumes is not None,
        "resumes_at": format_timestamp(resumes) if resumes is not None else None,
    }


def holder_text(holder: dict[str, Any]) -> str:
    """``running on worker W since HH:MM:SS`` or ``stranded, resumes at HH:MM`` (UTC, as stored)."""
    if holder["stranded"]:
        resumes = datetime.fromisoformat(holder["resumes_at"])
        return f"stranded, resumes at {resumes:%H:%M} UTC (worker {holder['worker']} stopped beating)"
    since = datetime.fromisoformat(holder["since"]).strftime("%H:%M:%S UTC") if holder["since"] else "-"
    return f"running on worker {holder['worker']} since {since}"


def state_text(
    record: PipelineRecord, now: datetime, workers: list[WorkerRow], blocked: str | None = None,
    holds: Holds = NO_HOLDS,
) -> str:  # fmt: skip
    """What ``prorch list`` and ``show`` print for a pipeline's state: ``running``, ``due``,
    ``waiting``, ``paused``, ``max-running`` or ``rate-limited`` for a pending one
    (``prorch.model.substates``, with ``holds``: ``Orchestrator.holds()``), ``stranded`` for one
    running on a worker whose heartbeat stopped, ``blocked`` when no worker has its code; else
    its status."""
    if blocked and record.status not in TERMINAL:
        return "blocked"
    state = state_of(record, now, holds)
    expires = record.lease_expires_at
    if state == RUNNING and expires is not None and stranded_until(record.lease_owner, expires, workers, now):
        return "stranded"
    return state
