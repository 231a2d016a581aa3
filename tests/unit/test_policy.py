"""The step policy on its own: class attributes, configuration overrides, retries and backoff."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from prorch import OnStartMixin, Step
from prorch.config import StepOverride
from prorch.engine.policy import Policies, StepPolicy, backoff_delay
from prorch.model.exceptions import StepUsageError


class Flaky(OnStartMixin, Step):
    name = "Flaky"
    timeout = 30.0
    max_attempts = 3
    retry_delay = 2.0
    retry_max_delay = 10.0
    never_retry = (PermissionError,)

    def on_start(self) -> None:
        pass


def test_the_class_attributes_are_the_policy() -> None:
    policy = StepPolicy.of(Flaky)
    assert policy == StepPolicy(30.0, 3, 2.0, 10.0, (PermissionError,))


def test_an_override_wins_where_it_sets_a_value() -> None:
    policies = Policies({"Flaky": StepOverride(max_attempts=7), "Other": StepOverride(timeout=1)})
    policy = policies.of(Flaky)
    assert (policy.timeout, policy.max_attempts) == (30.0, 7)
    assert Policies({"Flaky": StepOverride(timeout=5)}).of(Flaky).timeout == 5


def test_a_policy_follows_its_class_attributes_when_they_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """#28 item 5: ``Policies.of`` keeps a class's policy (a transition asks twice) only while the
    class's attributes are the ones it was made from."""
    policies = Policies({"Other": StepOverride(max_attempts=9)})
    assert policies.of(Flaky) is policies.of(Flaky)
    assert policies.of(Flaky) == StepPolicy.of(Flaky)
    for name, value in [("timeout", 5.0), ("max_attempts", 4), ("retry_delay", 1.0), ("retry_max_delay", 3.0)]:
        monkeypatch.setattr(Flaky, name, value)
        assert getattr(policies.of(Flaky), name) == value
    monkeypatch.setattr(Flaky, "never_retry", [KeyError])
    assert policies.of(Flaky).never_retry == (KeyError,)
    Flaky.never_retry.append(ValueError)  # type: ignore[attr-defined]
    assert policies.of(Flaky).never_retry == (KeyError, ValueError)
    monkeypatch.setattr(Flaky, "name", "Other")
    assert policies.of(Flaky).max_attempts == 9
    assert policies.of(Flaky) == StepPolicy.of(Flaky, StepOverride(max_attempts=9))


@pytest.mark.parametrize(
    ("error", "attempt", "at_least", "expected"),
    [
        (RuntimeError("x"), 1, 1, True),
        (RuntimeError("x"), 2, 1, True),
        (RuntimeError("x"), 3, 1, False),  # the third of 3 attempts was the last
        (RuntimeError("x"), 3, 10, True),  # a store failure gets at least 10
        (PermissionError("x"), 1, 1, False),  # the step's never_retry
        (StepUsageError("x"), 1, 10, False),  # a programming error, never retried
    ],
)
def test_retries(error: BaseException, attempt: int, at_least: int, expected: bool) -> None:
    assert StepPolicy.of(Flaky).retries(error, attempt, at_least=at_least) is expected


def test_the_backoff_grows_and_is_capped_with_jitter() -> None:
    policy = StepPolicy.of(Flaky)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
    assert backoff_delay(1, base=1.0, cap=300.0) <= 1.0


def test_the_deadline_is_the_timeout_after_the_start() -> None:
    started = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert StepPolicy.of(Flaky).deadline(started) == started + timedelta(seconds=30)
    assert StepPolicy.of(Flaky).deadline(None) is None
    assert StepPolicy().deadline(started) is None  # no timeout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, r"Orchestrator\(concurrency=0\): concurrency must be an int >= 1"),
        ({"batch_size": -1}, r"Orchestrator\(batch_size=-1\): batch_size must be an int >= 1"),
        ({"group_commit": 0}, r"Orchestrator\(group_commit=0\): group_commit must be an int >= 1 \(1: one commit"),
        ({"lease_seconds": 0}, r"Orchestrator\(lease_seconds=0\): lease_seconds must be a number of seconds > 0"),
        ({"hook_timeout": 0}, r"hook_timeout must be None or a number of seconds > 0"),
        ({"shutdown_grace": -1}, r"shutdown_grace must be a number of seconds >= 0"),
        ({"lease_seconds": float("inf")}, r"lease_seconds must be a number of seconds > 0 \(finite, at most 31536000"),
    ],
)
def test_bad_orchestrator_arguments_are_a_configuration_error(options: dict[str, Any], message: str) -> None:
    from prorch import ConfigurationError, Orchestrator
    from repositories.memory import MemoryBackend

    with pytest.raises(ConfigurationError, match=message):
        Orchestrator(MemoryBackend(), **options)
