"""Step logs (issue #29, item 5): what a hook logs through ``self.log`` is stored with its step
attempt, with the transition that records the hook's outcome (a retry's too), capped per
attempt, optionally with the ``logging`` records emitted while the hook runs; shown by
``prorch show --logs`` and the dashboard. Real SQLite and TinyDB files, the real PostgreSQL
server and the in-memory store."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from prorch import FakeClock, Orchestrator
from prorch.model.registry import Registry
from prorch.storage.store import Store
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of
from tests.support.grouped import run_grouped_counting

KINDS = ["sqlite", "postgresql", "memory", "tinydb"]


def flaky(self: Any) -> None:
    """Logs its attempt, fails twice, then finishes."""
    self.log.info("attempt %d starts", self.attempt)
    if self.attempt < 3:
        self.log.warning("attempt %d gives up", self.attempt)
        raise RuntimeError(f"flake {self.attempt}")
    self.finish({"ok": True})


def messages(step: Any, index: int) -> list[str]:
    """The lines of the step's ``index``-th logs entry (attempt by attempt, oldest first)."""
    return [message for _, _, message in step.logs[index]["lines"]]


@pytest.mark.parametrize("kind", KINDS)
def test_each_attempt_keeps_its_own_logs(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Flaky", flaky, max_attempts=3, retry_delay=1), name="Job")
    uuid = job.create(backend, {}).uuid
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    for _ in range(3):
        orchestrator.execute_pipelines()
        clock.advance(60)
    (step,) = orchestrator.get(uuid).steps
    assert step.status.value == "finished"
    assert [entry["attempt"] for entry in step.logs] == [1, 2, 3]
    assert messages(step, 0) == ["attempt 1 starts", "attempt 1 gives up"]
    assert messages(step, 1) == ["attempt 2 starts", "attempt 2 gives up"]
    assert messages(step, 2) == ["attempt 3 starts"]
    assert [level for _, level, _ in step.logs[0]["lines"]] == ["INFO", "WARNING"]
    assert all(entry["dropped"] == 0 for entry in step.logs)


def test_an_operators_retry_starts_new_entries_and_keeps_the_old(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'retry.db'}"

    def once(self: Any) -> None:
        self.log.info("run %s", self.metadata.setdefault("run", 0))
        raise RuntimeError("down")

    uuid = pipeline_of(step_of("Once", once), name="Job").create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry)
    orchestrator.execute_pipelines()
    orchestrator.retry(uuid, actor="ops")
    orchestrator.execute_pipelines()
    (step,) = orchestrator.get(uuid).steps
    assert [(e["attempt"], e.get("retried", False), len(e["lines"])) for e in step.logs] == [
        (1, True, 1),
        (1, False, 1),
    ]


def chatty(self: Any) -> None:
    """Logs 4 lines per call; waits twice (same attempt), then finishes."""
    for i in range(4):
        self.log.info("call %d line %d", self.metadata.get("calls", 0), i)
    self.metadata["calls"] = self.metadata.get("calls", 0) + 1
    if self.metadata["calls"] < 3:
        self.wait(seconds=0)
    else:
        self.finish()


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_an_attempt_keeps_its_first_lines_and_counts_the_rest(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Chatty", chatty, chatty), name="Job")
    uuid = job.create(backend, {}).uuid
    orchestrator = Orchestrator(backend, registry=registry, step_log_lines=6)
    for _ in range(5):
        orchestrator.execute_pipelines()
    (step,) = orchestrator.get(uuid).steps
    assert step.status.value == "finished"
    assert len(step.logs) == 1  # the on_continue calls of one attempt share its entry
    assert messages(step, 0) == [f"call {c} line {i}" for c in (0, 1) for i in range(4)][:6]
    assert step.logs[0]["dropped"] == 12 - 6


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_group_commit_stores_each_pipelines_logs(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(kind, tmp_path, request)
    say = step_of("Say", lambda self: (self.log.info("hello from %s", self.params["n"]), self.finish()))
    job = pipeline_of(say, name="Job")
    made = {job.create(backend, {"n": n}).uuid: n for n in range(4)}
    rounds = run_grouped_counting(backend, registry, monkeypatch, "logs")
    assert max(rounds) >= 2, rounds  # two pipelines' logs went in one commit
    store = Store(backend)
    for uuid, n in made.items():
        (step,) = store.steps_of(uuid)
        assert messages(step, 0) == [f"hello from {n}"]


def mixed(self: Any) -> None:
    logging.getLogger("app.billing").warning("charged %s", "acme")
    self.log.info("own line")
    try:
        {}["missing"]
    except KeyError:
        self.log.exception("lookup failed")
    self.finish()


FAILED = "lookup failed (KeyError: 'missing'; its traceback is in the worker's log)"


async def mixed_async(self: Any) -> None:
    logging.getLogger("app.billing").warning("async charged")
    self.finish()


@pytest.mark.parametrize("capture", [False, True])
def test_logging_records_are_captured_only_when_asked(tmp_path: Path, registry: Registry, capture: bool) -> None:
    url = f"sqlite:///{tmp_path / 'capture.db'}"
    job = pipeline_of(step_of("Mixed", mixed), name="Job")
    other = pipeline_of(step_of("Async", mixed_async), name="AsyncJob")
    uuid, async_uuid = job.create(url, {}).uuid, other.create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry, capture_logging=capture, hook_timeout=30)
    orchestrator.execute_pipelines()
    logging.getLogger("app.billing").warning("outside any hook")  # never stored
    (step,) = orchestrator.get(uuid).steps
    (async_step,) = orchestrator.get(async_uuid).steps
    if capture:
        assert messages(step, 0) == ["app.billing: charged acme", "own line", FAILED]  # own lines once
        assert messages(async_step, 0) == ["app.billing: async charged"]
    else:
        assert messages(step, 0) == ["own line", FAILED]
        assert async_step.logs is None


def test_show_logs_and_the_dashboard_print_them_by_attempt(tmp_path: Path, registry: Registry) -> None:
    from prorch.cli.commands import main
    from prorch.dashboard import views

    url = f"sqlite:///{tmp_path / 'show.db'}"
    job = pipeline_of(step_of("Flaky", flaky, max_attempts=3, retry_delay=0), name="Job")
    uuid = job.create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry, step_log_lines=1)
    for _ in range(3):
        orchestrator.execute_pipelines()
    shown = CliRunner().invoke(main, ["-r", url, "show", uuid, "--logs"])
    assert shown.exit_code == 0, shown.output
    lines = [line.strip() for line in shown.stdout.splitlines()]
    at = lines.index("logs of attempt 1:")
    assert lines[at + 1].endswith("INFO    attempt 1 starts")
    assert lines[at + 2] == "(1 lines dropped: step_log_lines caps an attempt)"
    assert "logs of attempt 3:" in lines
    assert "logs of attempt 1:" not in CliRunner().invoke(main, ["-r", url, "show", uuid]).stdout
    as_json = json.loads(CliRunner().invoke(main, ["-r", url, "show", uuid, "--json"]).stdout)
    assert as_json["steps"][0]["logs"][1] == {
        "attempt": 2,
        "lines": as_json["steps"][0]["logs"][1]["lines"],
        "dropped": 1,
    }
    (step,) = views.pipeline(orchestrator, uuid)["steps"]
    assert [(log["attempt"], log["lines"][0]["message"], log["dropped"]) for log in step["logs"]] == [
        (1, "attempt 1 starts", 1),
        (2, "attempt 2 starts", 1),
        (3, "attempt 3 starts", 0),
    ]
    from prorch.dashboard.app import create_app
    from tests.integration.test_search_attributes import asgi_get

    status, page = asgi_get(create_app(orchestrator), f"/pipelines/{uuid}")
    assert status == 200
    assert "<summary>logs of attempt 1 (1 lines, 1 dropped)</summary>" in page
    assert "INFO    attempt 3 starts" in page


def test_a_step_of_older_code_may_still_use_the_name_log(registry: Registry) -> None:
    from repositories import MemoryBackend

    def own(self: Any) -> None:
        self.log = ["mine"]  # before self.log existed, a step could name anything so
        self.log.append("more")
        self.finish({"log": self.log})

    backend = MemoryBackend()
    uuid = pipeline_of(step_of("Own", own), name="Job").create(backend, {}).uuid
    orchestrator = Orchestrator(backend, registry=registry)
    orchestrator.execute_pipelines()
    (step,) = orchestrator.get(uuid).steps
    assert (step.status.value, step.output, step.logs) == ("finished", {"log": ["mine", "more"]}, None)


def test_retention_removes_the_logs_with_the_pipeline(tmp_path: Path, registry: Registry) -> None:
    from datetime import timedelta

    url = f"sqlite:///{tmp_path / 'purge.db'}"
    job = pipeline_of(step_of("Say", lambda self: (self.log.info("kept"), self.finish())), name="Job")
    clock = FakeClock()
    uuid = job.create(url, {}, clock=clock).uuid
    orchestrator = Orchestrator(url, registry=registry, clock=clock)
    orchestrator.execute_pipelines()
    assert messages(orchestrator.get(uuid).steps[0], 0) == ["kept"]
    clock.advance(timedelta(days=31).total_seconds())
    assert orchestrator.purge(timedelta(days=30), ["finished"]).pipelines == 1
    assert Store(url).steps_of(uuid) == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_rollback_hooks_lines_are_stored_under_its_step(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    tries: list[int] = []

    def undo(self: Any) -> None:
        """Logs, fails its first try, then undoes."""
        tries.append(1)
        self.log.info("refund try %d", len(tries))
        if len(tries) < 2:
            raise RuntimeError("bank down")

    charge = step_of("Charge", lambda self: (self.log.info("charged"), self.finish()), on_rollback=undo, max_attempts=2)
    ship = step_of("Ship", lambda self: (_ for _ in ()).throw(RuntimeError("no stock")))
    uuid = pipeline_of(charge, ship, name="Order").create(backend, {}).uuid
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    for _ in range(4):
        orchestrator.execute_pipelines()
        clock.advance(60)
    charged = orchestrator.get(uuid).steps[0]
    assert charged.rollback is not None and charged.rollback.value == "done"
    assert [(e["attempt"], e.get("hook"), [m for _, _, m in e["lines"]]) for e in charged.logs] == [
        (1, None, ["charged"]),
        (1, "on_rollback", ["refund try 1"]),
        (2, "on_rollback", ["refund try 2"]),
    ]


def test_show_logs_and_the_dashboard_name_the_hook_of_a_rollbacks_lines(tmp_path: Path, registry: Registry) -> None:
    from prorch.cli.commands import main
    from prorch.dashboard import views

    url = f"sqlite:///{tmp_path / 'rollback.db'}"
    charge = step_of("Charge", lambda self: self.finish(), on_rollback=lambda self: self.log.warning("refunded"))
    ship = step_of("Ship", lambda self: (_ for _ in ()).throw(RuntimeError("no stock")))
    uuid = pipeline_of(charge, ship, name="Order").create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry)
    orchestrator.execute_pipelines()
    shown = CliRunner().invoke(main, ["-r", url, "show", uuid, "--logs"])
    assert shown.exit_code == 0, shown.output
    lines = [line.strip() for line in shown.stdout.splitlines()]
    at = lines.index("logs of on_rollback, attempt 1:")
    assert lines[at + 1].endswith("WARNING refunded")
    step = views.pipeline(orchestrator, uuid)["steps"][0]
    assert [(log["hook"], log["lines"][0]["message"]) for log in step["logs"]] == [("on_rollback", "refunded")]
    from prorch.dashboard.app import create_app
    from tests.integration.test_search_attributes import asgi_get

    status, page = asgi_get(create_app(orchestrator), f"/pipelines/{uuid}")
    assert status == 200
    assert "<summary>logs of on_rollback, attempt 1 (1 lines)</summary>" in page


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_on_cancel_and_on_timeout_lines_are_stored_under_their_step(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)

    def start(self: Any) -> None:
        self.log.info("start %d", self.attempt)
        if self.attempt == 1:
            time.sleep(0.6)  # past hook_timeout: on_timeout runs, then attempt 2
        self.cancel()

    slow = step_of(
        "Slow", start, max_attempts=2, retry_delay=0,
        on_timeout=lambda self: self.log.info("timed out"), on_cancel=lambda self: self.log.info("cancelled"),
    )  # fmt: skip
    uuid = pipeline_of(slow, name="Job").create(backend, {}).uuid
    orchestrator = Orchestrator(backend, registry=registry, hook_timeout=0.2)
    for _ in range(3):
        orchestrator.execute_pipelines()
    (step,) = orchestrator.get(uuid).steps
    assert step.status.value == "cancelled"
    assert [(e["attempt"], e.get("hook"), [m for _, _, m in e["lines"]]) for e in step.logs] == [
        (1, None, ["start 1"]),
        (1, "on_timeout", ["timed out"]),
        (2, None, ["start 2"]),
        (2, "on_cancel", ["cancelled"]),
    ]


def test_a_rollback_hooks_logging_records_are_captured_when_asked(tmp_path: Path, registry: Registry) -> None:
    """With ``capture_logging``, ``on_rollback``'s ``logging`` records join its own lines, once."""

    def refund(self: Any) -> None:
        logging.getLogger("app.bank").warning("refund sent")
        self.log.info("own line")

    charge = step_of("Charge", lambda self: self.finish(), on_rollback=refund)
    ship = step_of("Ship", lambda self: (_ for _ in ()).throw(RuntimeError("no stock")))
    url = f"sqlite:///{tmp_path / 'capture.db'}"
    uuid = pipeline_of(charge, ship, name="Order").create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry, capture_logging=True)
    orchestrator.execute_pipelines()
    charged = orchestrator.get(uuid).steps[0]
    assert [(e.get("hook"), [m for _, _, m in e["lines"]]) for e in charged.logs] == [
        ("on_rollback", ["app.bank: refund sent", "own line"])
    ]
