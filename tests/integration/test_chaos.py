"""Real worker processes, a random one SIGKILLed after every few dozen hooks: every pipeline still
finishes, each step's finish is recorded exactly once, and no two processes ever ran hooks of one
pipeline at overlapping times (checked from an append-only log of every hook's pid, start, end)."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator, Status
from repositories import from_url

CHAOS = Path(__file__).parent / "chaos"
ROOT = Path(__file__).resolve().parents[2]


STALLED = 60.0
"""Seconds without a hook logged after which a chaos run is stuck: the budget is progress, not a
total time, so a loaded machine makes the run slower, not failed."""


def start_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    """A worker whose stderr (its warnings and tracebacks) goes to workers.log beside the hooks' log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHAOS), str(ROOT)]), "CHAOS_LOG": str(log)}
    with open(log.with_name("workers.log"), "ab") as errors:
        return subprocess.Popen(
            [sys.executable, str(CHAOS / "worker.py"), url], env=env,
            stdout=subprocess.DEVNULL, stderr=errors,
        )  # fmt: skip


class HookLog:
    """The hooks' log read on from where the last look stopped: how many lines, and by which pids."""

    def __init__(self, log: Path) -> None:
        self.log, self.offset, self.lines, self.pids = log, 0, 0, set[int]()

    def look(self) -> None:
        if not self.log.exists():
            return
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            whole = handle.read().split(b"\n")[:-1]  # a torn last line is read at the next look
        self.offset += sum(len(line) + 1 for line in whole)
        self.lines += len(whole)
        self.pids.update(int(line.split()[3]) for line in whole)


def run_chaos(url: str, tmp_path: Path, *, workers: int, pipelines: int, kill_every: int) -> None:
    """A random worker (one that ran hooks) is SIGKILLed after every ``kill_every`` hooks: kills
    paced by the work, not by the clock, so a slow machine's workers are not all killed while they
    start (with a kill a second, at load 20, few pipelines ended), and the run ends when they all have."""
    sys.path.insert(0, str(CHAOS))
    try:
        import chaos_app
    finally:
        sys.path.remove(str(CHAOS))
    log = tmp_path / "hooks.log"
    backend = from_url(url)
    uuids = [p.uuid for p in chaos_app.ChaosPipeline.create_many(backend, [{}] * pipelines)]
    orchestrator = Orchestrator(backend)

    procs = [start_worker(url, log) for _ in range(workers)]
    killed: dict[int, float] = {}
    rng = random.Random(1234)
    hooks = HookLog(log)
    killed_at_line = last_line = 0
    last_progress = time.monotonic()
    try:
        while time.monotonic() - last_progress < STALLED:
            time.sleep(0.1)
            hooks.look()
            if hooks.lines > last_line:
                last_line, last_progress = hooks.lines, time.monotonic()
            if hooks.lines - killed_at_line >= 2 * kill_every:  # a hook logs two lines
                if not orchestrator.list_pipelines(status="pending"):
                    break
                killed_at_line = hooks.lines
                working = [proc for proc in procs if proc.pid in hooks.pids] or procs
                victim = working[rng.randrange(len(working))]
                procs.remove(victim)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed[victim.pid] = time.monotonic()
                procs.append(start_worker(url, log))
            elif hooks.lines == last_line and not orchestrator.list_pipelines(status="pending"):
                break
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed[proc.pid] = time.monotonic()
    kills = len(killed) - workers
    assert time.monotonic() - last_progress < STALLED, (
        f"no hook logged for {STALLED} s after {hooks.lines // 2} hooks and {kills} kills; "
        f"the workers' lines are in {log.with_name('workers.log')}"
    )
    assert kills >= 5, f"only {kills} kills: too few hooks between kills to mean anything"

    # every pipeline finished
    statuses = collections.Counter(orchestrator.get(u).pipeline.status for u in uuids)
    assert statuses == {Status.FINISHED: pipelines}, statuses

    # exactly one step.finished per step
    for uuid in uuids:
        state = orchestrator.get(uuid)
        finished = collections.Counter(
            e.step_uuid for e in orchestrator.history(uuid) if e.type.value == "step.finished"
        )
        assert finished == {s.uuid: 1 for s in state.steps}, (uuid, finished)

    check_no_overlap(log.read_text().splitlines(), killed)


def check_no_overlap(lines: list[str], killed: dict[int, float]) -> None:
    """Per pipeline, hooks (start..end, or start..kill time for a killed one) never overlap."""
    open_hooks: dict[tuple[str, int], float] = {}
    intervals: dict[str, list[tuple[float, float, int]]] = collections.defaultdict(list)
    for line in lines:
        kind, pipeline, _step, pid_text, at_text = line.split()
        pid, at = int(pid_text), float(at_text)
        if kind == "S":
            open_hooks[(pipeline, pid)] = at
        else:
            intervals[pipeline].append((open_hooks.pop((pipeline, pid)), at, pid))
    for (pipeline, pid), start in open_hooks.items():  # hooks cut short by SIGKILL
        intervals[pipeline].append((start, killed[pid], pid))
    overlaps: list[Any] = []
    for pipeline, spans in intervals.items():
        spans.sort()
        latest_end, latest_pid = spans[0][1], spans[0][2]  # the furthest-reaching hook so far
        for start, end, pid in spans[1:]:
            if start < latest_end and pid != latest_pid:
                overlaps.append((pipeline, latest_pid, pid, round(latest_end - start, 6)))
            if end > latest_end:
                latest_end, latest_pid = end, pid
    assert not overlaps, overlaps[:5]
    assert sum(len(s) for s in intervals.values()) > 0


@pytest.mark.slow
def test_sqlite_four_workers_random_sigkill(tmp_path: Path) -> None:
    run_chaos(f"sqlite:///{tmp_path / 'chaos.db'}", tmp_path, workers=4, pipelines=100, kill_every=50)


@pytest.mark.slow
def test_postgresql_eight_workers_random_sigkill(tmp_path: Path, postgres_url: str) -> None:
    run_chaos(postgres_url, tmp_path, workers=8, pipelines=100, kill_every=50)


@pytest.mark.slow
def test_tinydb_three_workers_random_sigkill(tmp_path: Path) -> None:
    run_chaos(f"tinydb:///{tmp_path / 'chaos.json'}", tmp_path, workers=3, pipelines=100, kill_every=10)


def test_overlap_check_catches_two_processes_in_one_pipeline() -> None:
    apart = ["S p A 1 1.0", "E p A 1 2.0", "S p B 2 2.5", "E p B 2 3.0"]
    check_no_overlap(apart, killed={})
    overlapping = ["S p A 1 1.0", "S p B 2 1.5", "E p B 2 1.8", "E p A 1 2.0"]
    with pytest.raises(AssertionError):
        check_no_overlap(overlapping, killed={})
    cut_short = ["S p A 1 1.0", "S p B 2 1.5", "E p B 2 3.0"]  # pid 1 was killed at 2.0
    with pytest.raises(AssertionError):
        check_no_overlap(cut_short, killed={1: 2.0})
    check_no_overlap(cut_short, killed={1: 1.2})
    long_first = ["S p A 1 1.0", "E p A 1 10.0", "S p B 2 2.0", "E p B 2 3.0", "S p C 3 4.0", "E p C 3 5.0"]
    with pytest.raises(AssertionError, match="'p', 1, 3"):  # C overlaps A, not just B
        check_no_overlap(long_first, killed={})


def run_lease_race(tmp_path: Path, run: int, *, lease: float, seconds: float, every: float) -> None:
    """#25: 300 pipelines of three 3 ms steps, three workers on one SQLite file with short
    leases, a random one SIGKILLed every ``every`` seconds once hooks run: no two processes
    may run hooks of one pipeline at overlapping times, and no step's finish is recorded twice."""
    sys.path.insert(0, str(CHAOS))
    try:
        import lease_app
    finally:
        sys.path.remove(str(CHAOS))
    url = f"sqlite:///{tmp_path / f'lease{run}.db'}"
    log = tmp_path / f"hooks{run}.log"
    backend = from_url(url)
    uuids = [p.uuid for p in lease_app.LeasePipeline.create_many(backend, [{}] * 300)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHAOS), str(ROOT)]), "CHAOS_LOG": str(log)}

    def start() -> subprocess.Popen[bytes]:
        command = [sys.executable, str(CHAOS / "lease_worker.py"), url, str(lease)]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = [start() for _ in range(3)]
    killed: dict[int, float] = {}
    rng = random.Random(run)
    try:
        started = time.monotonic()
        while not log.exists() and time.monotonic() - started < 60:  # a loaded machine starts slowly
            time.sleep(0.05)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(every)
            victim = procs.pop(rng.randrange(len(procs)))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed[victim.pid] = time.monotonic()
            procs.append(start())
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed[proc.pid] = time.monotonic()
    orchestrator = Orchestrator(backend)
    for uuid in uuids:
        finished = collections.Counter(
            e.step_uuid for e in orchestrator.history(uuid) if e.type.value == "step.finished"
        )
        assert all(count == 1 for count in finished.values()), (uuid, finished)
    check_no_overlap(log.read_text().splitlines(), killed)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(10))
def test_sqlite_short_leases_and_kills_never_run_one_pipeline_in_two_workers(tmp_path: Path, run: int) -> None:
    run_lease_race(tmp_path, run, lease=1.0, seconds=4.0, every=0.5)
