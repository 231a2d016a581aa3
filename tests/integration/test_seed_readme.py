"""The prorch 1.0.1 README's code runs unchanged, through its own import paths, against a real
TinyDB file; its pipeline reaches `finished` after repeated orchestrator passes, each in a new
process (as from cron)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SEED = Path(__file__).parent / "seed_readme"
ROOT = Path(__file__).resolve().parents[2]


def run(script: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)])}
    done = subprocess.run([sys.executable, script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def app(tmp_path: Path) -> Path:
    for name in ("your_repository_implementation.py", "pipelines.py", "start.py", "orchestrate.py"):
        shutil.copy(SEED / name, tmp_path / name)
    return tmp_path


def stored(app: Path) -> dict[str, dict[str, dict[str, object]]]:
    return json.loads((app / "database.json").read_text())  # type: ignore[no-any-return]


def test_seed_readme_pipeline_finishes_after_repeated_passes(app: Path) -> None:
    out = run("start.py", app)
    assert "Starting the backup generation process." in out
    assert "Backup generation completed." in out
    uuid = out.split("UUID ")[1].strip()

    data = stored(app)
    (pipeline,) = data["pipelines"].values()
    assert pipeline["uuid"] == uuid and pipeline["status"] == "pending"
    statuses = {s["name"]: s["status"] for s in data["pipeline_steps"].values()}
    assert statuses == {
        "BackupGeneration": "finished",
        "BackupTransfer": "pending",
        "ProcessCompletionNotification": "created",
    }

    outputs = [run("orchestrate.py", app) for _ in range(3)]
    assert "Transfer check 2" in outputs[0]
    assert "Transfer check 3" in outputs[1] and "Notification sent." in outputs[1]
    assert outputs[2] == ""  # nothing pending any more

    data = stored(app)
    (pipeline,) = data["pipelines"].values()
    assert pipeline["status"] == "finished"
    assert all(s["status"] == "finished" for s in data["pipeline_steps"].values())
    events = [e["type"] for e in data["pipeline_events"].values()]
    assert events.count("step.finished") == 3 and events[-1] == "pipeline.finished"


def test_seed_created_pipeline_is_not_run_without_start(app: Path) -> None:
    (app / "create_only.py").write_text(
        "from pipelines import BackupAutomationPipeline\n"
        "from your_repository_implementation import TinyDBRepository\n"
        "BackupAutomationPipeline(repository_class=TinyDBRepository)\n"
    )
    run("create_only.py", app)
    assert run("orchestrate.py", app) == ""
    (pipeline,) = stored(app)["pipelines"].values()
    assert pipeline["status"] == "created"


ONE_PROCESS = """
import pipelines
from prorch.dataclasses.orchestrator import OrchestratorConfig
from prorch.orchestrator import Orchestrator
from your_repository_implementation import TinyDBRepository

orchestrator = Orchestrator(config=OrchestratorConfig(repository_class=TinyDBRepository))
for _ in range(3):
    pipeline = pipelines.BackupAutomationPipeline(repository_class=TinyDBRepository)
    pipeline.start()
    orchestrator.execute_pipelines()
print("started 3")
"""


def test_seed_readme_creates_beside_a_running_orchestrator_in_one_process(app: Path) -> None:
    """Regression: a seed TinyDB repository opens its file per instance, and each store made
    its own instances, so a create after a pass in the same process (a web app with an
    orchestrator thread) failed with TinyDB's "Document with ID 3 already exists"."""
    (app / "one_process.py").write_text(ONE_PROCESS)
    assert "started 3" in run("one_process.py", app)
    pipelines = stored(app)["pipelines"]
    assert len(pipelines) == 3
