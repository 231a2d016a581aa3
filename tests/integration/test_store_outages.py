"""A worker and an unreachable PostgreSQL, with real worker processes and the real server
(issue #25): a server down when the worker starts, a server stopped under a running worker, and
the worker's connections killed mid-transaction."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from prorch import Orchestrator, Status
from repositories import from_url
from tests.support import processes
from tests.support.postgres import PostgresServer, free_port
from tests.support.processes import FAULTS, PRORCH, child_env, wait_for

fault_app = processes.fault_app()


def env(**more: str) -> dict[str, str]:
    return child_env(**more)


def kill_backends(server: PostgresServer, database: str) -> int:
    """``pg_terminate_backend`` on every connection to ``database``: how many were killed."""
    with psycopg.connect(server.url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return sum(1 for (killed,) in rows if killed)


@pytest.mark.slow
def test_killed_connections_leave_the_next_writes_clean(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Regression: after pg_terminate_backend killed a worker's connection inside a transaction,
    the next write on it failed with SQLAlchemy's ``InvalidRequestError: This connection has
    already initialized a SQLAlchemy Transaction()``, logged as "advance failed" with a
    traceback. A broken connection is now rolled back or discarded, and the error is a store
    error."""
    uuids = [fault_app.Slow.create(postgres_url, {"seconds": 0.05}).uuid for _ in range(150)]
    from_url(postgres_url).dispose()  # type: ignore[attr-defined]
    stderr = tmp_path / "worker.err"
    options = {"concurrency": 4, "lease_seconds": 2, "batch_size": 8, "group_commit": 4, "interval": 0.05}
    with stderr.open("wb") as sink:
        worker = subprocess.Popen(
            [sys.executable, str(FAULTS / "worker.py"), postgres_url, json.dumps(options)],
            env=env(FAULT_LOG=str(tmp_path / "hooks.log")), stdout=subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    processes.append(worker)
    hooks = tmp_path / "hooks.log"  # kill mid-run, not while the worker opens the store (a store error then)
    wait_for(lambda: hooks.exists() and hooks.stat().st_size > 0, 60, "the worker's first hook")
    database = postgres_url.rsplit("/", 1)[1]
    killed = 0
    started = time.monotonic()
    while time.monotonic() - started < 8 and worker.poll() is None:  # kill its connections, again and again
        time.sleep(0.3)
        killed += kill_backends(postgres_server, database)
    orchestrator = Orchestrator(postgres_url)
    wait_for(lambda: not orchestrator.list_pipelines(status="pending"), 120, "every pipeline to end")
    log = stderr.read_text()
    assert worker.poll() is None, log
    assert killed >= 10, killed
    for uuid in uuids:
        assert orchestrator.get(uuid).pipeline.status == Status.FINISHED, (uuid, log[-3000:])
    assert "InvalidRequestError" not in log and "already initialized" not in log, log[-3000:]
    assert "advance failed" not in log and "Traceback" not in log, log[-3000:]
    # what the killed connections cost is said as what it is: a store error (of a pipeline, a
    # pass, the lease keeper, the heartbeat or the idle wait's LISTEN), whichever of the
    # worker's connections was hit
    reports = (
        "store error", "store unreachable", "could not renew the lease", "heartbeat not stored",
        "lost the connection that listens for new work",
    )  # fmt: skip
    hit = [line for line in log.splitlines() if "terminating connection" in line]
    assert all(any(report in line for report in reports) for line in hit), hit
    assert "UnstorableResultError" not in log, log[-3000:]  # and is not charged to a step as a failed attempt


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None  # not listening (yet, or any more)


@pytest.mark.slow
def test_a_worker_started_while_postgresql_is_down_waits_for_it(
    own_server: PostgresServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Regression: ``prorch worker`` against a stopped server exited 1. It now tries again with
    backoff, logging each try, /healthz 503 meanwhile, and works once the server is up."""
    own_server.stop()
    port = free_port()
    stderr = tmp_path / "worker.err"
    with stderr.open("wb") as sink:
        worker = subprocess.Popen(
            [PRORCH, "--app", "fault_app", "-r", own_server.url, "worker", "--interval", "0.1",
             "--metrics-port", str(port)],
            env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    processes.append(worker)
    wait_for(lambda: health(port) is not None or worker.poll() is not None, 30, "the health endpoint")
    time.sleep(3)
    assert worker.poll() is None, stderr.read_text()
    assert health(port) == 503
    tries = stderr.read_text().count("unreachable")
    assert tries >= 3, stderr.read_text()  # each try is logged, with backoff: not one per 0.1 s
    assert tries < 30, stderr.read_text()
    own_server.start()
    uuid = fault_app.Slow.create(own_server.url, {"seconds": 0.1}).uuid
    orchestrator = Orchestrator(own_server.url)
    wait_for(lambda: orchestrator.get(uuid).pipeline.status == Status.FINISHED, 60, "the pipeline to finish")
    wait_for(lambda: health(port) == 200, 10, "/healthz 200")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, stderr.read_text()


@pytest.mark.slow
def test_a_worker_whose_database_is_down_backs_off_and_logs_a_few_lines(
    own_server: PostgresServer, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Regression: every pass logged an ERROR while the store was down (586 lines in 30 s at
    interval 0.05), each saying "retrying in 0.1s". It now backs off (exponential, capped),
    logs once when the store goes away, once when it is back, and the delays it states."""
    uuid = fault_app.Slow.create(own_server.url, {"seconds": 0.1}).uuid
    from_url(own_server.url).dispose()  # type: ignore[attr-defined]
    stderr = tmp_path / "worker.err"
    with stderr.open("wb") as sink:
        worker = subprocess.Popen(
            [sys.executable, str(FAULTS / "worker.py"), own_server.url, json.dumps({"interval": 0.05})],
            env=env(WORKER_LOG_LEVELS="1"), stdout=subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    processes.append(worker)
    orchestrator = Orchestrator(own_server.url)
    wait_for(lambda: orchestrator.get(uuid).pipeline.status == Status.FINISHED, 60, "the first pipeline")
    orchestrator.store.backend.dispose()  # type: ignore[attr-defined]
    own_server.stop()
    time.sleep(20)
    down = stderr.read_text().splitlines()
    errors = [line for line in down if line.startswith("ERROR")]
    assert worker.poll() is None, down[-20:]
    assert 1 <= len(errors) <= 3, errors  # going away (and a pipeline or two caught mid-write)
    assert "store unreachable" in "\n".join(errors) and "next try in 0.05s" in "\n".join(errors), errors
    own_server.start()
    second = fault_app.Slow.create(own_server.url, {"seconds": 0.1}).uuid
    wait_for(lambda: orchestrator.get(second).pipeline.status == Status.FINISHED, 60, "a pipeline after")
    back = stderr.read_text()
    assert back.count("store reachable again") == 1, back[-3000:]


def test_a_connection_lost_while_the_schema_is_read_is_not_an_empty_store(postgres_server: PostgresServer) -> None:
    """Regression: a connection killed while a starting worker read the schema's revision was
    taken for an empty store; the worker went on to upgrade on the dead connection and died of
    SQLAlchemy's PendingRollbackError (seen under backend kills), instead of a store error."""
    import sqlalchemy
    from sqlalchemy.exc import DBAPIError

    from repositories.migrate import stored_revision

    engine = sqlalchemy.create_engine(postgres_server.url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            pid = connection.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
            connection.commit()
            with psycopg.connect(postgres_server.url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(DBAPIError) as lost:
                stored_revision(connection)
        assert lost.value.connection_invalidated
    finally:
        engine.dispose()
