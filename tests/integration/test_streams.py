"""Streams (issue #30, item 4): ``self.emit(value)`` appends to the pipeline's stream with the
hook's transition, all or nothing with it; ``Orchestrator.stream`` reads the entries in order,
resumes after a cursor and, following, ends when the pipeline ends; retention removes them with
their pipeline. Real SQLite and TinyDB files, the real PostgreSQL server, the in-memory store and
a user's four-method repository (the seed adapter's fallback)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from prorch import FakeClock, Orchestrator, StepUsageError, WaitTimeoutError
from prorch.cli.commands import main
from prorch.model.registry import Registry
from prorch.model.streams import MAX_ENTRY_BYTES
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of
from tests.support.processes import PRORCH, child_env, wait_for

KINDS = ["sqlite", "postgresql", "memory", "tinydb", "seed", "docs-example"]


def counting(self: Any) -> None:
    """Emits three entries per hook call, waits twice, then finishes."""
    turn = self.metadata.setdefault("turn", 0)
    for index in range(3):
        self.emit({"turn": turn, "i": index})
    self.metadata["turn"] = turn + 1
    if turn < 2:
        self.wait(60)
    else:
        self.finish()


def values(entries: Any) -> list[Any]:
    return [entry.value for entry in entries]


@pytest.mark.parametrize("kind", KINDS)
def test_entries_come_in_order_and_resume_after_a_cursor(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Count", counting, counting), step_of("Tail", lambda s: s.emit("done")), name="Job")
    uuid = job.create(backend, {}).uuid
    other = job.create(backend, {}).uuid
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    orchestrator.execute_pipelines()
    first = list(orchestrator.stream(uuid, follow=False))
    assert values(first) == [{"turn": 0, "i": 0}, {"turn": 0, "i": 1}, {"turn": 0, "i": 2}]
    for _ in range(3):
        clock.advance(61)
        orchestrator.execute_pipelines()
    assert orchestrator.get(uuid).pipeline.status.value == "finished"
    entries = list(orchestrator.stream(uuid))  # follows, and ends: the pipeline has ended
    assert [entry.seq for entry in entries] == list(range(1, 11))
    assert values(entries) == [{"turn": t, "i": i} for t in range(3) for i in range(3)] + ["done"]
    assert all(entry.pipeline_uuid == uuid for entry in entries)
    assert values(orchestrator.stream(uuid, after=first[-1].seq)) == values(entries[3:])
    assert list(orchestrator.stream(uuid, after=10)) == []
    assert [e.seq for e in orchestrator.stream(other)] == list(range(1, 11))  # each pipeline its own


@pytest.mark.parametrize("kind", KINDS)
def test_a_hook_that_raises_stores_no_entry(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)

    def flaky(self: Any) -> None:
        self.emit(f"attempt {self.attempt}")
        if self.attempt < 3:
            raise RuntimeError("flake")
        self.finish()

    uuid = pipeline_of(step_of("Flaky", flaky, max_attempts=3, retry_delay=1), name="Job").create(backend, {}).uuid
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    for _ in range(3):
        orchestrator.execute_pipelines()
        assert values(orchestrator.stream(uuid, follow=False)) in ([], ["attempt 3"])
        clock.advance(60)
    entries = list(orchestrator.stream(uuid))
    assert [(e.seq, e.value) for e in entries] == [(1, "attempt 3")]


def test_rollback_hooks_emit_with_their_transition(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'rollback.db'}"

    def fail(self: Any) -> None:
        self.emit("failing")
        raise RuntimeError("down")

    charge = step_of("Charge", lambda s: s.emit("charged"), on_rollback=lambda s: s.emit("refunded"))
    uuid = pipeline_of(charge, step_of("Ship", fail), name="Job").create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry)
    orchestrator.execute_pipelines()
    assert orchestrator.get(uuid).pipeline.status.value == "failed"
    assert [(e.seq, e.value) for e in orchestrator.stream(uuid)] == [(1, "charged"), (2, "refunded")]


@pytest.mark.parametrize("kind", KINDS)
def test_emit_now_is_stored_at_once_ahead_of_the_hooks_other_entries(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    seen: list[list[Any]] = []
    orchestrator = Orchestrator(backend, registry=registry, clock=FakeClock())

    def live(self: Any) -> None:
        self.emit("with the transition")
        self.emit("at once", now=True)
        seen.append(values(orchestrator.stream(self.pipeline_uuid, follow=False)))  # another reader's view
        if self.attempt == 1:
            raise RuntimeError("flake")
        self.finish()

    uuid = pipeline_of(step_of("Live", live, max_attempts=2, retry_delay=1), name="Job").create(backend, {}).uuid
    orchestrator.execute_pipelines()
    orchestrator.clock.advance(60)  # type: ignore[attr-defined]
    orchestrator.execute_pipelines()
    assert seen == [["at once"], ["at once", "at once"]]  # the first attempt's: kept though it raised
    entries = list(orchestrator.stream(uuid))
    assert [(e.seq, e.value) for e in entries] == [(1, "at once"), (2, "at once"), (3, "with the transition")]


def test_a_bad_value_fails_the_attempt_with_one_clear_error(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"

    def bad(self: Any) -> None:
        self.emit("kept?")
        self.emit({"when": object()})

    def big(self: Any) -> None:
        self.emit("x" * MAX_ENTRY_BYTES)

    orchestrator = Orchestrator(url, registry=registry)
    first = pipeline_of(step_of("Bad", bad), name="Bad").create(url, {}).uuid
    second = pipeline_of(step_of("Big", big), name="Big").create(url, {}).uuid
    orchestrator.execute_pipelines()
    for uuid, expected in ((first, "emit(): value['when']"), (second, "bytes of JSON, more than the")):
        state = orchestrator.get(uuid)
        (step,) = state.steps
        assert state.pipeline.status.value == "failed"
        assert step.error is not None and step.error.type == StepUsageError.__name__
        assert expected in step.error.message
        assert list(orchestrator.stream(uuid)) == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "memory", "tinydb"])
def test_retention_removes_the_stream_with_its_pipeline(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Once", lambda s: s.emit({"n": 1})), name="Job")
    clock = FakeClock()
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    gone = job.create(backend, {}, clock=clock).uuid
    orchestrator.execute_pipelines()
    clock.advance(2 * 86400)
    kept = job.create(backend, {}, clock=clock).uuid
    orchestrator.execute_pipelines()
    assert orchestrator.store.last_stream_seq(gone) == 1
    assert orchestrator.purge(timedelta(days=1)).pipelines == 1
    assert orchestrator.store.last_stream_seq(gone) == 0
    assert orchestrator.store.stream_entries(gone) == []
    assert values(orchestrator.stream(kept)) == [{"n": 1}]


def test_following_ends_when_the_pipeline_ends(tmp_path: Path, registry: Registry) -> None:
    """A reader follows while a worker (a thread here) runs the pipeline, and stops once the
    pipeline has ended and its last transition's entries are read."""
    url = f"sqlite:///{tmp_path / 'follow.db'}"

    def ticking(self: Any) -> None:
        turn = self.metadata.setdefault("turn", 0)
        self.emit(turn)
        self.metadata["turn"] = turn + 1
        if turn == 4:
            self.finish()

    uuid = pipeline_of(step_of("Tick", ticking, ticking), name="Job").create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry)
    reader = Orchestrator(url, registry=registry)
    worker = threading.Thread(target=lambda: [orchestrator.execute_pipelines() or time.sleep(0.05) for _ in range(5)])
    worker.start()
    try:
        assert values(reader.stream(uuid, timeout=60, poll=0.05)) == [0, 1, 2, 3, 4]
    finally:
        worker.join(60)
    assert reader.get(uuid).pipeline.status.value == "finished"
    with pytest.raises(WaitTimeoutError, match="no end within"):  # a pipeline that never ends
        waiting = pipeline_of(step_of("Idle", lambda s: s.emit(1), lambda s: s.wait(3600)), name="Idle")
        idle = waiting.create(url, {}).uuid
        orchestrator.execute_pipelines()
        list(reader.stream(idle, timeout=0.3, poll=0.05))


def test_prorch_stream_prints_resumes_and_follows(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    job = pipeline_of(step_of("Count", counting, counting), name="Job")
    uuid = job.create(url, {}).uuid
    clock = FakeClock()
    orchestrator = Orchestrator(url, registry=registry, clock=clock)
    orchestrator.execute_pipelines()
    shown = CliRunner().invoke(main, ["-r", url, "stream", uuid])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["1", "2", "3"]
    assert lines[0].endswith('{"turn": 0, "i": 0}')
    resumed = CliRunner().invoke(main, ["-r", url, "stream", uuid, "--after", "2", "--json"])
    assert [json.loads(line)["seq"] for line in resumed.stdout.splitlines()] == [3]
    assert json.loads(resumed.stdout)["value"] == {"turn": 0, "i": 2}
    timed_out = CliRunner().invoke(main, ["-r", url, "stream", uuid, "--follow", "--timeout", "0.2"])
    assert timed_out.exit_code == 1 and "no end within" in timed_out.stderr
    for _ in range(2):
        clock.advance(61)
        orchestrator.execute_pipelines()
    followed = CliRunner().invoke(main, ["-r", url, "stream", uuid, "--follow", "--after", "3", "--json"])
    assert followed.exit_code == 0, followed.output
    assert [json.loads(line)["seq"] for line in followed.stdout.splitlines()] == list(range(4, 10))
    missing = CliRunner().invoke(main, ["-r", url, "stream", "no-such-uuid"])
    assert missing.exit_code != 0 and "no-such-uuid" in missing.stderr


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` served by a real uvicorn on a free local port, in a thread."""
    uvicorn = pytest.importorskip("uvicorn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def sse_events(body: str) -> list[dict[str, str]]:
    """The events of a text/event-stream body (comments left out)."""
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            found.append(fields)
    return found


def test_the_dashboard_serves_the_stream_as_server_sent_events(tmp_path: Path, registry: Registry) -> None:
    pytest.importorskip("starlette")
    from prorch.dashboard.app import create_app

    url = f"sqlite:///{tmp_path / 'sse.db'}"
    job = pipeline_of(step_of("Count", counting, counting), name="Job")
    uuid = job.create(url, {}).uuid
    clock = FakeClock()
    orchestrator = Orchestrator(url, registry=registry, clock=clock)
    orchestrator.execute_pipelines()
    with serving(create_app(Orchestrator(url, registry=registry))) as base:

        def finish_later() -> None:
            time.sleep(0.5)  # the client is following by then: the rest arrives while it waits
            for _ in range(2):
                clock.advance(61)
                orchestrator.execute_pipelines()

        worker = threading.Thread(target=finish_later)
        worker.start()
        with urllib.request.urlopen(f"{base}/api/pipelines/{uuid}/stream?after=1", timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response.read().decode())  # returns once the server ends the stream
        worker.join(60)
        entries, end = events[:-1], events[-1]
        assert [int(e["id"]) for e in entries] == list(range(2, 10))
        assert [json.loads(e["data"])["seq"] for e in entries] == list(range(2, 10))
        assert json.loads(entries[0]["data"])["value"] == {"turn": 0, "i": 1}
        assert end == {"event": "end", "data": '{"status": "finished"}'}
        request = urllib.request.Request(f"{base}/api/pipelines/{uuid}/stream", headers={"Last-Event-ID": "8"})
        with urllib.request.urlopen(request, timeout=60) as response:  # a reconnecting EventSource
            assert [e.get("id") for e in sse_events(response.read().decode())] == ["9", None]
        for path, code in (("no-such-uuid/stream", 404), (f"{uuid}/stream?after=x", 400)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}/api/pipelines/{path}", timeout=60)
            assert refused.value.code == code and "error" in json.loads(refused.value.read())


@pytest.mark.slow
def test_stream_order_and_resume_under_a_sigkilled_emitter(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """A real ``prorch worker`` whose hook emits, then blocks, is SIGKILLed; another worker reruns
    the step. The stream holds exactly the committed entries, in order, with no gap and no
    duplicate: the killed hook's entries were never stored, its rerun's are."""
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///jobs.db"\napp = ["fault_app"]\n')
    log = tmp_path / "log"

    def worker(**env: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [PRORCH, "worker", "--interval", "0.2", "--lease-seconds", "3"],
            cwd=tmp_path, env=child_env(FAULT_LOG=str(log), **env), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        processes.append(process)
        return process

    def stream(*args: str) -> list[dict[str, Any]]:
        done = subprocess.run(
            [PRORCH, "stream", uuid, "--json", *args], cwd=tmp_path, env=child_env(), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    started = subprocess.run(
        [PRORCH, "start", "Streaming"], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    uuid = started.stdout.strip()
    doomed = worker(STREAM_BLOCK="1")
    wait_for(lambda: log.exists() and "blocked" in log.read_text(), 30, "the hook to block after emitting")
    before = stream()
    assert [(e["seq"], e["value"]["v"], e["value"]["pid"]) for e in before] == [
        (1, "a", doomed.pid),
        (2, "b", doomed.pid),
    ]  # on_start's transition is stored; on_continue's entries are not (its transition is not)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(30)
    rescuer = worker()
    followed = subprocess.run(
        [PRORCH, "stream", uuid, "--json", "--follow", "--after", "1", "--timeout", "60"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert followed.returncode == 0, followed.stderr
    after = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [(e["seq"], e["value"]["v"], e["value"]["pid"]) for e in after] == [
        (2, "b", doomed.pid),
        (3, "c", rescuer.pid),
        (4, "d", rescuer.pid),
    ]
    assert [e["seq"] for e in stream()] == [1, 2, 3, 4]
