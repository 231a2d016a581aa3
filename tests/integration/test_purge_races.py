"""Purges racing real processes (issue #25), on PostgreSQL and SQLite: two ``prorch purge`` at
once, while another process retries failed pipelines. Before the fix, a retry landing between a
purge's choice of its batch and its delete was deleted while pending (4 of 4,500 on
PostgreSQL), and two purges at once died with ``deadlock detected``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prorch import Orchestrator
from prorch.model.registry import Registry
from prorch.model.status import Status

PRORCH = str(Path(sys.executable).parent / "prorch")
COUNT = 1500
JOBS = (
    "from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step\n"
    "@register_step\nclass Broken(OnStartMixin, Step):\n    name = 'Broken'\n"
    "    def on_start(self):\n        self.fail('no')\n"
    "@register_pipeline\nclass Brokens(Pipeline):\n    name = 'Brokens'\n    steps = [Broken]\n"
)
RETRY = (
    "import sys\nimport jobs\nfrom prorch import Orchestrator, ProrchError\n"
    "orchestrator = Orchestrator(sys.argv[1])\n"
    "for uuid in sys.stdin.read().split():\n"
    "    try:\n        orchestrator.retry(uuid)\n    except ProrchError:\n        continue\n"
    "    print(uuid, flush=True)\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_two_purges_and_a_retrying_process_at_once(
    kind: str, tmp_path: Path, registry: Registry, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    (tmp_path / "jobs.py").write_text(JOBS)
    sys.path.insert(0, str(tmp_path))
    try:
        import jobs  # noqa: F401 - registers Brokens in this test's registry
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("jobs", None)
    setup = Orchestrator(url, registry=registry, batch_size=500)
    uuids = [p.uuid for p in registry.pipeline("Brokens").create_many(url, [{"n": n} for n in range(COUNT)])]
    while setup.execute_pipelines().claimed:
        pass
    assert all(setup.store.get_pipeline(uuid).status == Status.FAILED for uuid in uuids[:5])  # type: ignore[union-attr]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    purge = [PRORCH, "-r", url, "--app", "jobs", "purge", "--older-than", "0s", "--status", "failed",
             "--batch-size", "50"]  # fmt: skip
    run = {"cwd": tmp_path, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    retrier = subprocess.Popen([sys.executable, "-c", RETRY, url], stdin=subprocess.PIPE, **run)  # type: ignore[call-overload]
    purges = [subprocess.Popen(purge, **run) for _ in range(2)]  # type: ignore[call-overload]
    retried_out, retry_log = retrier.communicate("\n".join(reversed(uuids)), timeout=300)
    outputs = [p.communicate(timeout=300) for p in purges]
    assert retrier.returncode == 0, retry_log
    for process, (_, log) in zip(purges, outputs, strict=True):
        assert process.returncode == 0 and "deadlock" not in log.lower(), log
    retried = retried_out.split()
    purged = sum(int(out.split()[1]) for out, _ in outputs)
    store = Orchestrator(url, registry=registry).store
    kept = [store.get_pipeline(uuid) for uuid in retried]
    assert [p.status if p else None for p in kept] == [Status.PENDING] * len(retried)  # none deleted
    stored = sum(store.get_pipeline(uuid) is not None for uuid in uuids)
    assert (purged, stored) == (COUNT - len(retried), len(retried))  # the rest purged, each once
