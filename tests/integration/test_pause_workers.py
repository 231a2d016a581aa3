"""Pause across worker processes (issue #29 item 3): real ``prorch worker`` processes, idle and
polling every 30 s, claim nothing of a paused class (the creates wake them: they look); a resume
from another process wakes them (a NOTIFY on PostgreSQL, the file's change on SQLite), so the
paused work starts within seconds, not at the next poll."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from prorch import Orchestrator
from repositories import from_url
from tests.integration import wake_app
from tests.integration.test_wakeups import PICKUP, idle, stamped, worker_process

pytestmark = pytest.mark.slow


def paused_then_resumed(url: str, log: Path, workers: int) -> None:
    """Each worker writes its stamps and its log to ``log/N``."""
    operator = Orchestrator(url)
    folders = [log / str(n) for n in range(workers)]
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(worker_process(url, folder)) for folder in folders]
        idle(url)
        operator.pause(name="WakeStamp", actor="test", reason="hold")
        held = [wake_app.Stamp.create(url, {}).uuid for _ in range(3)]
        time.sleep(3.0)  # the creates woke the workers: they looked, and claimed nothing
        assert not any(stamped(folder, uuid, "start") for folder in folders for uuid in held)
        assert operator.query(state="paused", count=True).total == 3
        started = time.time()
        operator.resume(name="WakeStamp")
        for uuid in held:
            assert first_pickup(folders, uuid, started) < PICKUP
        assert all(proc.poll() is None for proc in procs), "a worker died"


def first_pickup(folders: list[Path], uuid: str, since: float) -> float:
    """Seconds from ``since`` to the first worker's start of ``uuid`` (fails past ``PICKUP`` x 2)."""
    deadline = time.time() + PICKUP * 2
    while time.time() < deadline:
        found = [moment for folder in folders if (moment := stamped(folder, uuid, "start")) is not None]
        if found:
            return min(found) - since
        time.sleep(0.05)
    logs = "\n".join((folder / "worker.log").read_text()[-1500:] for folder in folders)
    raise AssertionError(f"{uuid} was not picked up within {PICKUP * 2}s of the resume:\n{logs}")


def test_two_postgresql_workers_claim_nothing_paused_and_wake_on_resume(postgres_url: str, tmp_path: Path) -> None:
    for n in range(2):
        (tmp_path / str(n)).mkdir()
    paused_then_resumed(postgres_url, tmp_path, workers=2)


def test_a_sqlite_worker_claims_nothing_paused_and_wakes_on_resume(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pause.db'}"
    from_url(url)  # the schema, before the worker and this process race to create it
    (tmp_path / "0").mkdir()
    paused_then_resumed(url, tmp_path, workers=1)
