"""Retention (issue #15): purge deletes ended pipelines past an age with their steps, events and
messages, keeps everything else, goes in batches, counts without deleting on a dry run, and
refuses bad input and repositories that cannot delete with one clear error; a worker with
``retention`` purges by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from prorch import ConfigurationError, FakeClock, InvalidParamsError, Orchestrator
from prorch.features import Retention
from prorch.model.registry import Registry
from prorch.model.status import Status
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

START = datetime(2026, 10, 1, tzinfo=timezone.utc)
PRORCH = str(Path(sys.executable).parent / "prorch")


@pytest.fixture(params=["sqlite", "postgresql", "memory", "tinydb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    made = make_backend(request.param, tmp_path, request)
    yield made
    if hasattr(made, "dispose"):
        made.dispose()


def children(backend: Any, uuid: str) -> int:
    return sum(len(backend(model).search(["pipeline_uuid", uuid])) for model in ("STEP", "EVENT", "MESSAGE"))


def test_purge_deletes_old_ended_pipelines_and_nothing_else(backend: Any, registry: Registry) -> None:
    work = pipeline_of(step_of("Work", lambda self: self.finish({"ok": True})), name="Work")
    broken = pipeline_of(step_of("Broken", lambda self: self.fail("no")), name="Broken")
    waiting = pipeline_of(step_of("Wait", None, lambda self: self.wait(seconds=10**6)), name="Waiting")
    clock = FakeClock(START)
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    old = [work.create(backend, {"n": n}, clock=clock).uuid for n in range(7)]
    failed = broken.create(backend, {}, clock=clock).uuid
    pending = waiting.create(backend, {}, clock=clock).uuid
    cancelled = waiting.create(backend, {}, clock=clock).uuid
    orchestrator.execute_pipelines()
    orchestrator.send(pending, "note", {"x": 1})
    orchestrator.cancel(cancelled)
    clock.advance(31 * 86400)
    recent = work.create(backend, {"n": 99}, clock=clock).uuid
    orchestrator.execute_pipelines()
    assert children(backend, old[0]) > 0

    dry = orchestrator.purge(timedelta(days=30), dry_run=True)
    assert (dry.pipelines, dry.dry_run) == (8, True)
    assert orchestrator.get(old[0]).pipeline.status.value == "finished"  # nothing deleted

    summary = orchestrator.purge(timedelta(days=30), batch_size=3)
    assert (summary.pipelines, summary.batches) == (8, 3)
    gone = [*old, cancelled]
    assert [orchestrator.store.get_pipeline(uuid) for uuid in gone] == [None] * 8
    assert [children(backend, uuid) for uuid in gone] == [0] * 8
    for kept in (failed, pending, recent):  # failed (not asked for), not ended, too young
        assert orchestrator.store.get_pipeline(kept) is not None and children(backend, kept) > 0
    assert orchestrator.purge(timedelta(days=30)).pipelines == 0
    assert orchestrator.purge(timedelta(days=30), statuses=("failed",)).pipelines == 1


def test_bad_purges_get_one_clear_error(registry: Registry, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    orchestrator = Orchestrator(make_backend("memory", tmp_path, request), registry=registry)
    with pytest.raises(InvalidParamsError, match=r"purge takes ended statuses only .* not 'pending'"):
        orchestrator.purge(timedelta(days=1), statuses=("pending",))
    with pytest.raises(InvalidParamsError, match="older_than must be a timedelta"):
        orchestrator.purge(30)  # type: ignore[arg-type]
    seed = Orchestrator(make_backend("seed", tmp_path, request), registry=registry)
    with pytest.raises(ConfigurationError, match=r"cannot delete records .*implement delete_by"):
        seed.purge(timedelta(days=1))


@pytest.mark.slow
def test_a_worker_with_retention_purges_by_itself(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'keep.db'}"
    (tmp_path / "jobs.py").write_text(
        "from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step\n"
        "@register_step\nclass Job(OnStartMixin, Step):\n    name = 'Job'\n    def on_start(self):\n        pass\n"
        "@register_pipeline\nclass Jobs(Pipeline):\n    name = 'Jobs'\n    steps = [Job]\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import jobs  # noqa: F401 - registers Jobs in this test's registry
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("jobs", None)
    done = [registry.pipeline("Jobs").create(url, {}).uuid for _ in range(5)]
    Orchestrator(url, registry=registry).execute_pipelines()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}, "PRORCH_RETENTION": "0s"}
    worker = subprocess.Popen(
        [PRORCH, "-r", url, "--app", "jobs", "worker", "--interval", "0.2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    store = Orchestrator(url, registry=registry).store
    while any(store.get_pipeline(uuid) for uuid in done) and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    _, log = worker.communicate(timeout=30)
    assert [store.get_pipeline(uuid) for uuid in done] == [None] * 5, log
    assert "purged 5 pipelines (finished, cancelled)" in log


def test_a_long_purge_does_not_hold_up_the_workers_loop(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the worker purged inline, so a large purge stopped it running pipelines (and
    failed its health check, which wants a loop every 3 intervals) until the purge ended."""
    import threading

    quick = pipeline_of(step_of("Quick", lambda self: None), name="Quick")
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    setup = Orchestrator(url, registry=registry)
    quick.create_many(url, [{}] * 1500)
    while setup.execute_pipelines().claimed:
        pass
    worker = Orchestrator(url, registry=registry, retention=timedelta(0))
    slow_delete = worker.store.delete_pipelines

    def slowly(*args: Any) -> int:
        time.sleep(0.5)  # a store under load: each batch holds on for a while
        return slow_delete(*args)

    monkeypatch.setattr(worker.store, "delete_pipelines", slowly)
    retention = worker.extensions.find(Retention)
    assert isinstance(retention, Retention)
    loop = threading.Thread(target=worker.run_forever, kwargs={"interval": 0.05}, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while retention._purging is None and time.monotonic() < deadline:
            time.sleep(0.01)
        new = quick.create(url, {}).uuid
        while worker.store.get_pipeline(new).status.value != "finished" and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        assert worker.store.get_pipeline(new).status.value == "finished"  # type: ignore[union-attr]
        assert retention._purging is not None and retention._purging.is_alive()  # ... while the purge still runs
        assert time.monotonic() - worker.last_loop < 1  # and the loop's heartbeat goes on
    finally:
        worker.stop()
        loop.join(timeout=10)


def test_a_worker_stopped_during_its_purge_ends_the_batch_and_says_what_it_purged(
    tmp_path: Path, registry: Registry
) -> None:
    """Regression: the purge thread was a daemon that SIGTERM's exit killed wherever it was, so a
    worker stopped mid-purge never logged what it had deleted (and a CI run of the test above
    lost its log line). Now the worker tells it to stop after the batch under way and waits."""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    (tmp_path / "jobs.py").write_text(
        "from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step\n"
        "@register_step\nclass Job(OnStartMixin, Step):\n    name = 'Job'\n    def on_start(self):\n        pass\n"
        "@register_pipeline\nclass Jobs(Pipeline):\n    name = 'Jobs'\n    steps = [Job]\n"
    )
    jobs = pipeline_of(step_of("Job", lambda self: None), name="Jobs")
    jobs.create_many(url, [{}] * 5000)
    setup = Orchestrator(url, registry=registry, batch_size=1000)
    while setup.execute_pipelines().claimed:
        pass
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}, "PRORCH_RETENTION": "0s"}
    worker = subprocess.Popen(
        [PRORCH, "-r", url, "--app", "jobs", "worker", "--interval", "0.2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while setup.query(count=True).total == 5000 and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGTERM)  # the first batch is gone: stop in the middle
    _, log = worker.communicate(timeout=30)
    left = setup.query(count=True).total
    assert 0 < left < 5000, log
    assert f"purged {5000 - left} pipelines (finished, cancelled)" in log
    assert "stopped early for shutdown" in log


def test_a_purged_schedule_tick_is_not_created_again(backend: Any, registry: Registry) -> None:
    """Regression (#25 item 3): schedule = "0 0 1 * *" with retention = 30d: the January 1
    pipeline was purged on January 31 and the next pass created it again."""
    monthly = pipeline_of(step_of("Bill", lambda self: None), name="Monthly", schedule="0 0 1 * *", catch_up="all")
    clock = FakeClock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc))
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    assert orchestrator.execute_pipelines().scheduled == 1
    clock.advance(30 * 86400 + 60)  # January 31
    assert orchestrator.purge(timedelta(days=30)).pipelines == 1
    for _ in range(3):
        assert orchestrator.execute_pipelines().scheduled == 0
    assert orchestrator.query(name="Monthly").pipelines == []
    clock.advance(86400)  # February 1: the next tick, once
    assert [orchestrator.execute_pipelines().scheduled for _ in range(2)] == [1, 0]
    (february,) = orchestrator.query(name="Monthly").pipelines
    assert february.context["schedule_tick"] == "2026-02-01T00:00:00+00:00" and february.name == monthly.name


def test_a_users_repository_keeps_the_last_tick_in_a_message_record(tmp_path: Path, registry: Registry) -> None:
    """The fallback for a four-method repository (no purge there): a tick's pipeline deleted by
    hand is not created again, and the mark is a message record addressed to no pipeline."""
    from tinydb import TinyDB, where

    from prorch.storage.store import TICKS_UUID
    from tests.support.seed_repository import seed_backend

    pipeline_of(step_of("Bill", lambda self: None), name="Monthly", schedule="0 0 1 * *")
    path = tmp_path / "seed.json"
    clock = FakeClock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc))
    orchestrator = Orchestrator(seed_backend(str(path)), registry=registry, clock=clock)
    assert orchestrator.execute_pipelines().scheduled == 1
    with TinyDB(path) as db:
        assert db.table("pipelines").remove(where("name") == "Monthly")
        (mark,) = db.table("pipeline_messages").search(where("pipeline_uuid") == TICKS_UUID)
    assert (mark["name"], mark["sent_at"][:19]) == ("Monthly", "2026-01-01T00:00:00")
    clock.advance(86400)
    assert orchestrator.execute_pipelines().scheduled == 0
    clock.advance(31 * 86400)
    assert orchestrator.execute_pipelines().scheduled == 1


@pytest.mark.slow
def test_a_worker_with_retention_does_not_create_a_purged_tick_again(tmp_path: Path, registry: Registry) -> None:
    """Regression (#25 item 3), with a real worker: its retention purges this year's tick of a
    yearly schedule, and its next passes must not create that tick again."""
    url = f"sqlite:///{tmp_path / 'yearly.db'}"
    (tmp_path / "yearly.py").write_text(
        "from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step\n"
        "@register_step\nclass Job(OnStartMixin, Step):\n    name = 'Job'\n    def on_start(self):\n        pass\n"
        "@register_pipeline\nclass Yearly(Pipeline):\n    name = 'Yearly'\n    steps = [Job]\n"
        "    schedule = '0 0 1 1 *'\n    catch_up = 'all'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    command = [PRORCH, "-r", url, "--app", "yearly"]
    first = subprocess.run([*command, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "scheduled 1" in first.stdout, first
    store = Orchestrator(url, registry=registry).store
    (created,) = store.all_pipelines()
    assert created.status.value == "finished"
    worker = subprocess.Popen(
        [*command, "worker", "--interval", "0.1"],
        cwd=tmp_path, env={**env, "PRORCH_RETENTION": "0s"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60  # a loaded machine
    while store.get_pipeline(created.uuid) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    purged = store.get_pipeline(created.uuid) is None
    time.sleep(2)  # about 20 more passes
    worker.send_signal(signal.SIGTERM)
    _, log = worker.communicate(timeout=30)
    assert purged and worker.returncode == 0, log
    assert "purged 1 pipelines (finished, cancelled)" in log
    assert store.all_pipelines() == [], log  # the tick was not created again


def test_a_finished_child_is_kept_while_its_parent_lives(backend: Any, registry: Registry) -> None:
    """Regression (#25): a finished child of a waiting parent was purged, and the parent's
    ``child_result`` then failed ("no child of this pipeline has that uuid"). A child goes only
    after its parent is gone: the same purge takes it in a later batch."""

    def start(step: Any) -> None:
        step.metadata["kid"] = step.start_child("Kid", {})

    def gather(step: Any) -> None:
        if step.receive("go") is None:
            step.wait(seconds=10**7)
            return
        step.finish({"kid": step.child_result(step.metadata["kid"])})

    pipeline_of(step_of("KidStep", lambda self: self.finish({"px": 2})), name="Kid")
    parent = pipeline_of(step_of("Gather", start, gather), name="Parent")
    clock = FakeClock(START)
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    uuid = parent.create(backend, {}, clock=clock).uuid
    while orchestrator.execute_pipelines().claimed:
        pass
    (kid,) = orchestrator.get(uuid).children
    assert kid.status.value == "finished"
    clock.advance(31 * 86400)
    assert orchestrator.purge(timedelta(days=30)).pipelines == 0  # the parent still waits
    orchestrator.send(uuid, "go", {})
    orchestrator.execute_pipelines()
    assert orchestrator.result(uuid) == {"kid": {"px": 2}}
    clock.advance(31 * 86400)
    summary = orchestrator.purge(timedelta(days=30))
    assert (summary.pipelines, summary.batches) == (2, 2)  # the parent, then its child
    assert orchestrator.store.get_pipeline(kid.uuid) is None and children(backend, kid.uuid) == 0


def test_a_pipeline_retried_after_the_purge_chose_it_is_not_deleted(backend: Any, registry: Registry) -> None:
    """Regression (#25): the purge found its batch, then deleted by uuid, so a retry landing in
    between was deleted while pending. The delete checks status and age again itself."""
    broken = pipeline_of(step_of("Broken", lambda self: self.fail("no")), name="Broken")
    clock = FakeClock(START)
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    failed = [broken.create(backend, {"n": n}, clock=clock).uuid for n in range(3)]
    orchestrator.execute_pipelines()
    clock.advance(31 * 86400)
    before = clock.now() - timedelta(days=30)
    store = orchestrator.store
    chosen = store.ended_before([Status.FAILED], before, 10)
    assert sorted(chosen) == sorted(failed)
    orchestrator.retry(failed[0])  # lands between the purge's choice and its delete
    assert store.delete_pipelines(chosen, [Status.FAILED], before) == 2
    retried = store.get_pipeline(failed[0])
    assert retried is not None and retried.status == Status.PENDING and children(backend, failed[0]) > 0
    assert [store.get_pipeline(uuid) for uuid in failed[1:]] == [None, None]
