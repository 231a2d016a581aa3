"""A worker frozen past its lease (SIGSTOP, a VM pause) with real processes (issue #25 item 7).

No library can stop a frozen process's code from going on once it is resumed: its hook runs to
its end beside the new holder's. What prorch promises (docs/concepts.md, "Leases") is that the
resumed worker's writes are refused, it notices the lease it lost (a log line and the
``prorch_leases_lost`` metric), and it starts no further hook of that pipeline, which another
worker carries to its end exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from prorch import Orchestrator, Status
from prorch.model.status import EventType
from tests.support.postgres import free_port
from tests.support.processes import child_env, wait_for

APP = """
    import os, time
    from pathlib import Path
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    LOG = Path(os.environ["FROZEN_LOG"])

    def note(text):
        with LOG.open("a") as log:
            log.write(f"{text} {os.getpid()}\\n")

    @register_step
    class Long(OnStartMixin, Step):
        name = "Long"
        timeout = 60

        def on_start(self):
            note("long-start")
            time.sleep(float(os.environ["FROZEN_HOOK_SECONDS"]))
            note("long-end")
            self.finish({"by": os.getpid()})

    @register_step
    class After(OnStartMixin, Step):
        name = "After"

        def on_start(self):
            note("after")
            self.finish({"by": os.getpid()})

    @register_pipeline
    class Frozen(Pipeline):
        name = "Frozen"
        steps = [Long, After]
"""


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_frozen_worker_resumed_after_losing_its_lease_writes_nothing_and_says_so(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, processes: list[subprocess.Popen[bytes]]
) -> None:
    pytest.importorskip("prometheus_client")
    (tmp_path / "frozen_app.py").write_text(textwrap.dedent(APP))
    url = f"sqlite:///{tmp_path / 'frozen.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    log = tmp_path / "hooks.log"
    env = child_env(FROZEN_LOG=str(log), FROZEN_HOOK_SECONDS="4")
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    started = subprocess.run(
        [sys.executable, "-m", "prorch", "-r", url, "--app", "frozen_app", "start", "Frozen"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    uuid = started.stdout.strip()

    def worker(name: str, port: int) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.err").open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "prorch", "-r", url, "--app", "frozen_app", "worker", "--interval", "0.1",
                 "--lease-seconds", "2", "--metrics-port", str(port)],
                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=sink,
            )  # fmt: skip
        processes.append(process)
        return process

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    a_port, b_port = free_port(), free_port()
    first = worker("a", a_port)
    wait_for(lambda: any(line.startswith("long-start") for line in lines()), 60, "worker A to start the hook")
    first.send_signal(signal.SIGSTOP)  # frozen mid-hook, its lease (2 s) left to run out
    second = worker("b", b_port)
    wait_for(lambda: len([x for x in lines() if x.startswith("long-start")]) == 2, 60, "worker B to take over")
    first.send_signal(signal.SIGCONT)  # A's hook goes on (nothing can stop it) beside B's

    orchestrator = Orchestrator(url)
    wait_for(lambda: orchestrator.get(uuid).pipeline.status == Status.FINISHED, 60, "the pipeline to finish")
    wait_for(lambda: sum(x.startswith("long-end") for x in lines()) == 2, 30, "A's hook to end too")
    a_err = (tmp_path / "a.err").read_text()
    wait_for(lambda: metric(a_port, "prorch_leases_lost_total") >= 1, 30, "A to count the lost lease")

    starts = [x.split() for x in lines() if x.startswith("long-start")]
    assert [int(pid) for _, pid in starts] == [first.pid, second.pid]
    afters = [x.split() for x in lines() if x.startswith("after")]
    assert [int(pid) for _, pid in afters] == [second.pid]  # A started no further hook of it
    finished = [e for e in orchestrator.history(uuid) if e.type == EventType.STEP_FINISHED]
    assert len(finished) == 2  # Long once, After once: A's late finish was refused
    assert orchestrator.result(uuid) == {"by": second.pid}
    assert f"lease of pipeline {uuid} was lost" in (tmp_path / "a.err").read_text(), a_err
    assert "Traceback" not in (tmp_path / "a.err").read_text()
    assert first.poll() is None and second.poll() is None  # both still serve
    for process in (first, second):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    if hasattr(orchestrator.store.backend, "dispose"):
        orchestrator.store.backend.dispose()
