"""The dashboard's guards on their own, on a clock the test moves: when a client that gave too
many wrong tokens may try again, and which ``Host`` headers name the dashboard."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")

from prorch.dashboard.security import Guard, Throttle, allowed_hosts, host_of


def test_a_client_may_try_again_once_its_oldest_failure_leaves_the_window() -> None:
    now = [1000.0]
    throttle = Throttle(limit=3, window=60.0, overall=5, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") is None
        throttle.failed("10.0.0.1")
        now[0] += 10
    assert throttle.retry_after("10.0.0.1") == 30  # the first failure, at 1000, leaves at 1060
    assert throttle.retry_after("10.0.0.2") is None  # per client
    now[0] = 1060.0
    assert throttle.retry_after("10.0.0.1") is None
    throttle.failed("10.0.0.2")
    throttle.failed("10.0.0.3")
    throttle.failed("10.0.0.4")  # 5 in the last minute from all clients together (2 of 10.0.0.1's)
    assert throttle.retry_after("10.0.0.9") == 10


def test_a_logged_out_session_stays_out_and_odd_values_are_no_session() -> None:
    guard = Guard("token")
    cookie = guard.new_session()
    assert guard.session_of(cookie) is not None
    guard.end_session(cookie)
    assert guard.session_of(cookie) is None
    assert guard.session_of("caf\xe9.\xe9t\xe9") is None
    assert not guard.csrf_matches("session", "caf\xe9") and not guard.token_matches("t\xf6ken")


@pytest.mark.parametrize(
    ("header", "host"),
    [("LocalHost:8181", "localhost"), ("[::1]:8181", "::1"), ("[::1]", "::1"), ("example.com.", "example.com")],
)
def test_the_host_of_a_host_header(header: str, host: str) -> None:
    assert host_of(header) == host


def test_the_allowed_hosts_are_the_bound_one_the_loopback_names_and_the_configured_ones() -> None:
    assert allowed_hosts("0.0.0.0", ["Dash.Example", "[fe80::1]", "localhost"]) == [
        "0.0.0.0", "localhost", "127.0.0.1", "::1", "dash.example", "fe80::1",
    ]  # fmt: skip
