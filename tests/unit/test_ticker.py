"""The thread loop of the heartbeat and the lease keeper (prorch.storage.ticker)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from prorch.storage.ticker import Ticker


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.01)


def test_a_failing_tick_is_handed_to_on_error_and_the_loop_goes_on() -> None:
    calls: list[int] = []
    errors: list[str] = []

    def tick() -> None:
        calls.append(1)
        raise RuntimeError(f"turn {len(calls)}")

    ticker = Ticker("test-ticker", 0.01, tick, on_error=lambda exc: errors.append(str(exc)))
    ticker.start()
    wait_until(lambda: len(errors) >= 3)
    assert not ticker.ended
    ticker.stop()
    assert ticker.ended
    assert errors[:3] == ["turn 1", "turn 2", "turn 3"]
    count = len(calls)
    time.sleep(0.05)
    assert len(calls) == count  # stopped: no turn after stop() returned


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_without_on_error_a_failing_tick_ends_the_thread() -> None:
    """The heartbeat's health tells a thread that ended: the ticker must not hide it."""

    def tick() -> None:
        raise RuntimeError("boom")

    ticker = Ticker("test-ticker", 0.01, tick)
    assert not ticker.ended  # not started
    ticker.start()
    wait_until(lambda: ticker.ended)
    assert ticker.ended
    ticker.stop()
