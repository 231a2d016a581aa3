"""A worker's continuous slots, with real worker processes on a real SQLite file: a slow hook
holds one slot and never the others; a worker leases no more than its free slots plus its
prefetch; SIGTERM drains (running hooks finish, what was claimed and not started is released)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from prorch import Orchestrator
from prorch.model.status import TERMINAL
from prorch.testing import isolated_registry
from tests.support.processes import PRORCH, ROOT, wait_for

pytestmark = pytest.mark.slow
APP = ROOT / "tests" / "integration" / "slots"


@pytest.fixture
def app() -> Iterator[object]:
    sys.path.insert(0, str(APP))
    try:
        with isolated_registry():
            import slots_app

            yield slots_app
    finally:
        sys.path.remove(str(APP))
        sys.modules.pop("slots_app", None)


def start_worker(url: str, log: Path, interval: str = "0.1", **settings: str) -> subprocess.Popen[str]:
    """A ``prorch worker`` process; its own output goes to ``worker.log`` beside ``log`` (a
    file, not a pipe nobody reads until the end: a full pipe would stop the worker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env.update({"PYTHONPATH": os.pathsep.join([str(APP), str(ROOT)]), "SLOTS_LOG": str(log)})
    env.update({f"PRORCH_{name.upper()}": value for name, value in settings.items()})
    command = [PRORCH, "-r", url, "--app", "slots_app", "worker", "--interval", interval]
    with worker_log(log).open("w") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


def worker_log(log: Path) -> Path:
    return log.parent / "worker.log"


def events(log: Path) -> list[tuple[str, str]]:
    """The hooks' own log: (start|end, pipeline uuid), in order."""
    if not log.exists():
        return []
    return [(line.split()[0], line.split()[1]) for line in log.read_text().splitlines() if line.strip()]


def leased(db: Path) -> int:
    """Pipelines whose lease is held, read by this process from the worker's store."""
    with sqlite3.connect(db, timeout=5) as conn:
        return int(conn.execute("SELECT count(*) FROM pipelines WHERE lease_owner IS NOT NULL").fetchone()[0])


def stop(worker: subprocess.Popen[str]) -> None:
    if worker.poll() is None:
        worker.kill()
    worker.wait()


def test_a_slow_hook_holds_one_slot_and_quick_pipelines_run_beside_it(app: object, tmp_path: Path) -> None:
    url, log = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log"
    slow = app.Slow.create(url).uuid  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="4")
    try:
        wait_for(lambda: ("start", slow) in events(log), 30, "the slow hook to start")
        quick = [app.Quick.create(url).uuid for _ in range(12)]  # type: ignore[attr-defined]
        wait_for(lambda: all(("end", q) in events(log) for q in quick), 15, "the quick hooks to end")
        seen = events(log)
        assert ("end", slow) not in seen, f"the quick pipelines waited for the slow hook: {seen}"
        assert all(("start", q) in seen for q in quick)
        assert worker.poll() is None
    finally:
        stop(worker)


def test_a_worker_leases_no_more_than_its_free_slots_plus_prefetch(app: object, tmp_path: Path) -> None:
    url, log, db = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log", tmp_path / "slots.db"
    created = [app.Quick.create(url).uuid for _ in range(12)]  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="2", prefetch="1")
    samples: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while sum(1 for event, _ in events(log) if event == "end") < len(created):
            assert time.monotonic() < deadline, "the worker did not run the 12 pipelines within 60s"
            samples.append(leased(db))
            time.sleep(0.02)
        wait_for(lambda: len(Orchestrator(url).list_pipelines(status="finished")) == len(created), 10, "all stored")
    finally:
        stop(worker)
    assert max(samples) <= 3, f"the worker leased more than 2 slots + 1 prefetch at once: {max(samples)}"
    assert max(samples) >= 2, f"the samples never saw the worker's leases: {samples}"


def test_a_worker_keeps_its_prefetch_while_every_slot_is_busy(app: object, tmp_path: Path) -> None:
    """The prefetch was refilled only once a slot was free with nothing claimed for it, so a
    worker whose slots were all busy ran its waiting pipelines down to none, and the next
    freed slot waited for a claim's commit (#27's W4). Two slots, prefetch 2: one 20 s hook
    and 2 s ones; once the first 2 s hook ended and a waiting pipeline took its slot, the worker
    claims one more (4 leased again, never more)."""
    url, log, db = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log", tmp_path / "slots.db"
    app.Slow.create(url)  # type: ignore[attr-defined]
    for _ in range(6):
        app.Mid.create(url)  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="2", prefetch="2")
    samples: list[int] = []
    try:
        wait_for(lambda: sum(1 for event, _ in events(log) if event == "start") == 3, 30, "a waiting pipeline to start")
        deadline = time.monotonic() + 1.5  # well before the next 2 s hook ends
        while time.monotonic() < deadline and (not samples or samples[-1] < 4):
            samples.append(leased(db))
            time.sleep(0.02)
        samples.extend(leased(db) for _ in range(10))
    finally:
        stop(worker)
    assert samples[-1] == 4, f"the prefetch was not claimed again while both slots were busy: {samples}"
    assert max(samples) <= 4, f"the worker leased more than 2 slots + 2 prefetch at once: {samples}"


def test_sigterm_lets_running_hooks_finish_and_releases_what_was_not_started(app: object, tmp_path: Path) -> None:
    url, log, db = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log", tmp_path / "slots.db"
    created = [app.Mid.create(url).uuid for _ in range(5)]  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="2", prefetch="2")
    try:
        wait_for(lambda: sum(1 for event, _ in events(log) if event == "start") == 2, 30, "two hooks to start")
        wait_for(lambda: leased(db) == 4, 10, "the prefetch to be claimed")
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    finally:
        stop(worker)
    assert worker.returncode == 0, worker_log(log).read_text()[-3000:]
    assert "worker: claimed 4, finished 2," in worker_log(log).read_text()  # its summary at the stop
    seen = events(log)
    started = {uuid for event, uuid in seen if event == "start"}
    assert len(started) == 2, seen
    assert {uuid for event, uuid in seen if event == "end"} == started, "a running hook did not finish"
    assert leased(db) == 0, "a claimed pipeline was left leased"
    orchestrator = Orchestrator(url)
    assert {p.uuid for p in orchestrator.list_pipelines(status="finished")} == started
    assert {p.uuid for p in orchestrator.list_pipelines(status="pending")} == set(created) - started


def test_hooks_past_their_timeout_retried_at_once_run_each_pipeline_once_at_a_time(app: object, tmp_path: Path) -> None:
    """A hook cancelled at its step's timeout is retried almost at once (backoff 1 ms): its
    pipeline is due again just after its retry is stored, while its advance is still ending in
    the slot. The worker must not start it in a second slot (it died with a KeyError when it
    did): it stays alive, every pipeline ends exactly once, and no pipeline's hook ran twice at
    once."""
    url, log = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log"
    created: list[str] = []
    # a short interval: the worker, with slots free, claims again at once after a retry is stored
    worker = start_worker(url, log, interval="0.02", concurrency="4")
    try:
        for _ in range(40):  # created while it runs, no faster than it ends them: no backlog
            created.append(app.Overrun.create(url).uuid)  # type: ignore[attr-defined]
            time.sleep(0.15)
        deadline = time.monotonic() + 120
        while sum(1 for event, _ in events(log) if event == "done") < len(created):
            assert worker.poll() is None, "the worker died: " + worker_log(log).read_text()[-3000:]
            assert time.monotonic() < deadline, (
                "the pipelines did not end within 120s: " + worker_log(log).read_text()[-3000:]
            )
            time.sleep(0.1)
        wait_for(lambda: len(Orchestrator(url).list_pipelines(status="finished")) == len(created), 10, "all stored")
        time.sleep(0.5)  # a second run of a pipeline, if any, would show now
        assert worker.poll() is None, "the worker died: " + worker_log(log).read_text()[-3000:]
    finally:
        stop(worker)
    seen = events(log)
    done = [uuid for event, uuid in seen if event == "done"]
    assert sorted(done) == sorted(created), "a pipeline ended twice, or not at all"
    for uuid in created:
        own = [event for event, who in seen if who == uuid and event != "done"]
        assert own == ["start-OverrunFirst", "end-OverrunFirst"] * 3, f"pipeline {uuid}'s hooks overlapped: {own}"
    output = worker_log(log).read_text()
    assert "Traceback" not in output, output[-3000:]
    # a busy worker sums up every 30 s, not once per 0.02 s interval with work
    assert "pass:" not in output and output.count("worker: claimed") <= 1, output[-3000:]


def test_sigterm_past_the_grace_exits_non_zero_without_the_running_hook(app: object, tmp_path: Path) -> None:
    url, log, db = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log", tmp_path / "slots.db"
    slow = [app.Slow.create(url).uuid for _ in range(2)]  # type: ignore[attr-defined]
    waiting = [app.Quick.create(url).uuid for _ in range(3)]  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="2", prefetch="2", shutdown_grace="1")
    try:
        wait_for(lambda: all(("start", uuid) in events(log) for uuid in slow), 30, "the slow hooks to start")
        wait_for(lambda: leased(db) == 4, 10, "the prefetch to be claimed")
        stopped = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        took = time.monotonic() - stopped
    finally:
        stop(worker)
    assert worker.returncode != 0, "a worker that abandoned a hook must say so by its exit status"
    assert took < 15, f"the worker waited {took:.0f}s for 20s hooks with a 1s grace"
    assert not any(("end", uuid) in events(log) for uuid in slow)
    assert not any(("start", uuid) in events(log) for uuid in waiting), "a hook started after the stop"
    assert "exiting without them" in worker_log(log).read_text()
    assert leased(db) == 2, "the pipelines claimed and not started were not released at the stop"


def test_a_tinydb_worker_with_32_hooks_at_once_keeps_every_lease(app: object, tmp_path: Path) -> None:
    """32 two-second hooks at once on a TinyDB file, with a 0.6 s lease (renewed every 0.2 s):
    the keeper renews all 32 in one rewrite of the file per turn, so the worker loses none of
    them and no hook runs twice. It rewrote the file once per lease, 32 times a turn: under
    load the renewals fell behind and the live worker lost its leases ("lease ... was lost")."""
    url, log = f"tinydb:///{tmp_path}/slots.json", tmp_path / "hooks.log"
    created = [app.Mid.create(url).uuid for _ in range(32)]  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="32", lease_seconds="0.6")
    try:
        wait_for(lambda: sum(1 for event, _ in events(log) if event == "end") >= len(created), 60, "the 32 hooks")
        wait_for(lambda: len(Orchestrator(url).list_pipelines(status="finished")) == len(created), 20, "all stored")
    finally:
        stop(worker)
    output = worker_log(log).read_text()
    assert "was lost" not in output, output[-3000:]
    starts = [uuid for event, uuid in events(log) if event == "start"]
    assert sorted(starts) == sorted(created), "a hook ran twice, or not at all"


def most_hooks_at_once(log: Path) -> int:
    """The most hooks of the ``_Logged`` steps running at once, by the order of their lines."""
    running = most = 0
    for event, _ in events(log):
        running += {"hook-start": 1, "hook-end": -1}.get(event, 0)
        most = max(most, running)
    return most


def leases(orchestrator: Orchestrator) -> int:
    """Pipelines whose lease is held, read by this process on any backend."""
    return sum(1 for pipeline in orchestrator.store.all_pipelines() if pipeline.lease_owner is not None)


@pytest.mark.parametrize(
    ("kind", "concurrency", "prefetch", "bound"),
    [
        ("sqlite", "4", "2", 6),
        ("postgresql", "4", "2", 6),
        ("tinydb", "4", "2", 6),
        ("sqlite", "1", "", 3),
        ("tinydb", "1", "", 3),
    ],
)
def test_slots_and_spares_bound_hooks_and_leases_across_retries_rollbacks_and_cancels(
    app: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    kind: str,
    concurrency: str,
    prefetch: str,
    bound: int,
) -> None:
    """Slow multi-step pipelines, retries due at once, rollbacks and cancel requests merged into
    a running advance: a slot whose hook returned takes a spare pipeline while that hook's
    transition is stored, and an advance whose resume runs no hook goes on without a slot, yet
    never more than ``concurrency`` hooks run at once (counted from the hooks' own log) and
    never more than ``concurrency + prefetch`` pipelines are leased (sampled from the store;
    the default prefetch is 2 for one slot)."""
    urls = {"sqlite": f"sqlite:///{tmp_path}/slots.db", "tinydb": f"tinydb:///{tmp_path}/slots.json"}
    url = request.getfixturevalue("postgres_url") if kind == "postgresql" else urls[kind]
    log = tmp_path / "hooks.log"
    monkeypatch.setenv("SLOTS_LOG", str(tmp_path / "here.log"))  # a cancel run in this process logs apart
    chains = [app.Chain.create(url).uuid for _ in range(8)]  # type: ignore[attr-defined]
    flaky = [app.Flaky.create(url).uuid for _ in range(4)]  # type: ignore[attr-defined]
    cancelled = [app.Cancelled.create(url).uuid for _ in range(3)]  # type: ignore[attr-defined]
    created = chains + flaky + cancelled
    settings = {"concurrency": concurrency, **({"prefetch": prefetch} if prefetch else {})}
    worker = start_worker(url, log, **settings)
    orchestrator = Orchestrator(url)
    samples: list[int] = []
    asked: set[str] = set()
    try:
        deadline = time.monotonic() + 90
        while sum(1 for p in orchestrator.list_pipelines() if p.status in TERMINAL) < len(created):
            assert worker.poll() is None, "the worker died: " + worker_log(log).read_text()[-3000:]
            assert time.monotonic() < deadline, "not all ended within 90s: " + worker_log(log).read_text()[-3000:]
            samples.append(leases(orchestrator))
            for uuid in cancelled:
                if uuid not in asked and any(who.startswith(f"{uuid}:LoggedLong") for _, who in events(log)):
                    orchestrator.cancel(uuid)  # held by the worker: a request, merged by its next write
                    asked.add(uuid)
            time.sleep(0.02)
    finally:
        stop(worker)
    output = worker_log(log).read_text()
    assert "Traceback" not in output, output[-3000:]
    assert max(samples) <= bound, f"the worker leased more than {concurrency} slots + prefetch at once: {samples}"
    assert most_hooks_at_once(log) <= int(concurrency), f"more than {concurrency} hooks ran at once: {events(log)}"
    statuses = {p.uuid: p.status.value for p in orchestrator.list_pipelines()}
    assert {statuses[uuid] for uuid in chains} == {"finished"}
    assert {statuses[uuid] for uuid in flaky} == {"failed"}
    assert {statuses[uuid] for uuid in cancelled} == {"cancelled"}
    assert not (tmp_path / "here.log").exists(), "a cancel ran here, not as a request merged by the worker"


@pytest.mark.parametrize("after", [3, 6])
def test_sigterm_with_spares_in_progress_drains_every_hook_and_lease(app: object, tmp_path: Path, after: int) -> None:
    """SIGTERM while slots run hooks, spare pipelines took the slots of hooks whose transitions
    are being stored, and advances end without a slot: the worker exits 0, every hook started
    ended, and nothing is left leased."""
    url, log, db = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log", tmp_path / "slots.db"
    created = [app.Chain.create(url).uuid for _ in range(8)]  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="2", prefetch="2")
    try:
        wait_for(lambda: sum(1 for e, _ in events(log) if e == "hook-start") >= after, 30, f"{after} hooks to start")
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    finally:
        stop(worker)
    output = worker_log(log).read_text()
    assert worker.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    seen = events(log)
    started = [who for event, who in seen if event == "hook-start"]
    assert sorted(started) == sorted(who for event, who in seen if event == "hook-end"), "a hook was abandoned"
    assert leased(db) == 0, "a pipeline was left leased"
    statuses = {p.uuid: p.status.value for p in Orchestrator(url).list_pipelines()}
    assert {statuses[uuid] for uuid in created} <= {"created", "pending", "finished"}, statuses


def test_sigterm_releases_a_waiting_pipeline_with_a_cancel_request_without_its_on_cancel(
    app: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claimed pipeline waiting for a slot is released at SIGTERM without running a hook,
    also one with a cancel request: its ``on_cancel`` ran in the worker's loop during the
    drain (a hook started after the stop, beside the slots' running hooks: one more than
    ``concurrency``, and not bounded by the grace); it is cancelled by the next worker."""
    url, log = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log"
    monkeypatch.setenv("SLOTS_LOG", str(tmp_path / "here.log"))
    busy = [app.Mid.create(url).uuid for _ in range(2)]  # type: ignore[attr-defined]
    cancelled = app.Cancelled.create(url).uuid  # type: ignore[attr-defined]
    orchestrator = Orchestrator(url)
    now = orchestrator.clock.now()
    assert orchestrator.store.claim_one(cancelled, now, "gone", now + timedelta(seconds=0.5)) is not None
    orchestrator.cancel(cancelled)  # held by a worker that went away: a request, taken by the next claim
    assert orchestrator.store.get_pipeline(cancelled).cancel_requested  # type: ignore[union-attr]
    time.sleep(0.6)  # that lease ran out
    worker = start_worker(url, log, concurrency="2", prefetch="2")
    try:
        wait_for(lambda: all(("start", uuid) in events(log) for uuid in busy), 30, "the two hooks to start")
        wait_for(lambda: leases(orchestrator) == 3, 10, "the cancelled pipeline to be claimed, waiting")
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    finally:
        stop(worker)
    assert worker.returncode == 0, worker_log(log).read_text()[-3000:]
    assert not [who for event, who in events(log) if who.startswith(cancelled)], "a hook ran after the stop"
    assert leases(orchestrator) == 0
    assert {p.uuid for p in orchestrator.list_pipelines(status="finished")} == set(busy)
    record = orchestrator.store.get_pipeline(cancelled)
    assert record is not None and record.cancel_requested and record.status.value in {"created", "pending"}


def test_a_spare_never_holds_up_a_pipeline_in_progress_behind_a_slow_hook(app: object, tmp_path: Path) -> None:
    """While a pipeline's transition was stored, a spare (prefetched) pipeline took its slot,
    so its next hook waited for the spare's: a three-step pipeline of 0.15 s hooks took 41 s
    behind 20 s hooks claimed after it (1.2 s before spares). A slot is lent only while hooks
    are short (``LEND_SECONDS``; here one has run for 20 s): the pipeline ends before any of
    the slow hooks, and a spare takes its slot once its last transition is being stored."""
    url, log = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log"
    slow = [app.Slow.create(url).uuid]  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="2", prefetch="2")

    def ended() -> bool:
        seen = events(log)
        return ("hook-end", f"{chain}:LoggedLast:on_start") in seen or any(("end", uuid) in seen for uuid in slow)

    try:
        wait_for(lambda: ("start", slow[0]) in events(log), 30, "the first slow hook to start")
        time.sleep(0.5)  # it is a slow one now
        chain = app.Chain.create(url).uuid  # type: ignore[attr-defined]
        slow += [app.Slow.create(url).uuid for _ in range(3)]  # type: ignore[attr-defined]
        wait_for(ended, 60, "the chain's last hook or a slow hook to end")
        wait_for(lambda: sum(1 for event, _ in events(log) if event == "start") >= 2, 10, "a spare to start")
    finally:
        stop(worker)
    seen = events(log)
    assert ("hook-end", f"{chain}:LoggedLast:on_start") in seen, f"the chain waited for a slow hook: {seen}"


def test_with_quick_hooks_a_worker_leases_no_more_than_slots_group_and_prefetch(app: object, tmp_path: Path) -> None:
    """Instant hooks: up to ``group_commit`` pipelines wait between two hooks, beside the slots
    and the prefetch (spares included): 4 + 10 + 2 leases at most, sampled from the store."""
    url, log, db = f"sqlite:///{tmp_path}/slots.db", tmp_path / "hooks.log", tmp_path / "slots.db"
    app.Instant.create_many(url, [{}] * 400)  # type: ignore[attr-defined]
    worker = start_worker(url, log, concurrency="4", prefetch="2", group_commit="10")
    samples: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while sum(1 for event, _ in events(log) if event == "done") < 400:
            assert time.monotonic() < deadline, "the worker did not run the 400 pipelines within 60s"
            samples.append(leased(db))
            time.sleep(0.003)
    finally:
        stop(worker)
    assert max(samples) <= 16, f"the worker leased more than 4 slots + a group of 10 + 2 prefetch: {max(samples)}"
    assert max(samples) > 6, f"the samples never saw a group between two hooks: {max(samples)}"
