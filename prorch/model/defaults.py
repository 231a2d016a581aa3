"""Each worker setting's default and bounds, written once: the settings' fields
(``prorch.config``), the ``Orchestrator``'s and the ``Runner``'s keyword defaults and the
``Orchestrator``'s argument checks all read them here, so the command line, ``prorch.toml`` and
``Orchestrator(...)`` cannot drift apart (``tests/unit/test_config.py`` holds them together)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prorch.model.clock import MAX_SECONDS

T = TypeVar("T")


@dataclass(frozen=True)
class Rule(Generic[T]):
    """A numeric setting: its default and its bounds (``None``: no bound). A setting whose default
    is ``None`` may also be ``None`` (off, or computed from another setting)."""

    default: T
    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    integer: bool = True
    unit: str = ""  # what the number counts, in the error ("seconds")
    note: str = ""  # said after the bounds in the error

    def admits(self, value: object) -> bool:
        """Whether ``value`` is a valid value of this setting."""
        if value is None:
            return self.default is None
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.le is None or value <= self.le)
        )

    def wanted(self) -> str:
        """What the setting takes, for an error: ``"an int >= 1"``, ``"None or seconds > 0"``."""
        kind = "an int" if self.integer else f"a number of {self.unit}" if self.unit else "a number"
        upper = None if self.le == MAX_SECONDS else self.le  # said in words below
        bounds = [f"{op} {_number(bound)}" for op, bound in ((">", self.gt), (">=", self.ge), ("<=", upper))]
        text = " ".join([kind, *[bound for bound in bounds if not bound.endswith("None")]])
        if not self.integer:
            text = f"{text} (finite, at most {_number(self.le)}: a year)" if self.le == MAX_SECONDS else text
        text = f"None or {text}" if self.default is None else text
        return f"{text} ({self.note})" if self.note else text


def _number(bound: float | None) -> str:
    if bound is None:
        return "None"
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


CONCURRENCY: Rule[int] = Rule(4, ge=1)
"""Hooks run at once by one process."""
BATCH_SIZE: Rule[int] = Rule(100, ge=1)
"""Pipelines claimed per pass."""
GROUP_COMMIT: Rule[int] = Rule(100, ge=1, note="1: one commit per transition")
"""Transitions of different pipelines stored per commit, at most (see ``prorch.engine.rounds``).
Measured on W1 (transitions/s, group 1 / 8 / 32 / 100): SQLite 1,290 / 1,590 / 1,630 / 1,640,
durable PostgreSQL about 320 / 300 / 360 / 400, TinyDB (1,000 pipelines) 9 / 78 / 199 / 478: flat
on SQLite past 8, rising to the default batch size elsewhere."""
GROUP_WINDOW: Rule[float] = Rule(0.005, ge=0, le=1, integer=False, unit="seconds")
"""How long a worker waits for a running hook to return before it stores the transitions
waiting for their group commit; hooks quicker than this also let pipelines wait between two
hooks for a fuller group (see ``prorch.engine.slots``)."""
PREFETCH: Rule[int | None] = Rule(None, ge=0, note="None: a quarter of concurrency, at least 2")
"""Pipelines a worker claims beyond its room, waiting for a slot (their leases are renewed); one
also starts in a slot whose hook returned while that hook's transition is being stored, so a
worker with many slots needs more of them (``prefetch_for``)."""


def prefetch_for(concurrency: int) -> int:
    """The default prefetch: a quarter of ``concurrency``, at least 2. Measured on #27's W4
    (32 slots of 50 ms hooks, PostgreSQL): the slots busy in each commit's 10-15 ms round trip
    need about concurrency / 5 pipelines beyond the slots; 2 left 0.80 of the ideal rate,
    8 gave 0.84-0.88."""
    return max(2, concurrency // 4)


LEASE_SECONDS: Rule[float] = Rule(60.0, gt=0, le=MAX_SECONDS, integer=False, unit="seconds")
"""How long a claim lasts unrenewed."""
MAX_CRASHES: Rule[int] = Rule(3, ge=1)
"""Worker deaths in a row inside a pipeline's hooks before it is quarantined."""
HOOK_TIMEOUT: Rule[float | None] = Rule(None, gt=0, le=MAX_SECONDS, integer=False, unit="seconds")
"""Seconds one hook call may take when its step sets no timeout (None: no limit)."""
MAX_ABANDONED_HOOKS: Rule[int | None] = Rule(None, ge=0)
"""Hung hook threads a worker may hold before it exits (None: ``concurrency``)."""
SHUTDOWN_GRACE: Rule[float] = Rule(30.0, ge=0, le=MAX_SECONDS, integer=False, unit="seconds")
"""How long a stopping worker waits for running hooks before it exits anyway."""
STEP_LOG_LINES: Rule[int] = Rule(200, ge=0, note="0: keep none")
"""Lines of ``self.log`` kept per step attempt; the rest are counted as dropped."""
INTERVAL: Rule[float] = Rule(5.0, gt=0, le=MAX_SECONDS, integer=False, unit="seconds")
"""Seconds an idle worker waits at most between passes: the safety net under its wake-ups."""
WAKE_POLL: Rule[float] = Rule(0.2, ge=0.01, le=60, integer=False, unit="seconds")
"""Seconds between an idle worker's cheap looks for work written by other processes (SQLite,
TinyDB: a file's change counter, then one row of the due index) and for a stop."""
PORT: Rule[int | None] = Rule(None, ge=1, le=65535)
"""A TCP port (``metrics_port``; None: none)."""
DASHBOARD_PORT: Rule[int] = Rule(8181, ge=1, le=65535)
"""The port ``prorch dashboard`` listens on."""

RULES: dict[str, Rule[Any]] = {
    "concurrency": CONCURRENCY,
    "batch_size": BATCH_SIZE,
    "group_commit": GROUP_COMMIT,
    "group_window": GROUP_WINDOW,
    "prefetch": PREFETCH,
    "lease_seconds": LEASE_SECONDS,
    "max_crashes": MAX_CRASHES,
    "hook_timeout": HOOK_TIMEOUT,
    "max_abandoned_hooks": MAX_ABANDONED_HOOKS,
    "shutdown_grace": SHUTDOWN_GRACE,
    "step_log_lines": STEP_LOG_LINES,
    "interval": INTERVAL,
    "wake_poll": WAKE_POLL,
    "metrics_port": PORT,
    "dashboard_port": DASHBOARD_PORT,
}
"""Each rule by the name of its setting (and of the ``Orchestrator`` keyword, where there is one)."""
