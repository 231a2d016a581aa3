"""A step's policy: how long it may run, how often it is tried, how long it backs off between
tries and which errors are never retried. The step class's attributes, with the configuration's
per-name overrides on top; no I/O, so it is tested on its own (``tests/unit/test_policy.py``)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from prorch.model.exceptions import StepUsageError
from prorch.model.step import Step

NEVER_RETRIED: tuple[type[BaseException], ...] = (StepUsageError,)
"""Programming errors: a retry would fail the same way."""


def backoff_delay(attempt: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds before retry number ``attempt``: exponential, capped, with jitter (50-100%)."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return float(ceiling * random.uniform(0.5, 1.0))


class StepOverride(BaseModel):
    """Per-step settings that override the class attributes, by step name (configuration's
    ``[steps.NAME]`` tables)."""

    model_config = ConfigDict(extra="forbid")
    timeout: float | None = Field(default=None, gt=0)
    max_attempts: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class StepPolicy:
    """The effective settings of one step class."""

    timeout: float | None = None
    max_attempts: int = 1
    retry_delay: float = 1.0
    retry_max_delay: float = 300.0
    never_retry: tuple[type[BaseException], ...] = ()

    @classmethod
    def of(cls, step: type[Step], override: StepOverride | None = None) -> StepPolicy:
        """The class's attributes, with ``override``'s values where it sets them."""
        timeout = step.timeout
        max_attempts = step.max_attempts
        if override is not None:
            timeout = override.timeout if override.timeout is not None else timeout
            max_attempts = override.max_attempts if override.max_attempts is not None else max_attempts
        return cls(timeout, max_attempts, step.retry_delay, step.retry_max_delay, tuple(step.never_retry))

    def retries(self, error: BaseException, attempt: int, *, at_least: int = 1) -> bool:
        """Whether attempt number ``attempt``, which failed with ``error``, gets another one
        (the step has at least ``at_least`` attempts, whatever its setting)."""
        if isinstance(error, NEVER_RETRIED + self.never_retry):
            return False
        return attempt < max(self.max_attempts, at_least)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the retry that follows attempt number ``attempt``."""
        return backoff_delay(attempt, self.retry_delay, self.retry_max_delay)

    def deadline(self, started: datetime | None) -> datetime | None:
        """When a step that started at ``started`` must have a verdict (None: no timeout)."""
        if self.timeout is None or started is None:
            return None
        return started + timedelta(seconds=self.timeout)


class Policies:
    """The policies of every step class, with one configuration's overrides."""

    def __init__(self, overrides: Mapping[str, StepOverride] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self._made: dict[type[Step], tuple[tuple[object, ...], StepPolicy]] = {}

    def of(self, step: type[Step]) -> StepPolicy:
        """The step class's policy, made once for as long as its attributes stay as they are
        (a transition asks twice; a test may change a class's attributes between passes)."""
        attributes = (
            step.name, step.timeout, step.max_attempts, step.retry_delay, step.retry_max_delay, tuple(step.never_retry)
        )  # fmt: skip
        made = self._made.get(step)
        if made is not None and made[0] == attributes:
            return made[1]
        policy = StepPolicy.of(step, self.overrides.get(step.name or ""))
        self._made[step] = (attributes, policy)
        return policy
