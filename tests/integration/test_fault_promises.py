"""The durability promise under operator faults, with real worker processes: SIGKILL during
deploys, a hook that kills its worker, hooks that never return, SIGTERM with a hung hook, a hook
that raises KeyboardInterrupt, message bursts, and a worker whose clock is wrong."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator, Status
from repositories import from_url
from tests.support import processes
from tests.support.processes import FAULTS, PRORCH, child_env, wait_for

fault_app = processes.fault_app()


def env(log: Path, **more: str) -> dict[str, str]:
    return child_env(FAULT_LOG=str(log), **more)


def start_worker(url: str, log: Path, options: dict[str, Any], **more: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(FAULTS / "worker.py"), url, json.dumps(options)],
        env=env(log, **more), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def events(log: Path) -> list[tuple[str, int, str, float]]:
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        kind, pid, uuid, at = line.split()
        rows.append((kind, int(pid), uuid, float(at)))
    return rows


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'faults.db'}"


# --- 1. only the pipeline whose hook was running is charged ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 4])
def test_sigkill_during_hooks_charges_only_the_running_pipelines(
    sqlite_url: str, tmp_path: Path, concurrency: int, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Regression: every pipeline of a killed worker's batch was charged, so a deploy that
    SIGKILLed a worker 3 times quarantined all 10 pipelines, though only those whose hooks
    were running could have been the cause."""
    log = tmp_path / "hooks.log"
    uuids = [fault_app.Slow.create(sqlite_url, {"seconds": 3}).uuid for _ in range(10)]
    options = {"concurrency": concurrency, "lease_seconds": 2, "batch_size": 10, "max_crashes": 3}
    orchestrator = Orchestrator(from_url(sqlite_url))
    running_at_kill: list[set[str]] = []
    for _ in range(5):  # a deploy SIGKILLs the worker while its first hooks run
        worker = start_worker(sqlite_url, log, options)
        processes.append(worker)
        wait_for(
            lambda pid=worker.pid: (
                any(e[1] == pid for e in events(log)) or not orchestrator.list_pipelines(status="pending")
            ),
            30,
            "a hook to start",
        )
        time.sleep(0.5)  # every hook this worker started is 0-0.5 s into its 3 s
        rows = [e for e in events(log) if e[1] == worker.pid]
        running = {e[2] for e in rows if e[0] == "start"} - {e[2] for e in rows if e[0] == "end"}
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        running_at_kill.append(running)
        time.sleep(2.2)  # its leases run out
    # the worker that ends them runs them side by side: its concurrency charges no one (no kill)
    processes.append(start_worker(sqlite_url, log, {**options, "concurrency": 10}))
    wait_for(lambda: not orchestrator.list_pipelines(status="pending"), 120, "every pipeline to end")

    charged = collections.Counter(uuid for running in running_at_kill for uuid in running)
    for uuid in uuids:
        state = orchestrator.get(uuid)
        if charged[uuid] >= 3:  # its hook was running at 3 deaths in a row: quarantined, rightly
            assert state.pipeline.status == Status.FAILED, (uuid, charged[uuid])
            assert state.pipeline.last_error is not None and state.pipeline.last_error.type == "WorkerCrashed"
        else:  # innocent, or charged fewer times than the limit: it simply finished
            assert state.pipeline.status == Status.FINISHED, (uuid, charged[uuid], state.pipeline.last_error)
            assert state.pipeline.crashes == 0
    assert 0 < len(charged) < 10 and all(running_at_kill)


@pytest.mark.slow
@pytest.mark.parametrize("group_commit", [1, 32])
def test_a_hook_that_kills_its_worker_is_quarantined_and_nothing_else_is(
    sqlite_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]], group_commit: int
) -> None:
    """With group commit, the first death comes in a round, where it cannot be pinned on one
    pipeline and charges none; the culprit then runs alone and is charged for each death."""
    log = tmp_path / "hooks.log"
    culprit = fault_app.Culprit.create(sqlite_url).uuid
    others = [fault_app.Slow.create(sqlite_url, {"seconds": 0.1}).uuid for _ in range(3)]
    orchestrator = Orchestrator(from_url(sqlite_url))
    options = {"concurrency": 1, "lease_seconds": 1, "max_crashes": 3, "group_commit": group_commit}
    expected_deaths = 3 if group_commit == 1 else 4
    deadline = time.monotonic() + 180  # a loaded machine starts a worker in seconds, not ms
    deaths = 0
    while orchestrator.list_pipelines(status="pending"):  # a supervisor restarting the worker
        assert time.monotonic() < deadline, "the culprit was never quarantined"
        worker = start_worker(sqlite_url, log, options)
        processes.append(worker)
        try:
            deaths += worker.wait(timeout=10) != 0  # (a worker still alive then has no culprit to run)
        except subprocess.TimeoutExpired:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
    state = orchestrator.get(culprit)
    assert state.pipeline.status == Status.FAILED
    assert state.pipeline.last_error is not None
    assert "died 3 times in a row while a hook of this pipeline was running" in state.pipeline.last_error.message
    assert [e[0] for e in events(log) if e[2] == culprit] == ["start"] * expected_deaths
    assert deaths == expected_deaths
    for uuid in others:
        assert orchestrator.get(uuid).pipeline.status == Status.FINISHED
        assert orchestrator.get(uuid).pipeline.crashes == 0


# --- 3. hooks that never return ----------------------------------------------------------------------


@pytest.mark.slow
def test_prorch_run_returns_with_a_hung_hook(sqlite_url: str, tmp_path: Path) -> None:
    """Regression: the step never timed out, the pass never reached the other pipelines, and
    `prorch run` never exited (cron piled up runs)."""
    log = tmp_path / "hooks.log"
    hung = fault_app.Hung.create(sqlite_url).uuid
    quick = [fault_app.Slow.create(sqlite_url, {"seconds": 0.05}).uuid for _ in range(3)]
    started = time.monotonic()
    result = subprocess.run(
        [PRORCH, "-r", sqlite_url, "--app", "fault_app", "run", "--concurrency", "1"],
        env=env(log), capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.returncode == 1 and "abandoned" in result.stderr, result.stderr
    orchestrator = Orchestrator(from_url(sqlite_url))
    step = orchestrator.get(hung).steps[0]
    assert step.status == Status.FAILED and step.error is not None and step.error.type == "HookTimeoutError"
    assert [e[0] for e in events(log) if e[2] == hung] == ["start", "timeout"]
    assert all(orchestrator.get(u).pipeline.status == Status.FINISHED for u in quick)


@pytest.mark.slow
def test_another_worker_records_the_timeout_of_a_vanished_one(
    sqlite_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "hooks.log"
    hung = fault_app.Hung.create(sqlite_url).uuid  # timeout = 2
    options = {"lease_seconds": 2}
    first = start_worker(sqlite_url, log, options)
    processes.append(first)
    wait_for(lambda: any(e[2] == hung for e in events(log)), 30, "the hook to start")
    started = next(e[3] for e in events(log) if e[2] == hung)
    first.send_signal(signal.SIGSTOP)  # wedged: it can neither record the timeout nor renew
    second = start_worker(sqlite_url, log, options)
    processes.append(second)
    orchestrator = Orchestrator(from_url(sqlite_url))
    wait_for(lambda: orchestrator.get(hung).pipeline.status == Status.FAILED, 30, "the timeout to be recorded")
    recorded = next(e.at for e in orchestrator.history(hung) if e.type.value == "step.failed")
    assert recorded.timestamp() - started <= 2 + 2 + 1.5  # timeout + lease_seconds, and a pass
    timeouts = [e for e in events(log) if e[0] == "timeout"]
    assert [e[1] for e in timeouts] == [second.pid]
    first.send_signal(signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_with_a_hung_hook_exits_within_the_grace_period(
    sqlite_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Regression: one SIGTERM did nothing while a hook hung."""
    log = tmp_path / "hooks.log"
    fault_app.HungNoLimit.create(sqlite_url)
    worker = start_worker(sqlite_url, log, {"shutdown_grace": 2})
    processes.append(worker)
    wait_for(lambda: bool(events(log)), 30, "the hook to start")
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(timeout=20)
    assert code != 0 and 1.5 < time.monotonic() - signalled < 10
    assert worker.stderr is not None and b"hooks still running 2s after the stop signal" in worker.stderr.read()


@pytest.mark.slow
def test_a_worker_with_too_many_abandoned_hooks_exits(
    sqlite_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "hooks.log"
    uuids = [fault_app.HungNoLimit.create(sqlite_url).uuid for _ in range(2)]
    worker = start_worker(sqlite_url, log, {"hook_timeout": 0.5, "max_abandoned_hooks": 1, "concurrency": 2})
    processes.append(worker)
    code = worker.wait(timeout=30)
    assert code != 0
    assert worker.stderr is not None and b"hung hook threads are still running (limit 1)" in worker.stderr.read()
    orchestrator = Orchestrator(from_url(sqlite_url))
    for uuid in uuids:
        step = orchestrator.get(uuid).steps[0]
        assert step.status == Status.FAILED and step.error is not None and step.error.type == "HookTimeoutError"


# --- 5. KeyboardInterrupt ------------------------------------------------------------------------------


@pytest.mark.slow
def test_keyboard_interrupt_in_a_hook_stops_the_worker_cleanly(
    sqlite_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Regression: the worker died (exit 3 / "Aborted!"), logged nothing and left its batch leased."""
    log = tmp_path / "hooks.log"
    uuid = fault_app.Interrupts.create(sqlite_url).uuid
    worker = start_worker(sqlite_url, log, {})
    processes.append(worker)
    assert worker.wait(timeout=30) == 0
    assert worker.stderr is not None and b"raised KeyboardInterrupt; stopping the worker" in worker.stderr.read()
    record = Orchestrator(from_url(sqlite_url)).get(uuid).pipeline
    assert record.status == Status.PENDING and record.lease_owner is None
    assert record.crashes == 0 and record.hook_started_at is None


# --- 4. message bursts -----------------------------------------------------------------------------------


BURST_EACH = 400
"""Messages each of the three senders sends, at up to 300 a second, while the mailboxes run."""


def burst(url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    log = tmp_path / "hooks.log"
    uuids = [fault_app.Mailbox.create(url).uuid for _ in range(50)]
    orchestrator = Orchestrator(from_url(url))
    workers = [start_worker(url, log, {"concurrency": 2, "lease_seconds": 10}) for _ in range(2)]
    procs.extend(workers)
    wait_for(lambda: all(orchestrator.get(u).steps[0].started_at for u in uuids), 60, "every pipeline to start")
    senders = [
        subprocess.Popen(
            [sys.executable, str(FAULTS / "sender.py"), url, f"s{index}", "300", str(BURST_EACH), *uuids],
            env=env(log),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for index in range(3)
    ]
    sent = 0
    for sender in senders:
        out, err = sender.communicate(timeout=300)
        assert sender.returncode == 0, err
        sent += int(out)
    assert sent == 3 * BURST_EACH  # every sender sent its whole burst (however long that took)
    for uuid in uuids:
        orchestrator.send(uuid, "stop", True)  # receive() returns the payload: None would read as "no message"
    wait_for(lambda: not orchestrator.list_pipelines(status="pending"), 120, "every mailbox to finish")
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    logs = b"".join(w.stderr.read() for w in workers if w.stderr is not None).decode()
    assert "write refused" not in logs and "ConcurrentUpdateError" not in logs, logs[-2000:]

    ticks = [e[0] for e in events(log) if e[0].startswith("tick:")]
    assert len(ticks) == len(set(ticks)) == sent  # every message taken once, by a hook that was kept
    total = 0
    for uuid in uuids:
        state = orchestrator.get(uuid)
        assert state.pipeline.status == Status.FINISHED and state.pipeline.crashes == 0
        total += state.steps[0].output["count"]
        received = [e for e in orchestrator.history(uuid) if e.type.value == "message.received"]
        assert len(received) == len({e.data["message"] for e in received})
        assert all(m.consumed_at is not None for m in orchestrator.store.messages_of(uuid))
    assert total == sent


@pytest.mark.slow
def test_message_bursts_cost_no_transition_on_sqlite(
    sqlite_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    burst(sqlite_url, tmp_path, processes)


@pytest.mark.slow
def test_message_bursts_cost_no_transition_on_postgresql(
    postgres_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    burst(postgres_url, tmp_path, processes)


# --- 7. clocks ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_whose_clock_runs_ahead_never_takes_a_leased_pipeline(
    postgres_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Regression: a worker whose clock ran more than lease_seconds ahead saw every lease as
    expired and ran hooks that another worker was running."""
    log = tmp_path / "hooks.log"
    uuids = [fault_app.Slow.create(postgres_url, {"seconds": 1.5}).uuid for _ in range(8)]
    options = {"concurrency": 2, "lease_seconds": 5, "batch_size": 4}
    processes.append(start_worker(postgres_url, log, options))
    wait_for(lambda: bool(events(log)), 30, "a hook to start")
    processes.append(start_worker(postgres_url, log, options, SKEW_SECONDS="120"))
    orchestrator = Orchestrator(from_url(postgres_url))
    wait_for(lambda: not orchestrator.list_pipelines(status="pending"), 90, "every pipeline to end")
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    opened: dict[tuple[str, int], float] = {}
    for kind, pid, uuid, at in events(log):
        if kind == "start":
            opened[(uuid, pid)] = at
        else:
            spans[uuid].append((opened.pop((uuid, pid)), at))
    assert not opened
    for uuid in uuids:
        assert len(spans[uuid]) == 1, (uuid, spans[uuid])  # one run of the hook, never two at once
        assert orchestrator.get(uuid).pipeline.status == Status.FINISHED
