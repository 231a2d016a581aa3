"""A rolling deploy (issue #25, item 8): an old worker, whose code lacks a new pipeline class
and a new version of an old one, runs beside a new worker that has them. The old worker's claim
takes only the classes it has, so it never claims (and puts off by a lease) the new ones: every
pipeline finishes at the new worker's pace. Real `prorch worker` processes on SQLite and
PostgreSQL; what each worker claimed is read from its own log, not from timing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prorch import Orchestrator
from prorch.model.registry import isolated_registry

PRORCH = str(Path(sys.executable).parent / "prorch")
OLD_APP = """
    import os
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    @register_step
    class Work(OnStartMixin, Step):
        name = "Work"

        def on_start(self):
            self.finish({"pid": os.getpid()})

    @register_pipeline
    class Job(Pipeline):
        name = "Job"
        steps = [Work]
"""
NEW_APP = (
    OLD_APP
    + """
    @register_pipeline
    class JobV2(Pipeline):
        name = "Job"
        version = 2
        steps = [Work]

    @register_pipeline
    class Fresh(Pipeline):
        name = "Fresh"
        steps = [Work]
"""
)


def start_worker(url: str, app: str, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / f"{app}.log"
    command = [PRORCH, "-r", url, "--app", app, "--log-level", "INFO", "worker", "--interval", "0.1"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink, stderr=sink, text=True)
    return process, log


def wait_until(done: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_old_worker_never_claims_the_classes_it_lacks(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'deploy.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    (tmp_path / "old_app.py").write_text(textwrap.dedent(OLD_APP))
    (tmp_path / "new_app.py").write_text(textwrap.dedent(NEW_APP))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    sys.path.insert(0, str(tmp_path))
    try:
        with isolated_registry() as registry:
            import new_app  # noqa: F401 - registers the new code here, to create its pipelines

            old = [registry.pipeline("Job", 1).create(url, {}).uuid for _ in range(10)]
            new = [registry.pipeline("Job", 2).create(url, {}).uuid for _ in range(20)]
            new += [registry.pipeline("Fresh").create(url, {}).uuid for _ in range(20)]
    finally:
        sys.modules.pop("new_app", None)
        sys.path.remove(str(tmp_path))
    orchestrator = Orchestrator(url)

    def finished(uuids: list[str]) -> bool:
        return all(orchestrator.store.get_pipeline(u).status.value == "finished" for u in uuids)  # type: ignore[union-attr]

    # the old worker alone first, every pipeline due: it runs its own and must leave the others
    old_worker, old_log = start_worker(url, "old_app", tmp_path, env)
    new_worker = None
    try:
        assert wait_until(lambda: finished(old), 60), old_log.read_text()
        time.sleep(0.5)  # a few more passes of the old worker over the new classes, still due
        new_worker, _ = start_worker(url, "new_app", tmp_path, env)
        # promptly: a claim by the old worker would have put each off by the 60 s lease
        assert wait_until(lambda: finished(new), 40), old_log.read_text()
    finally:
        for process in (old_worker, new_worker):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    old_text = old_log.read_text()
    claimed = [int(n) for n in re.findall(r"worker: claimed (\d+)", old_text)]  # its summary lines
    assert sum(claimed) == len(old), old_text  # it claimed its own ten, and nothing else
    assert "blocked" not in old_text.replace("blocked 0", ""), old_text
    new_pid = new_worker.pid if new_worker is not None else None
    assert {orchestrator.get(u).steps[0].output["pid"] for u in new} == {new_pid}  # type: ignore[index]
