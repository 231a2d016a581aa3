"""Writes ahead of a transition (``emit(now=True)``, live ``progress()``) are stored only while
their worker holds the pipeline's lease (``Backend.while_leased``): a worker frozen past its
lease, whose pipeline another worker claimed, stores nothing when it wakes; and no claim takes
the lease while such a write's transaction is open (a shared row lock on PostgreSQL, the write
lock elsewhere). Real SQLite files, the real PostgreSQL server, real worker processes."""

from __future__ import annotations

import signal
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from prorch import FakeClock, Orchestrator
from prorch.model.exceptions import LeaseLostError
from prorch.model.records import StepRecord, StreamRecord
from prorch.storage.store import store_for
from repositories.sql import SQLBackend
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of
from tests.support.leases import take_lease
from tests.support.processes import PRORCH, child_env, wait_for

SQL = ["sqlite", "postgresql"]


def store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return str(request.getfixturevalue("postgres_url"))


def lines(log: Path, event: str) -> list[list[str]]:
    """The log's lines of ``event`` (``event pid pipeline time``), split."""
    found = log.read_text().splitlines() if log.exists() else []
    return [line.split() for line in found if line.split()[0] == event]


@pytest.mark.slow
@pytest.mark.parametrize("kind", SQL)
def test_a_frozen_worker_whose_pipeline_was_claimed_stores_nothing_when_it_wakes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, processes: list[subprocess.Popen[str]]
) -> None:
    """A real worker's hook blocks; the worker is frozen (SIGSTOP) past its 2 s lease; a second
    worker claims the pipeline and runs the hook, which blocks too. The first is woken
    (SIGCONT) and its hook goes on: its ``emit(now=True)`` is refused and its ``progress()``
    is not stored. Then the second's hook goes on, and its writes are the only ones stored."""
    url = store_url(kind, tmp_path, request)
    (tmp_path / "prorch.toml").write_text(f'repository = "{url}"\napp = ["fault_app"]\n')
    log, gate = tmp_path / "log", tmp_path / "gate"

    def worker(lease: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [PRORCH, "worker", "--interval", "0.2", "--lease-seconds", lease], cwd=tmp_path,
            env=child_env(FAULT_LOG=str(log), FREEZE_GATE=str(gate)), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        processes.append(process)
        return process

    started = subprocess.run(
        [PRORCH, "start", "Freezing"], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    uuid = started.stdout.strip()
    frozen = worker("2")
    wait_for(lambda: len(lines(log, "asleep")) == 1, 30, "the first worker's hook to block")
    frozen.send_signal(signal.SIGSTOP)
    rescuer = worker("30")  # claims the pipeline once the frozen worker's lease has run out
    wait_for(lambda: len(lines(log, "asleep")) == 2, 60, "the second worker to claim the pipeline")
    assert lines(log, "asleep")[1][1] == str(rescuer.pid)
    orchestrator = Orchestrator(url)
    assert orchestrator.get(uuid).pipeline.lease_owner not in (None, "")
    frozen.send_signal(signal.SIGCONT)
    Path(f"{gate}.{frozen.pid}").touch()
    wait_for(lambda: bool(lines(log, "awake")), 30, "the woken worker's hook to write")
    assert [line[:2] for line in lines(log, "awake")] == [["awake", str(frozen.pid)]]
    assert [line[:2] for line in lines(log, "emit-refused:LeaseLostError")] == [
        ["emit-refused:LeaseLostError", str(frozen.pid)]
    ]
    assert lines(log, "emit-stored") == []
    assert list(orchestrator.stream(uuid, follow=False)) == []  # nothing of the woken worker's
    assert orchestrator.get(uuid).steps[0].progress is None
    Path(f"{gate}.{rescuer.pid}").touch()
    wait_for(lambda: orchestrator.get(uuid).pipeline.status.value == "finished", 60, "the pipeline to finish")
    assert [(e.seq, e.value) for e in orchestrator.stream(uuid)] == [(1, {"pid": rescuer.pid})]
    assert orchestrator.get(uuid).steps[0].progress["note"] == str(rescuer.pid)


@pytest.mark.parametrize("kind", SQL)
@pytest.mark.parametrize("write", ["emit", "progress"])
def test_no_claim_takes_the_lease_while_a_leased_write_is_open(
    kind: str, write: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A worker's lease ran out, and it writes ahead of its transition just as a second store
    (its own connections: another worker) claims the pipeline. The claim waits until the write
    has committed, so the write was stored while the lease was still the writer's: without
    the row lock, the claim took the lease and the stale write was stored after it."""
    backend = make_backend(kind, tmp_path, request)
    other = SQLBackend(backend.url, migrate=False)
    try:
        store, rival = store_for(backend), store_for(other)
        uuid = pipeline_of(step_of("Once", lambda s: s.finish()), name="Job").create(backend, {}).uuid
        step = store.steps_of(uuid)[0]
        now = datetime.now(timezone.utc)
        claimed = store.claim_one(uuid, now, "frozen#1", now - timedelta(seconds=1))  # its lease ran out
        assert claimed is not None and claimed.lease_owner == "frozen#1"
        taken: list[Any] = []
        claim = threading.Thread(
            target=lambda: taken.append(rival.claim_one(uuid, now, "rescuer#1", now + timedelta(seconds=60)))
        )
        open_while: list[bool] = []

        def racing(real: Any) -> Any:
            def write_after_a_claim(*args: Any) -> Any:
                claim.start()
                claim.join(0.5)  # the claim, racing the write's transaction
                open_while.append(bool(taken and taken[0] is not None))
                return real(*args)

            return write_after_a_claim

        if write == "emit":
            entry = StreamRecord(uuid=f"{uuid}:1", pipeline_uuid=uuid, seq=1, at=now, value="stale?")
            backend.insert = racing(backend.insert)
            store.append_stream(entry, "frozen#1")
        else:
            table = backend.table(StepRecord.MODEL)
            table.update = racing(table.update)
            assert backend.write_progress(uuid, step.uuid, "frozen#1", {"done": 1})
        claim.join(60)
        assert open_while == [False]  # the lease did not pass while the write's transaction was open
        assert taken and taken[0] is not None and taken[0].lease_owner == "rescuer#1"  # then it did
        stored = store.last_stream_seq(uuid) if write == "emit" else store.steps_of(uuid)[0].progress
        assert stored in (1, {"done": 1})  # stored before the claim
        with pytest.raises(LeaseLostError), backend.while_leased(uuid, "frozen#1"):
            pytest.fail("a lost lease's block ran")
    finally:
        other.dispose()


@pytest.mark.parametrize("kind", ["memory", "tinydb", "sqlite", "postgresql"])
def test_emit_now_after_another_worker_took_the_lease_raises_and_stores_nothing(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Any
) -> None:
    backend = make_backend(kind, tmp_path, request)
    store = store_for(backend)
    refused: list[str] = []

    def stolen(self: Any) -> None:
        take_lease(store, self.pipeline_uuid)
        try:
            self.emit("too late", now=True)
        except LeaseLostError as exc:
            refused.append(str(exc))
        self.finish()

    uuid = pipeline_of(step_of("Stolen", stolen), name="Job").create(backend, {}).uuid
    Orchestrator(backend, registry=registry, clock=FakeClock()).execute_pipelines()
    assert refused and "lease is lost" in refused[0]
    assert store.stream_entries(uuid) == []
