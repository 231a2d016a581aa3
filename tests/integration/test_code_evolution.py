"""Code evolution (issue #30 item 3): patches across a simulated deploy with real worker
processes of two (then three) code versions on one store; ``versions`` counted by every backend;
``replay`` finding what the code loaded now would not run as recorded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator
from prorch.dashboard.versions_api import versions_view
from prorch.model.registry import Registry, isolated_registry
from prorch.testing import Harness, replay
from tests.support.processes import PRORCH, child_env, wait_for

STEP = """
    import os
    from pydantic import BaseModel
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    class Quote(BaseModel):
        amount: int
"""
OLD_APP = (
    STEP
    + """
    @register_step
    class Round(OnStartMixin, Step):
        name = "Round"

        def on_start(self):
            self.finish({"branch": "old", "pid": os.getpid()})

    @register_pipeline
    class Price(Pipeline):
        name = "Price"
        steps = [Round]
"""
)
NEW_APP = (
    STEP
    + """
    @register_step
    class Round(OnStartMixin, Step):
        name = "Round"

        def on_start(self):
            self.finish({"branch": "new" if self.patched("fix-rounding") else "old", "pid": os.getpid()})

    @register_pipeline
    class Price(Pipeline):
        name = "Price"
        steps = [Round]
        patches = ["fix-rounding"]
"""
)
DEPRECATED_APP = NEW_APP.replace('patches = ["fix-rounding"]', 'deprecated_patches = ["fix-rounding"]')


def write_apps(tmp_path: Path) -> None:
    for name, text in (("old_app", OLD_APP), ("new_app", NEW_APP), ("deprecated_app", DEPRECATED_APP)):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))


def create(url: str, app: str, count: int, tmp_path: Path) -> list[str]:
    """``count`` pipelines created by the code of module ``app``, as its web process would."""
    sys.path.insert(0, str(tmp_path))
    try:
        with isolated_registry() as registry:
            __import__(app)
            return [registry.pipeline("Price").create(url, {}).uuid for _ in range(count)]
    finally:
        sys.modules.pop(app, None)
        sys.path.remove(str(tmp_path))


def start_worker(url: str, app: str, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / f"{app}.log"
    command = [PRORCH, "-r", url, "--app", app, "--log-level", "INFO", "worker", "--interval", "0.1",
               "--lease-seconds", "2"]  # fmt: skip
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink, stderr=sink, text=True)
    return process, log


def stop(*processes: subprocess.Popen[str] | None) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'deploy.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.mark.slow
def test_patched_across_a_rolling_deploy_with_old_and_new_worker_processes(url: str, tmp_path: Path) -> None:
    write_apps(tmp_path)
    before = create(url, "old_app", 10, tmp_path)  # created before the deploy: no record of the patch
    after = create(url, "new_app", 10, tmp_path)  # created by the new code: the patch is recorded
    orchestrator = Orchestrator(url)

    def outputs(uuids: list[str]) -> list[Any]:
        return [orchestrator.get(u).steps[0].output for u in uuids]

    def ended(uuids: list[str]) -> bool:
        return all(o is not None for o in outputs(uuids))

    old_worker, old_log = start_worker(url, "old_app", tmp_path)
    new_worker = None
    try:
        # the old worker alone first: it runs the old pipelines and leaves the patched ones blocked
        wait_for(lambda: ended(before), 60, "the old worker to run the pipelines created before the deploy")
        wait_for(lambda: "was created with patch(es) 'fix-rounding'" in old_log.read_text(), 30, "a refusal")
        assert outputs(after) == [None] * 10, old_log.read_text()
        more_before = create(url, "old_app", 5, tmp_path)  # the old web process still creates some
        new_worker, _ = start_worker(url, "new_app", tmp_path)
        wait_for(lambda: ended(after + more_before), 90, "both workers to finish everything")
    finally:
        stop(old_worker, new_worker)
    assert {o["branch"] for o in outputs(before + more_before)} == {"old"}  # False forever, on either worker
    assert {(o["branch"], o["pid"]) for o in outputs(after)} == {("new", new_worker.pid)}
    assert all(orchestrator.get(u).pipeline.status.value == "finished" for u in before + after + more_before)


@pytest.mark.slow
def test_a_deprecated_patch_leaves_pipelines_that_predate_it_blocked_in_a_worker_process(
    url: str, tmp_path: Path
) -> None:
    write_apps(tmp_path)
    stranded = create(url, "old_app", 3, tmp_path)
    patched = create(url, "new_app", 3, tmp_path)
    fresh = create(url, "deprecated_app", 3, tmp_path)
    worker, log = start_worker(url, "deprecated_app", tmp_path)
    orchestrator = Orchestrator(url)
    try:
        wait_for(lambda: all(orchestrator.get(u).steps[0].output for u in patched + fresh), 60, "the patched ones")
        wait_for(lambda: log.read_text().count("predates patch(es) 'fix-rounding'") >= 3, 30, "three refusals")
    finally:
        stop(worker)
    for uuid in stranded:
        state = orchestrator.get(uuid)
        assert (state.pipeline.status.value, state.steps[0].status.value) == ("pending", "created")
        assert state.steps[0].output is None  # never run down the new branch
    assert {orchestrator.get(u).steps[0].output["branch"] for u in patched + fresh} == {"new"}  # type: ignore[index]
    shown = subprocess.run(
        [PRORCH, "-r", url, "--app", "deprecated_app", "versions", "--json"],
        cwd=tmp_path, env={**child_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), child_env()["PYTHONPATH"]])},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    (usage,) = json.loads(shown.stdout)["versions"]
    assert (usage["live"], usage["ended"]) == (3, 6)
    assert usage["patches"][0] == {
        "id": "fix-rounding", "live_with": 0, "live_without": 3, "declared": "deprecated_patches",
        "oldest_without": usage["oldest_live"],
    }  # fmt: skip


# --- versions, on every backend ---------------------------------------------------------------------


def price_app(version: int, patches: list[str]) -> Registry:
    declared = f'name = "Price"\n    version = {version}\n    patches = {patches!r}'
    with isolated_registry() as registry:
        exec(textwrap.dedent(OLD_APP).replace('name = "Price"', declared), {"__name__": f"price_{version}_{patches}"})
    return registry


def test_versions_counts_live_and_ended_per_version_and_patch(backend: Any) -> None:
    v1, v1_patched = price_app(1, []), price_app(1, ["fix-rounding"])
    v2 = price_app(2, ["fix-rounding", "tax-2027"])
    clock = Harness(backend, registry=v1).clock
    old = [Harness(backend, registry=v1, clock=clock).create(v1.pipeline("Price")) for _ in range(3)]
    clock.advance(60)
    patched = [
        Harness(backend, registry=v1_patched, clock=clock).create(v1_patched.pipeline("Price")) for _ in range(2)
    ]
    newest = Harness(backend, registry=v2, clock=clock).create(v2.pipeline("Price"))
    Harness(backend, registry=v1_patched, clock=clock).orchestrator.cancel(old[0].uuid)
    orchestrator = Orchestrator(backend, registry=v1_patched)
    found = {u.version: u for u in orchestrator.versions()}
    assert set(found) == {1, 2}
    first = found[1]
    assert (first.live, first.ended, first.registered) == (4, 1, True)
    assert first.oldest_live == orchestrator.get(old[1].uuid).pipeline.created_at
    (patch,) = first.patches
    assert (patch.id, patch.live_with, patch.live_without, patch.declared) == ("fix-rounding", 2, 2, "patches")
    assert patch.oldest_without == first.oldest_live
    second = found[2]
    assert (second.live, second.ended, second.registered) == (1, 0, False)  # not in this code
    assert [(p.id, p.live_with, p.live_without) for p in second.patches] == [("fix-rounding", 1, 0), ("tax-2027", 1, 0)]
    assert newest.uuid and patched
    (shown, _) = versions_view(orchestrator)["versions"]  # the dashboard's JSON, as `prorch versions --json`
    assert (shown["version"], shown["live"], shown["patches"][0]["live_without"]) == (1, 4, 2)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_versions_of_the_sql_stores_come_from_one_group_by(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Not by loading every pipeline: one statement, grouped in the database."""
    from sqlalchemy import event

    from tests.integration.conftest import make_backend

    backend = make_backend(kind, tmp_path, request)
    registry = price_app(1, ["fix-rounding"])
    harness = Harness(backend, registry=registry)
    for _ in range(30):
        harness.create(registry.pipeline("Price"))
    orchestrator = Orchestrator(backend, registry=registry)
    statements: list[str] = []
    event.listen(backend.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    (usage,) = orchestrator.versions()
    assert (usage.live, usage.patches[0].live_with) == (30, 30)
    assert len(statements) == 1 and "GROUP BY" in statements[0].upper(), statements
    backend.dispose()


# --- replay -----------------------------------------------------------------------------------------

SHIP_V1 = """
    from pydantic import BaseModel
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    class Params(BaseModel):
        order: str

    class Packed(BaseModel):
        boxes: int

    @register_step
    class Pack(OnStartMixin, Step):
        name = "Pack"
        Output = Packed

        def on_start(self):
            self.finish({"boxes": 2})

    @register_step
    class Ship(OnStartMixin, Step):
        name = "Ship"

        def on_start(self):
            self.wait(seconds=3600)

        def on_continue(self):
            self.finish({"shipped": True})

    @register_pipeline
    class Order(Pipeline):
        name = "Order"
        Params = Params
        steps = [Pack, Ship]
"""
SHIP_REMOVED = SHIP_V1.replace("steps = [Pack, Ship]", "steps = [Pack]").replace(
    "    @register_step\n    class Ship", "    class Ship"
)


def load_app(text: str) -> Registry:
    with isolated_registry() as registry:
        exec(textwrap.dedent(text), {"__name__": f"app_{id(text)}"})
    return registry


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A store recorded by the v1 code: orders packed, each waiting in Ship."""
    url = f"sqlite:///{tmp_path / 'prod-copy.db'}"
    v1 = load_app(SHIP_V1)
    harness = Harness(url, registry=v1)
    uuids = [harness.create(v1.pipeline("Order"), {"order": f"A-{n}"}).uuid for n in range(3)]
    harness.run_pass()
    assert all(s.status.value == "pending" for u in uuids for s in harness.orchestrator.get(u).steps[1:])
    yield url, uuids


def test_replay_finds_a_removed_step_in_a_recorded_store(recorded: tuple[str, list[str]]) -> None:
    url, uuids = recorded
    assert replay(url, registry=load_app(SHIP_V1)).ok  # the code it was recorded with fits
    report = replay(url, registry=load_app(SHIP_REMOVED))
    assert report.checked == 3 and not report.ok
    assert {f.uuid for f in report.findings} == set(uuids)
    finding = report.findings[0]
    assert (finding.step, finding.kind) == ("Ship", "step")
    assert "recorded step Ship v1 no longer loads: no step named 'Ship' is registered" in finding.message


def test_replay_finds_params_and_outputs_that_no_longer_validate(recorded: tuple[str, list[str]]) -> None:
    url, _ = recorded
    renamed = load_app(SHIP_V1.replace("order: str", "order_id: str"))
    (first, *_) = replay(url, registry=renamed).findings
    assert (first.step, first.kind) == (None, "params")
    assert "unknown key(s) order (known: order_id)" in first.message
    recounted = load_app(SHIP_V1.replace("boxes: int", "parcels: int"))
    (first, *_) = replay(url, registry=recounted).findings
    assert (first.step, first.kind) == ("Pack", "output") and "parcels: Field required" in first.message
    notify = """
    @register_step
    class Notify(OnStartMixin, Step):
        name = "Notify"

        def on_start(self):
            self.finish()
"""
    added = load_app(SHIP_V1.replace("    @register_pipeline", notify + "\n    @register_pipeline").replace(
        "steps = [Pack, Ship]", "steps = [Pack, Ship, Notify]"
    ))  # fmt: skip
    (first, *_) = replay(url, registry=added).findings
    assert (first.step, first.kind) == ("Notify", "steps") and "has no record of it" in first.message
    swapped = load_app(SHIP_V1.replace("steps = [Pack, Ship]", "steps = [Ship, Pack]"))
    (first, *_) = replay(url, registry=swapped).findings
    assert (first.step, first.kind) == ("Pack", "steps") and "now lists: Ship v1, Pack v1" in first.message
    removed_class = load_app(SHIP_V1.replace('name = "Order"', 'name = "Purchase"'))
    (first, *_) = replay(url, registry=removed_class).findings
    assert first.kind == "class" and "no pipeline named 'Order' is registered" in first.message


def test_prorch_replay_and_export_from_the_command_line(recorded: tuple[str, list[str]], tmp_path: Path) -> None:
    url, uuids = recorded
    (tmp_path / "shop_v1.py").write_text(textwrap.dedent(SHIP_V1))
    (tmp_path / "shop_v2.py").write_text(textwrap.dedent(SHIP_REMOVED))
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), child_env()["PYTHONPATH"]])}

    def prorch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PRORCH, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    good = prorch("--app", "shop_v1", "replay", "--from", url)
    assert good.returncode == 0, good.stderr
    assert "replayed 3 pipeline(s) against the code loaded: ok" in good.stdout
    bad = prorch("--app", "shop_v2", "replay", "--from", url)
    assert bad.returncode == 1, bad.stderr
    assert re.search(r"Order v1 \(pending\), step Ship: step: recorded step Ship v1 no longer loads", bad.stdout)
    assert "3 would not run as recorded" in bad.stdout
    exported = prorch("-r", url, "export", uuids[0])
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "one.json").write_text(exported.stdout)
    assert [e["type"] for e in json.loads(exported.stdout)["pipelines"][0]["events"]][:1] == ["pipeline.created"]
    from_file = prorch("--app", "shop_v2", "replay", "--file", "one.json", "--json")
    assert from_file.returncode == 1
    assert [f["uuid"] for f in json.loads(from_file.stdout)["findings"]] == [uuids[0]]
    no_app = prorch("replay", "--from", url)
    assert no_app.returncode == 2 and "give --app MODULE" in no_app.stderr
    (tmp_path / "junk.json").write_text("{}")
    junk = prorch("--app", "shop_v1", "replay", "--file", "junk.json")
    assert junk.returncode != 0 and "is not a file written by `prorch export`" in junk.stderr


def test_replay_finds_patches_the_code_no_longer_fits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    patched, unpatched = price_app(1, ["fix-rounding"]), price_app(1, [])
    Harness(url, registry=unpatched).create(unpatched.pipeline("Price"))
    Harness(url, registry=patched).create(patched.pipeline("Price"))
    assert replay(url, registry=patched).ok
    (finding,) = replay(url, registry=unpatched).findings  # an older deploy: the patch is unknown
    assert finding.kind == "patches" and "created with patch(es) 'fix-rounding'" in finding.message
    deprecated = price_app(1, [])
    deprecated.pipeline("Price").deprecated_patches = ["fix-rounding"]
    (finding,) = replay(url, registry=deprecated).findings
    assert finding.kind == "patches" and "predates patch(es) 'fix-rounding'" in finding.message
