"""PostgreSQL connections detect a dead network: prorch gives psycopg a connect timeout and TCP
keepalives (and a TCP user timeout) unless the URL says otherwise. Without them a network
partition hung a worker's queries, and its LISTEN connection, until the kernel's TCP timeout
(many minutes). Checked on the driver's connection and on its socket, on the real server the
fixtures start (over TCP on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from repositories import from_url
from repositories.postgresql import CONNECTION_DEFAULTS, PostgreSQLBackend

DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


def parameters(backend: Any) -> dict[str, str]:
    with backend.engine.connect() as connection:
        return dict(connection.connection.driver_connection.info.get_parameters())


def socket_options(driver: Any) -> dict[str, int]:
    """What the kernel holds for the connection's socket."""
    with socket.socket(fileno=os.dup(driver.pgconn.socket)) as sock:
        return {
            "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "keepalives_interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "tcp_user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }


def test_the_defaults_reach_the_driver_and_the_socket(postgres_url: str) -> None:
    assert {key: str(value) for key, value in CONNECTION_DEFAULTS.items()} == DEFAULTS
    backend = from_url(postgres_url)
    assert isinstance(backend, PostgreSQLBackend)
    try:
        found = parameters(backend)
        assert {key: found.get(key) for key in DEFAULTS} == DEFAULTS
        with backend.engine.connect() as connection:
            kernel = socket_options(connection.connection.driver_connection)
        assert kernel == {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                          "tcp_user_timeout": 30000}  # fmt: skip
        backend.wait_for_work(0)  # opens this thread's LISTEN connection, outside the pool
        listening = backend._listeners.of_this_thread(backend.engine, backend).connection
        assert socket_options(listening)["keepalives_idle"] == 30
    finally:
        backend.dispose()


def test_a_url_parameter_overrides_a_default(postgres_url: str) -> None:
    backend = from_url(f"{postgres_url}?keepalives_idle=45&connect_timeout=3&tcp_user_timeout=0")
    try:
        found = parameters(backend)
        expected = {**DEFAULTS, "keepalives_idle": "45", "connect_timeout": "3", "tcp_user_timeout": "0"}
        assert {key: found.get(key) for key in DEFAULTS} == expected
    finally:
        backend.dispose()


def test_pgconnect_timeout_in_the_environment_is_kept(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq reads ``PGCONNECT_TIMEOUT``; a default given to the driver would have hidden it."""
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    backend = from_url(postgres_url)
    try:
        assert parameters(backend).get("connect_timeout") == "7"
    finally:
        backend.dispose()
