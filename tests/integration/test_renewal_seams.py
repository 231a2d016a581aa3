"""Batched lease renewal (``Store.renew_leases`` in one write) beside a worker of the code before
it, which renews one lease at a time, on one PostgreSQL database and on one SQLite file: real
worker processes whose hooks outlast the lease, so that every pipeline lives by renewals. No
lease may be lost (each hook runs once: a lost lease would let the other worker run it again),
no two processes run hooks of one pipeline at once, and each step's finish is stored once."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from prorch import Orchestrator, Status
from repositories.sql_claim import FEW_LEVELS
from tests.integration.test_chaos import CHAOS, ROOT, check_no_overlap
from tests.support.processes import wait_for

LEASE = 1.5
"""The lease of the crash tests' workers: short, so that the second worker takes over soon."""
RENEWED_LEASE = 3.0
HOOK = 4.0
"""Each hook outlasts the renewal test's lease (renewed every third of it: a loaded machine may
delay a renewal by seconds, not by the lease): it lives by renewals while its hook runs."""


def load_lease_app() -> Any:
    sys.path.insert(0, str(CHAOS))
    try:
        import lease_app
    finally:
        sys.path.remove(str(CHAOS))
    return lease_app


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_batch_renewing_worker_beside_one_renewing_lease_by_lease_loses_no_lease(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, processes: list[Any]
) -> None:
    url = f"sqlite:///{tmp_path / 'renew.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    lease_app = load_lease_app()
    log = tmp_path / "hooks.log"
    uuids = [p.uuid for p in lease_app.Outlasting.create_many(url, [{"seconds": HOOK}] * 8)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHAOS), str(ROOT)]), "CHAOS_LOG": str(log)}
    errors = tmp_path / "workers.log"
    with errors.open("w") as sink:
        for mode in ("batch", "single"):
            lease = str(RENEWED_LEASE)
            command = [sys.executable, str(CHAOS / "renewal_worker.py"), url, lease, mode, str(tmp_path / mode)]
            processes.append(subprocess.Popen(command, env=env, stdout=sink, stderr=sink))
    orchestrator = Orchestrator(url)

    def done() -> bool:
        return all(orchestrator.store.get_pipeline(u).status == Status.FINISHED for u in uuids)  # type: ignore[union-attr]

    wait_for(done, 120, "the two workers to finish every pipeline", poll=0.2)
    for process in processes:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, errors.read_text()
    counts = {mode: json.loads((tmp_path / mode).read_text()) for mode in ("batch", "single")}
    assert counts["batch"]["batch"] > 0 and counts["single"]["single"] > 0, counts  # each path renewed
    assert counts["single"]["batch"] == 0, counts  # the older worker never used the batch
    text = errors.read_text()
    assert "was lost" not in text and "could not renew" not in text, text
    lines = log.read_text().splitlines()
    hooks = collections.Counter((line.split()[1], line.split()[2]) for line in lines if line.startswith("S "))
    assert set(hooks.values()) == {1} and len(hooks) == 2 * len(uuids), hooks  # each hook ran once
    assert {int(line.split()[3]) for line in lines} == {p.pid for p in processes}  # both workers ran hooks
    check_no_overlap(lines, killed={})
    for uuid in uuids:
        finished = collections.Counter(
            e.step_uuid for e in orchestrator.history(uuid) if e.type.value == "step.finished"
        )
        assert set(finished.values()) == {1} and len(finished) == 2, (uuid, finished)


"""A worker SIGKILLed right after a write was stored, before it read the answer (its claim, the
commit of a step's finish that also marks the next hook, or the commit that ends a pipeline),
then a second worker: every pipeline ends finished, each step's finish is stored once, a step
whose finish was stored never runs again, no hook runs more than twice (the at-least-once rerun
of the hook that was running) and no pipeline is charged more than one crash."""


class UnreadCommit(NamedTuple):
    """Two workers in turn (``unread_commit``): what they ran and where they logged it."""

    uuids: list[str]
    log: Path
    note: Path
    errors: Path
    first: subprocess.Popen[bytes]
    second: subprocess.Popen[bytes]
    orchestrator: Orchestrator
    first_gone_at: float = 0.0


def unread_commit(url: str, tmp_path: Path, processes: list[Any], when: str, *, freeze: bool) -> UnreadCommit:
    """Eight pipelines; a first worker that SIGKILLs itself (or, ``freeze``, SIGSTOPs itself)
    right after ``when`` (its claim, a step's finish, a pipeline's end) was stored, before it
    reads the answer; then a second worker, until every pipeline finished."""
    lease_app = load_lease_app()
    log, note, errors = tmp_path / "hooks.log", tmp_path / "stored.json", tmp_path / "workers.log"
    uuids = [p.uuid for p in lease_app.LeasePipeline.create_many(url, [{}] * 8)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHAOS), str(ROOT)]), "CHAOS_LOG": str(log)}
    gone_at = 0.0
    with errors.open("w") as sink:
        command = [sys.executable, str(CHAOS / "unread_commit_worker.py"), url, str(LEASE), when, str(note)]
        first = subprocess.Popen(command, env={**env, "FREEZE": "1"} if freeze else env, stdout=sink, stderr=sink)
        processes.append(first)
        if freeze:
            wait_for(lambda: note.exists() and stopped(first.pid), 60, "the first worker to freeze after its write")
        else:
            assert first.wait(timeout=60) == -signal.SIGKILL, errors.read_text()
            gone_at = time.monotonic()
        second = subprocess.Popen(
            [sys.executable, str(CHAOS / "lease_worker.py"), url, str(LEASE)], env=env, stdout=sink, stderr=sink
        )
        processes.append(second)
    orchestrator = Orchestrator(url)

    def done() -> bool:
        return all(orchestrator.store.get_pipeline(u).status == Status.FINISHED for u in uuids)  # type: ignore[union-attr]

    wait_for(done, 60, "the second worker to finish every pipeline", poll=0.1)
    # its row is written once its signal handlers are set: a SIGTERM before them kills it (-15)
    wait_for(lambda: any(row.pid == second.pid for row in orchestrator.store.workers()), 30, "the second worker's row")
    return UnreadCommit(uuids, log, note, errors, first, second, orchestrator, gone_at)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("when", ["claim", "finish", "end"])
def test_a_worker_killed_after_a_commit_it_never_read_is_resumed_once(
    kind: str, when: str, tmp_path: Path, request: pytest.FixtureRequest, processes: list[Any]
) -> None:
    url = f"sqlite:///{tmp_path / 'unread.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    uuids, log, note, errors, killed, second, orchestrator, died_at = unread_commit(
        url, tmp_path, processes, when, freeze=False
    )
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0, errors.read_text()
    stored = json.loads(note.read_text())
    assert stored, "the killed worker stored nothing before it died"
    lines = log.read_text().splitlines()
    runs = collections.Counter((line.split()[1], line.split()[2]) for line in lines if line.startswith("S "))
    assert max(runs.values()) <= 2 and len(runs) == 3 * len(uuids), runs  # each hook ran, at most twice
    assert [(u, s) for u, names in stored.items() for s in names if runs[(u, s)] != 1] == []  # stored: never again
    text = errors.read_text()
    charged = collections.Counter(re.findall(r"pipeline (\S+): a worker died or vanished while one of its hooks", text))
    assert max(charged.values(), default=0) <= 1, text
    assert "quarantin" not in text.replace("before quarantine", ""), text
    for uuid in uuids:
        finished = collections.Counter(
            e.step_uuid for e in orchestrator.history(uuid) if e.type.value == "step.finished"
        )
        assert set(finished.values()) == {1} and len(finished) == 3, (uuid, finished)
    check_no_overlap(lines, killed={killed.pid: died_at})


"""SQLite's claim walks the pending priorities highest first, one level a statement (up to
``FEW_LEVELS`` levels; past them one walk of every level). An operator changing pipelines'
priorities meanwhile (an outside write, as ``test_leases`` writes one) while two workers claim:
every pipeline is claimed and finishes (none skipped forever), each hook runs once (none
claimed twice) and no two workers run one pipeline at once."""


@pytest.mark.slow
@pytest.mark.parametrize("levels", [6, FEW_LEVELS + 16], ids=["by-levels", "one-walk"])
def test_priorities_changed_while_two_sqlite_workers_claim_by_levels_skip_and_double_nothing(
    levels: int, tmp_path: Path, processes: list[Any]
) -> None:
    url = f"sqlite:///{tmp_path / 'levels.db'}"
    lease_app = load_lease_app()
    log, stop = tmp_path / "hooks.log", tmp_path / "stop"
    uuids = [
        p.uuid
        for level in range(levels)
        for p in lease_app.LeasePipeline.create_many(url, [{}] * (320 // levels), priority=level)
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHAOS), str(ROOT)]), "CHAOS_LOG": str(log)}
    changer = subprocess.Popen(
        [sys.executable, str(CHAOS / "reprioritizer.py"), url, str(levels), str(stop), *uuids],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    processes.append(changer)
    assert changer.stdout is not None and changer.stdout.readline() == "ready\n", changer.stderr
    errors = tmp_path / "workers.log"
    with errors.open("w") as sink:
        workers = [
            subprocess.Popen(
                [sys.executable, str(CHAOS / "lease_worker.py"), url, "30"], env=env, stdout=sink, stderr=sink
            )
            for _ in range(2)
        ]
    processes += workers
    orchestrator = Orchestrator(url)

    def done() -> bool:
        return all(p.status == Status.FINISHED for p in orchestrator.store.get_pipelines(uuids).values())

    wait_for(done, 120, "the workers to finish every pipeline", poll=0.2)
    stop.touch()
    out, err = changer.communicate(timeout=30)
    assert changer.returncode == 0, err
    assert int(out) > 20  # the operator changed pending pipelines' priorities meanwhile
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, errors.read_text()
    lines = log.read_text().splitlines()
    runs = collections.Counter((line.split()[1], line.split()[2]) for line in lines if line.startswith("S "))
    assert set(runs.values()) == {1} and len(runs) == 3 * len(uuids)  # each hook once: none claimed twice
    check_no_overlap(lines, killed={})
    assert "lost" not in errors.read_text(), errors.read_text()


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): its state in /proc is T."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "when"), [("sqlite", "finish"), ("postgresql", "claim")])
def test_a_worker_frozen_between_a_commit_and_its_answer_past_its_lease_writes_nothing_more(
    kind: str, when: str, tmp_path: Path, request: pytest.FixtureRequest, processes: list[Any]
) -> None:
    """The same seam with SIGSTOP: the worker freezes right after its claim or a step's finish
    was stored, before it reads the answer; a second worker finishes everything; the first is
    continued with that answer and leases long run out: it starts no hook and stores nothing."""
    url = f"sqlite:///{tmp_path / 'frozen.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    uuids, log, note, errors, frozen, second, orchestrator, _ = unread_commit(
        url, tmp_path, processes, when, freeze=True
    )
    history = {u: orchestrator.history(u) for u in uuids}
    continued = time.monotonic()
    frozen.send_signal(signal.SIGCONT)
    time.sleep(2 * LEASE)  # the first worker goes on with its stale answer, then idles
    for process in (frozen, second):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, errors.read_text()
    assert {u: orchestrator.history(u) for u in uuids} == history  # the continued worker stored nothing
    lines = log.read_text().splitlines()
    late = [line for line in lines if int(line.split()[3]) == frozen.pid and float(line.split()[4]) > continued]
    assert [line for line in late if line.startswith("S ")] == []  # nor started a hook
    runs = collections.Counter((line.split()[1], line.split()[2]) for line in lines if line.startswith("S "))
    stored = json.loads(note.read_text())
    assert [(u, s) for u, names in stored.items() for s in names if runs[(u, s)] != 1] == []
    assert max(runs.values()) <= 2 and len(runs) == 3 * len(uuids), runs
    charged = collections.Counter(
        re.findall(r"pipeline (\S+): a worker died or vanished while one", errors.read_text())
    )
    assert max(charged.values(), default=0) <= 1, errors.read_text()
    for uuid in uuids:
        finished = collections.Counter(e.step_uuid for e in history[uuid] if e.type.value == "step.finished")
        assert set(finished.values()) == {1} and len(finished) == 3, (uuid, finished)
