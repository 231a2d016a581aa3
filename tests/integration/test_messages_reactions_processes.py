"""Messages and reactions with real worker processes: a message wakes a waiting pipeline at
once and is consumed once with 3 workers; a reaction fires once per event although the worker
running it is SIGKILLed."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prorch import Orchestrator, Status
from repositories import from_url

CHAOS = Path(__file__).parent / "chaos"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inbox_app() -> object:
    sys.path.insert(0, str(CHAOS))
    try:
        import inbox_app

        return inbox_app
    finally:
        sys.path.remove(str(CHAOS))


def worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHAOS), str(ROOT)]), "INBOX_LOG": str(log),
           "CHAOS_LOG": str(log) + ".hooks"}  # fmt: skip
    return subprocess.Popen([sys.executable, str(CHAOS / "worker.py"), url], env=env, stderr=subprocess.DEVNULL)


def wait_for(condition: object, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_messages_wake_waiting_pipelines_and_are_consumed_once_with_three_workers(
    inbox_app: object, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'inbox.db'}"
    log = tmp_path / "inbox.log"
    backend = from_url(url)
    uuids = [inbox_app.Inbox.create(backend).uuid for _ in range(30)]  # type: ignore[attr-defined]
    orchestrator = Orchestrator(backend)
    procs = [worker(url, log) for _ in range(3)]
    try:
        wait_for(
            lambda: all(orchestrator.get(u).pipeline.next_run_at > orchestrator.clock.now() for u in uuids),  # type: ignore[operator]
            60,
            "every pipeline to be waiting an hour",
        )
        waits = {uuid: orchestrator.get(uuid).pipeline.next_run_at for uuid in uuids}
        for n, uuid in enumerate(uuids):
            orchestrator.send(uuid, "go", n)
        wait_for(lambda: not orchestrator.list_pipelines(status="pending"), 60, "every pipeline to read its message")
    finally:
        stop(procs)
    lines = [line.split() for line in log.read_text().splitlines() if line.startswith("R ")]
    per_pipeline = collections.Counter(parts[1] for parts in lines)
    assert per_pipeline == {uuid: 1 for uuid in uuids}  # each message consumed exactly once
    for n, uuid in enumerate(uuids):
        state = orchestrator.get(uuid)
        assert state.pipeline.status == Status.FINISHED and state.steps[0].output == {"payload": n}
        finished = state.steps[0].finished_at
        assert finished is not None and finished < waits[uuid]  # type: ignore[operator]  # woken, not after the hour
        assert [m.consumed_at is not None for m in orchestrator.store.messages_of(uuid)] == [True]
    assert len({parts[3] for parts in lines}) >= 2  # the work really was spread over the workers


def test_a_reaction_fires_once_per_event_when_its_worker_is_sigkilled(inbox_app: object, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'react.db'}"
    log = tmp_path / "react.log"
    blocker = Path(str(log) + ".block")
    blocker.touch()
    backend = from_url(url)
    sources = [inbox_app.Source.create(backend, {"n": n}).uuid for n in range(5)]  # type: ignore[attr-defined]
    orchestrator = Orchestrator(backend)
    first = worker(url, log)
    procs = [first]
    try:
        wait_for(lambda: Path(str(log) + ".blocked").exists(), 60, "a reaction to be running")
        first.send_signal(signal.SIGKILL)  # between the event and the end of its reaction
        first.wait()
        blocker.unlink()
        procs = [worker(url, log), worker(url, log)]
        wait_for(
            lambda: (
                len(orchestrator.list_pipelines(name="Target", status="finished")) == 5
                and not orchestrator.list_pipelines(name="prorch.Reaction", status="pending")
            ),
            90,
            "every reaction to have started its pipeline",
        )
    finally:
        stop(procs)
    targets = orchestrator.list_pipelines(name="Target")
    assert sorted(t.params["source"] for t in targets) == sorted(sources)  # once per event
    tasks = orchestrator.list_pipelines(name="prorch.Reaction")
    assert len(tasks) == 5 and all(t.status == Status.FINISHED for t in tasks)
    reaction_runs = [line for line in log.read_text().splitlines() if line.startswith("X ")]
    assert len(reaction_runs) >= 6  # the killed one ran again
