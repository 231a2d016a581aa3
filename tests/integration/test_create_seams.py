"""A ``create()`` on PostgreSQL is one statement in autocommit (its rows and its NOTIFY). Two
seams of it, with real processes on the session's server: creates racing ``prorch purge`` of
ended pipelines of the same class (none of the new ones, nor a step of theirs, is deleted; each
ended one is purged once), and creates by code with version 2 of a class while a worker with
only version 1 runs (the old worker claims only version 1; every version 2 pipeline waits,
neither blocked nor failed, and finishes on a worker that has it)."""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from prorch import Orchestrator
from prorch.model.registry import Registry, isolated_registry
from prorch.model.status import Status
from repositories.schema import events, pipelines, steps
from tests.support.processes import PRORCH, child_env, wait_for

APP = """
    import os
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    @register_step
    class Work(OnStartMixin, Step):
        name = "Work"

        def on_start(self):
            self.finish({"pid": os.getpid()})

    @register_step
    class Tail(OnStartMixin, Step):
        name = "Tail"

        def on_start(self):
            self.finish({"pid": os.getpid()})

    @register_pipeline
    class Job(Pipeline):
        name = "Job"
        steps = [Work, Tail]
"""
NEW_APP = (
    APP
    + """
    @register_pipeline
    class JobV2(Pipeline):
        name = "Job"
        version = 2
        steps = [Work, Tail]
"""
)
CREATE = """
import sys
import {app}
from prorch import Orchestrator
from prorch.model.registry import current_registry

url, count = sys.argv[1], int(sys.argv[2])
store = Orchestrator(url).store.engine  # one backend: each create is its own statement on it
for n in range(count):
    version = {versions}[n % len({versions})]
    print(current_registry().pipeline("Job", version).create(store, {{"n": n}}).uuid, version, flush=True)
"""


PATCHED_APP = APP.replace(
    'self.finish({"pid": os.getpid()})', 'self.finish({"pid": os.getpid(), "fixed": self.patched("fix")})', 1
).replace("steps = [Work, Tail]", 'steps = [Work, Tail]\n        patches = ["fix"]')


def write_apps(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "old_app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "new_app.py").write_text(textwrap.dedent(NEW_APP))
    (tmp_path / "patched_app.py").write_text(textwrap.dedent(PATCHED_APP))
    return child_env(PYTHONPATH=str(tmp_path) + ":" + child_env()["PYTHONPATH"])


def creator(url: str, app: str, versions: list[int], count: int, tmp_path: Path, env: dict[str, str]) -> Any:
    script = CREATE.format(app=app, versions=versions)
    return subprocess.Popen(
        [sys.executable, "-c", script, url, str(count)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def load_old_app(tmp_path: Path) -> None:
    sys.path.insert(0, str(tmp_path))
    try:
        import old_app  # noqa: F401 - registers Job (version 1) in the test's registry
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("old_app", None)


@pytest.mark.slow
def test_creates_racing_purges_of_the_same_class_lose_nothing_and_purge_each_ended_pipeline_once(
    postgres_url: str, tmp_path: Path, registry: Registry, processes: list[Any]
) -> None:
    env = write_apps(tmp_path)
    load_old_app(tmp_path)
    setup = Orchestrator(postgres_url, registry=registry, batch_size=500)
    ended = [p.uuid for p in registry.pipeline("Job").create_many(postgres_url, [{"n": n} for n in range(600)])]
    while setup.execute_pipelines().claimed:
        pass
    assert {setup.store.get_pipeline(u).status for u in ended[::100]} == {Status.FINISHED}  # type: ignore[union-attr]
    purge = [PRORCH, "-r", postgres_url, "--app", "old_app", "purge", "--older-than", "0s", "--batch-size", "20"]
    run = {"cwd": tmp_path, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    creators = [creator(postgres_url, "old_app", [1], 150, tmp_path, env) for _ in range(2)]
    purges = [subprocess.Popen(purge, **run) for _ in range(2)]  # type: ignore[call-overload]
    processes += creators + purges
    created_out = [p.communicate(timeout=300) for p in creators]
    purge_out = [p.communicate(timeout=300) for p in purges]
    for process, (_, log) in zip(creators + purges, created_out + purge_out, strict=True):
        assert process.returncode == 0, log
    created = [line.split()[0] for out, _ in created_out for line in out.splitlines()]
    assert len(created) == len(set(created)) == 300
    purged = sum(int(out.split()[1]) for out, _ in purge_out)
    store = Orchestrator(postgres_url, registry=registry).store
    assert purged == len(ended)  # each ended pipeline purged once
    assert [u for u in ended if store.get_pipeline(u) is not None] == []
    fresh = [store.get_pipeline(u) for u in created]
    assert [p.status if p else None for p in fresh] == [Status.PENDING] * len(created)  # none lost
    assert {len(steps) for steps in store.steps_of_many(created).values()} == {2}  # nor a step of one
    while setup.execute_pipelines().claimed:
        pass
    assert {store.get_pipeline(u).status for u in created} == {Status.FINISHED}  # type: ignore[union-attr]


def orphans(url: str) -> tuple[int, int]:
    """Steps and events whose pipeline is not stored."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    found = []
    with engine.connect() as connection:
        for table in (steps.name, events.name):
            query = f"SELECT count(*) FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM {pipelines.name} p "
            found.append(int(connection.execute(text(query + "WHERE p.uuid = t.pipeline_uuid)")).scalar_one()))
    engine.dispose()
    return found[0], found[1]


def start_worker(
    url: str, app: str, tmp_path: Path, env: dict[str, str], *more: str
) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / f"{app}.log"
    command = [PRORCH, "-r", url, "--app", app, "--log-level", "INFO", "worker", "--interval", "0.1", *more]
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink, stderr=sink, text=True)
    return process, log


@pytest.mark.slow
def test_version_2_created_while_a_version_1_worker_runs_waits_for_a_worker_that_has_it(
    postgres_url: str, tmp_path: Path, processes: list[Any]
) -> None:
    env = write_apps(tmp_path)
    old_worker, old_log = start_worker(postgres_url, "old_app", tmp_path, env)
    processes.append(old_worker)
    making = creator(postgres_url, "new_app", [2, 1, 2], 150, tmp_path, env)  # version 1 and 2 interleaved
    processes.append(making)
    out, log = making.communicate(timeout=120)
    assert making.returncode == 0, log
    created = [line.split() for line in out.splitlines()]
    old = [uuid for uuid, version in created if version == "1"]
    new = [uuid for uuid, version in created if version == "2"]
    assert (len(old), len(new)) == (50, 100)
    orchestrator = Orchestrator(postgres_url)
    store = orchestrator.store

    def ended(uuids: list[str]) -> bool:
        return all(store.get_pipeline(u).status == Status.FINISHED for u in uuids)  # type: ignore[union-attr]

    wait_for(lambda: ended(old), 60, "the old worker to finish version 1's pipelines")
    with isolated_registry():  # this process has no Job at all: the rows are read as stored
        waiting = [store.get_pipeline(u) for u in new]
    found = {(p.status, p.lease_owner, p.claims, p.last_error) for p in waiting}  # type: ignore[union-attr]
    assert found == {(Status.PENDING, None, 0, None)}  # never claimed, blocked nor failed
    new_worker, _ = start_worker(postgres_url, "new_app", tmp_path, env)
    processes.append(new_worker)
    wait_for(lambda: ended(new), 60, "the new worker to finish version 2's pipelines")
    for process in (old_worker, new_worker):
        process.terminate()
        assert process.wait(timeout=30) == 0
    text = old_log.read_text()
    assert sum(int(n) for n in re.findall(r"worker: claimed (\d+)", text)) == len(old), text
    pids = {s.output["pid"] for u in new for s in orchestrator.get(u).steps}
    assert pids == {new_worker.pid}  # version 2 ran on the new worker only


@pytest.mark.slow
def test_a_patched_pipeline_created_while_an_old_worker_runs_is_blocked_there_never_failed_nor_charged(
    postgres_url: str, tmp_path: Path, processes: list[Any]
) -> None:
    """The patch of docs/how-to.md's rolling deploy: new code declares patch "fix" on Job (same
    version); its creates are one statement each while an old worker, without the patch, runs.
    The old worker leaves each it claims blocked for one lease (2 s here), running no hook; a
    new worker then runs every one down the patched branch, with no crash charged."""
    env = write_apps(tmp_path)
    old_worker, old_log = start_worker(postgres_url, "old_app", tmp_path, env, "--lease-seconds", "2")
    processes.append(old_worker)
    making = creator(postgres_url, "patched_app", [1], 12, tmp_path, env)
    processes.append(making)
    out, log = making.communicate(timeout=120)
    assert making.returncode == 0, log
    created = [line.split()[0] for line in out.splitlines()]
    wait_for(lambda: "patch(es) 'fix'" in old_log.read_text(), 30, "the old worker to leave one blocked")
    new_worker, new_log = start_worker(postgres_url, "patched_app", tmp_path, env, "--lease-seconds", "2")
    processes.append(new_worker)
    orchestrator = Orchestrator(postgres_url)
    store = orchestrator.store

    def ended() -> bool:
        return all(store.get_pipeline(u).status == Status.FINISHED for u in created)  # type: ignore[union-attr]

    wait_for(ended, 60, "the new worker to finish the patched pipelines")
    for process in (old_worker, new_worker):
        process.terminate()
        assert process.wait(timeout=30) == 0
    outputs = [orchestrator.get(u).steps[0].output for u in created]
    assert {(o["pid"], o["fixed"]) for o in outputs} == {(new_worker.pid, True)}  # type: ignore[index]
    old_text, new_text = old_log.read_text(), new_log.read_text()
    assert "died or vanished" not in new_text and "quarantin" not in new_text, new_text
    assert "Traceback" not in old_text + new_text, old_text + new_text


KEYED_CREATE = """
import sys
import time
import old_app
from prorch import Orchestrator
from prorch.model.registry import current_registry

url, keys = sys.argv[1], sys.argv[2].split(",")
store = Orchestrator(url).store.engine
deadline = time.monotonic() + 60
while keys and time.monotonic() < deadline:  # again and again, until each key's ended one was purged
    for key in list(keys):
        made = current_registry().pipeline("Job").create(store, {"n": key}, key=key)
        print(key, made.uuid, made.created, flush=True)
        if made.created or made.status == "pending":
            keys.remove(key)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_keyed_creates_racing_the_purge_of_their_keys_ended_pipelines_store_whole_pipelines(
    kind: str, tmp_path: Path, registry: Registry, processes: list[Any], request: pytest.FixtureRequest
) -> None:
    """A key's pipeline has ended; a purge deletes it (with its steps and events, by its uuid)
    while creates of the same key run: the uuid is derived from the key, so a create after the
    purge stores a pipeline of the very uuid whose rows the purge deletes. Each key ends with
    at most one pipeline, every stored pipeline has its two steps and its created event, no
    step or event is left without its pipeline, and each create that said created=True stored
    one that is there, pending."""
    url = f"sqlite:///{tmp_path / 'keys.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    env = write_apps(tmp_path)
    load_old_app(tmp_path)
    keys = [f"order-{n}" for n in range(150)]
    setup = Orchestrator(url, registry=registry, batch_size=500)
    for key in keys:
        registry.pipeline("Job").create(url, {"n": key}, key=key, registry=registry)
    while setup.execute_pipelines().claimed:
        pass
    purge = [PRORCH, "-r", url, "--app", "old_app", "purge", "--older-than", "0s", "--batch-size", "5"]
    run = {"cwd": tmp_path, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    creators = [
        subprocess.Popen([sys.executable, "-c", KEYED_CREATE, url, ",".join(order)], **run)  # type: ignore[call-overload]
        for order in (keys, keys[::-1])
    ]
    purges = [subprocess.Popen(purge, **run)]  # type: ignore[call-overload]
    processes += creators + purges
    outputs = [p.communicate(timeout=300) for p in creators + purges]
    for process, (_, log) in zip(creators + purges, outputs, strict=True):
        assert process.returncode == 0, log
    made = [line.split() for out, _ in outputs[:2] for line in out.splitlines()]
    store = Orchestrator(url, registry=registry).store
    stored = store.all_pipelines()
    by_key = collections.Counter(p.key for p in stored)
    assert max(by_key.values(), default=0) <= 1, by_key.most_common(3)
    steps = store.steps_of_many([p.uuid for p in stored])
    assert {p.uuid: len(steps.get(p.uuid, [])) for p in stored if len(steps.get(p.uuid, [])) != 2} == {}
    created_events = {p.uuid: [e.type.value for e in store.events_of(p.uuid)].count("pipeline.created") for p in stored}
    assert set(created_events.values()) <= {1}, created_events
    fresh = {uuid for _key, uuid, created in made if created == "True"}
    assert len(made) > len(keys) and len(fresh) == len(keys)  # found ended, then purged and created anew
    kept = {p.uuid: p.status for p in stored}
    assert {uuid: kept.get(uuid) for uuid in fresh} == dict.fromkeys(fresh, Status.PENDING)
    assert orphans(url) == (0, 0)
