"""Workers are visible (issue #27): real `prorch worker` processes on a real SQLite file keep a
row each (``prorch workers``), delete it when stopped cleanly, and leave it to go stale when
SIGKILLed; the dead worker's pipeline is shown stranded until its lease runs out, then another
worker resumes it."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import PRORCH, child_env, wait_for

LEASE = "12"  # beats every 1 s: the row is stale 3 s after a SIGKILL, the lease runs 8-12 s after it


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///jobs.db"\napp = ["fault_app"]\n')
    yield tmp_path


def cli(workdir: Path, *args: str, **env: str) -> str:
    done = subprocess.run(
        [PRORCH, *args], cwd=workdir, env=child_env(**env), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def workers(workdir: Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(cli(workdir, "workers", "--json"))
    return found


def worker(workdir: Path, processes: list[subprocess.Popen[str]], log: Path, **env: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [PRORCH, "worker", "--interval", "0.2", "--lease-seconds", LEASE, "--concurrency", "2"],
        cwd=workdir, env=child_env(FAULT_LOG=str(log), **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    processes.append(process)
    return process


def test_prorch_workers_lists_a_running_worker_and_not_one_stopped_cleanly(
    store: Path, processes: list[subprocess.Popen[str]]
) -> None:
    first = worker(store, processes, store / "log")
    wait_for(lambda: len(workers(store)) == 1, 30, "the worker's row")
    [row] = workers(store)
    assert row["pid"] == first.pid and row["alive"] is True
    assert row["concurrency"] == 2 and row["free_slots"] == 2 and row["in_flight"] == 0
    assert row["app_version"] is None and row["prorch_version"]  # fault_app has no __version__
    assert row["id"] in cli(store, "workers")  # the table lists it too
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=30)
    assert first.returncode == 0
    assert row["id"] in stderr  # "prorch worker <id> on ...": the row's id is the worker's
    assert workers(store) == []  # a clean stop deletes its row
    assert "no worker has a row" in cli(store, "workers")


def test_a_killed_workers_pipeline_is_shown_stranded_then_resumed_by_another(
    store: Path, processes: list[subprocess.Popen[str]]
) -> None:
    log = store / "log"
    uuid = cli(store, "start", "Slow", "-p", "seconds=300").strip()  # runs until the kill, however slow the CLI
    doomed = worker(store, processes, log)
    wait_for(lambda: log.exists() and "start" in log.read_text(), 30, "the hook to start")
    # the row tells the hook at the worker's next beat (every few seconds), not at once
    wait_for(lambda: workers(store)[0]["in_flight"] == 1, 30, "the row to count the running hook")
    [row] = workers(store)
    assert row["in_flight"] == 1 and row["free_slots"] == 1
    shown = json.loads(cli(store, "show", uuid, "--json"))
    assert shown["worker"] is not None, shown["pipeline"]
    assert shown["worker"]["worker"] == row["id"] and shown["worker"]["stranded"] is False
    assert f"running on worker {row['id']} since" in cli(store, "show", uuid)

    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=30)
    wait_for(lambda: workers(store)[0]["alive"] is False, 30, "the killed worker's row to go stale")
    shown = json.loads(cli(store, "show", uuid, "--json"))
    holder, pipeline = shown["worker"], shown["pipeline"]
    assert holder["stranded"] is True and holder["worker"] == row["id"]
    assert datetime.fromisoformat(holder["resumes_at"]) == datetime.fromisoformat(pipeline["lease_expires_at"])
    resumes = datetime.fromisoformat(holder["resumes_at"])
    assert f"stranded, resumes at {resumes:%H:%M}" in cli(store, "show", uuid)
    assert [w["id"] for w in workers(store)] == [row["id"]]  # the dead worker's row stays, stale

    rescuer = worker(store, processes, log, FAULT_SLEEP_CAP="1")  # its run of the hook is short
    wait_for(lambda: json.loads(cli(store, "show", uuid, "--json"))["pipeline"]["status"] == "finished", 60,
             "another worker to resume and finish the stranded pipeline")  # fmt: skip
    starts = [line.split() for line in log.read_text().splitlines() if line.startswith("start")]
    assert [int(pid) for _, pid, _, _ in starts] == [doomed.pid, rescuer.pid]
    alive = [w for w in workers(store) if w["alive"]]
    assert [w["pid"] for w in alive] == [rescuer.pid]
