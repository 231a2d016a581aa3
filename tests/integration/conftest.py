from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from repositories import MemoryBackend, from_url
from tests.support.postgres import PostgresServer, PostgresUnavailable, remove, start_server
from tests.support.seed_repository import seed_backend

BACKENDS = ["memory", "sqlite", "postgresql", "tinydb", "seed", "docs-example"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    """The processes a test started (append them): those still running at its end, stopped
    (SIGSTOP) ones too, are killed and reaped, so a failed test leaves no worker behind."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.communicate(timeout=30)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the run. Locally a missing server skips; in CI it fails."""
    try:
        server = start_server()
    except PostgresUnavailable as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    yield server
    remove(server)


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, to stop and start (the session's serves the other tests)."""
    try:
        server = start_server()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL not available: {exc}")
    yield server
    with contextlib.suppress(subprocess.CalledProcessError):  # a test may leave it stopped
        server.stop("immediate")
    shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return new_database(postgres_server)


def new_database(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on ``postgres_server``."""
    name = f"prorch_test_{next(_databases)}"
    admin = create_engine(
        postgres_server.url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return postgres_server.url.rsplit("/", 1)[0] + f"/{name}"


def make_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if kind == "memory":
        return MemoryBackend()
    if kind == "sqlite":
        return from_url(f"sqlite:///{tmp_path / 'prorch.db'}")
    if kind == "postgresql":
        return from_url(request.getfixturevalue("postgres_url"))
    if kind == "tinydb":
        return from_url(f"tinydb:///{tmp_path / 'prorch.json'}")
    if kind == "seed":
        return seed_backend(str(tmp_path / "seed.json"))
    if kind == "docs-example":  # the repository written in docs/repositories.md
        from docs.examples.sqlite3_repository import Sqlite3Backend

        return Sqlite3Backend(str(tmp_path / "example.db"))
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    made = make_backend(request.param, tmp_path, request)
    yield made
    if hasattr(made, "dispose"):
        made.dispose()
