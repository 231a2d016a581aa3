"""Bulk actions by filter (issue #29 item 2): cancel, retry, rerun and purge every pipeline the
listing's filters match, page by page, each as its single action would, with a dry run that
changes nothing; a worker process running meanwhile loses and doubles nothing. Memory, SQLite, TinyDB,
PostgreSQL, and the CLI (count, confirmation, summary, exit code)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from prorch import FakeClock, InvalidParamsError, Orchestrator, Status
from prorch.bulk import BulkAction, Filters, any_filter
from prorch.model.registry import Registry
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of
from tests.support.processes import child_env, wait_for


def work(step: Any) -> None:
    if step.params.get("broken"):
        step.fail("broken input")
    elif step.params.get("hold"):
        step.wait(seconds=3600)
    else:
        step.finish({"x": step.params["x"]})


def report(step: Any) -> None:
    step.finish({"done": step.outputs["Work"]["x"]})


@pytest.fixture(params=["memory", "sqlite", "postgresql", "tinydb"])
def orchestrator(request: pytest.FixtureRequest, tmp_path: Path, registry: Registry) -> Any:
    pipeline_of(step_of("Work", work, work, max_attempts=1), step_of("Report", report), name="Job")
    pipeline_of(step_of("Other", work, work, max_attempts=1), name="Other")
    backend = make_backend(request.param, tmp_path, request)
    yield Orchestrator(backend, registry=registry, clock=FakeClock())
    if hasattr(backend, "dispose"):
        backend.dispose()


def create(orchestrator: Orchestrator, name: str, n: int, **params: Any) -> list[str]:
    cls = orchestrator.registry.pipeline(name)
    tenant = params.pop("tenant", None)
    return [
        cls.create(orchestrator.store.backend, {"x": i, **params}, clock=orchestrator.clock, tenant=tenant).uuid
        for i in range(n)
    ]


def statuses(orchestrator: Orchestrator, uuids: list[str]) -> Counter[str]:
    return Counter(orchestrator.get(uuid).pipeline.status.value for uuid in uuids)


def test_retry_by_filter_takes_only_the_failed_matches_page_by_page(orchestrator: Orchestrator) -> None:
    failed = create(orchestrator, "Job", 25, broken=True)
    finished = create(orchestrator, "Job", 5)
    other = create(orchestrator, "Other", 4, broken=True)
    orchestrator.execute_pipelines()
    assert statuses(orchestrator, failed + other) == {"failed": 29}

    dry = orchestrator.bulk("retry", Filters(name="Job"), dry_run=True, batch_size=7)
    assert (dry.matched, dry.done, dry.skipped) == (30, 25, 5)
    assert dry.skipped_why == {"finished, not failed": 5}
    assert statuses(orchestrator, failed) == {"failed": 25}  # a dry run changes nothing

    pages: list[int] = []
    summary = orchestrator.bulk("retry", Filters(name="Job"), batch_size=7, progress=pages.append)
    assert (summary.matched, summary.done, summary.skipped, summary.failed) == (30, 25, 5, 0)
    assert pages == [7, 7, 7, 7, 2]
    assert statuses(orchestrator, failed) == {"pending": 25}
    assert statuses(orchestrator, other) == {"failed": 4}  # another name is not matched
    assert statuses(orchestrator, finished) == {"finished": 5}


def test_cancel_by_tenant_and_status(orchestrator: Orchestrator) -> None:
    acme = create(orchestrator, "Job", 6, hold=True, tenant="acme")
    globex = create(orchestrator, "Job", 3, hold=True, tenant="globex")
    orchestrator.execute_pipelines()  # all wait an hour
    summary = orchestrator.bulk("cancel", Filters(tenant="acme", status="pending"), batch_size=4)
    assert (summary.done, summary.skipped) == (6, 0)
    assert statuses(orchestrator, acme) == {"cancelled": 6}
    assert statuses(orchestrator, globex) == {"pending": 3}
    again = orchestrator.bulk("cancel", Filters(tenant="acme"))
    assert (again.done, again.skipped, dict(again.skipped_why)) == (0, 6, {"already cancelled": 6})


def test_rerun_by_filter_forks_each_failed_one_once(orchestrator: Orchestrator) -> None:
    failed = create(orchestrator, "Job", 12, broken=True)
    orchestrator.execute_pipelines()
    action = BulkAction("rerun", from_step="Work", params={"broken": False})
    summary = orchestrator.bulk(action, Filters(name="Job", status="failed"), batch_size=5)
    assert summary.done == 12 and len(set(summary.created)) == 12  # the new ones are not rerun again
    orchestrator.execute_pipelines()
    assert statuses(orchestrator, summary.created) == {"finished": 12}
    assert statuses(orchestrator, failed) == {"failed": 12}  # the originals are left as they were
    forked = {orchestrator.get(uuid).pipeline.metadata["forked_from"]["uuid"] for uuid in summary.created}
    assert forked == set(failed)


def test_purge_by_filter_deletes_only_matching_ended_pipelines(orchestrator: Orchestrator) -> None:
    create(orchestrator, "Job", 8)
    others = create(orchestrator, "Other", 3)
    waiting = create(orchestrator, "Job", 2, hold=True)
    for _ in range(3):
        orchestrator.execute_pipelines()
    orchestrator.clock.advance(seconds=10)  # type: ignore[attr-defined]
    action = BulkAction("purge", statuses=(Status.FINISHED,))
    summary = orchestrator.bulk(action, Filters(name="Job"), batch_size=3)
    assert (summary.done, summary.skipped) == (8, 2)
    assert {p.uuid for p in orchestrator.list_pipelines()} == set(others + waiting)


def test_bad_arguments_store_nothing(orchestrator: Orchestrator) -> None:
    create(orchestrator, "Job", 2, broken=True)
    orchestrator.execute_pipelines()
    with pytest.raises(InvalidParamsError, match="needs from_step"):
        orchestrator.bulk("rerun", Filters(name="Job"))
    with pytest.raises(InvalidParamsError, match="use one of cancel, retry, rerun, purge"):
        orchestrator.bulk("delete", Filters(name="Job"))
    with pytest.raises(InvalidParamsError, match="batch_size"):
        orchestrator.bulk("retry", Filters(name="Job"), batch_size=0)
    assert len(orchestrator.list_pipelines()) == 2
    assert {p.status for p in orchestrator.list_pipelines()} == {Status.FAILED}


APP = """
    import os
    from pathlib import Path
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    LOG = Path(os.environ["BULK_LOG"])

    @register_step
    class Flaky(OnStartMixin, Step):
        name = "Flaky"
        max_attempts = 1

        def on_start(self):
            fixed = Path(os.environ["BULK_FIXED"]).exists()
            with LOG.open("a") as log:
                log.write(f"{self.pipeline_uuid} {'ok' if fixed else 'fail'}\\n")
            if not fixed:
                self.fail("not fixed yet")
            else:
                self.finish({"ok": True})

    @register_pipeline
    class Flakes(Pipeline):
        name = "Flakes"
        steps = [Flaky]
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_bulk_retry_while_a_worker_runs_loses_and_doubles_nothing(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "bulk_app.py").write_text(textwrap.dedent(APP))
    url = f"sqlite:///{tmp_path / 'bulk.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    env = child_env(BULK_LOG=str(tmp_path / "hooks.log"), BULK_FIXED=str(tmp_path / "fixed"))
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    cli = [sys.executable, "-m", "prorch", "--repository", url, "--app", "bulk_app"]
    n = 600
    seed = "import bulk_app, sys\nfrom repositories import from_url\nb = from_url(sys.argv[1])\n"
    seed += f"bulk_app.Flakes.create_many(b, [{{'i': i}} for i in range({n})])\n"
    subprocess.run([sys.executable, "-c", seed, url], env=env, check=True, cwd=tmp_path)
    subprocess.run([*cli, "run", "--batch-size", "1000"], env=env, check=False, cwd=tmp_path, capture_output=True)
    (tmp_path / "fixed").touch()
    worker = subprocess.Popen(
        [*cli, "worker", "--interval", "0.05", "--batch-size", "50"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        retried = subprocess.run(
            [*cli, "retry", "--name", "Flakes", "--status", "failed", "--batch-size", "40", "--yes"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.strip() == f"retried {n} of {n} matching"

        def finished() -> bool:
            listed = subprocess.run([*cli, "list", "--status", "finished", "--json", "--limit", "1"], env=env,
                                    cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
            return bool(listed.returncode == 0 and json.loads(listed.stdout)["total"] == n)

        wait_for(finished, 240, f"all {n} retried pipelines to finish", poll=1.0)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    lines = (tmp_path / "hooks.log").read_text().split()
    runs = Counter(zip(lines[::2], lines[1::2], strict=True))
    assert len({uuid for uuid, _ in runs}) == n
    assert set(runs.values()) == {1}  # each pipeline failed once and succeeded once: nothing doubled
    assert Counter(outcome for _, outcome in runs) == {"fail": n, "ok": n}


def test_the_cli_counts_confirms_and_refuses_a_uuid_with_filters(tmp_path: Path) -> None:
    (tmp_path / "bulk_app.py").write_text(textwrap.dedent(APP))
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = child_env(BULK_LOG=str(tmp_path / "hooks.log"), BULK_FIXED=str(tmp_path / "fixed"))
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    cli = [sys.executable, "-m", "prorch", "--repository", url, "--app", "bulk_app"]

    def prorch(*args: str, answer: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              input=answer, timeout=120)  # fmt: skip

    seed = "import bulk_app, sys\nbulk_app.Flakes.create_many(sys.argv[1], [{'i': i} for i in range(12)])\n"
    subprocess.run([sys.executable, "-c", seed, url], env=env, check=True, cwd=tmp_path)  # one process, not 12
    assert "failed 12" in prorch("run").stderr  # every hook failed
    both = prorch("retry", "0" * 8, "--name", "Flakes")
    assert both.returncode == 2 and "not both" in both.stderr
    neither = prorch("retry")
    assert neither.returncode == 2 and "give a pipeline's UUID, or filters" in neither.stderr
    dry = prorch("retry", "--name", "Flakes", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip() == "would retry 12 of 12 matching"
    refused = prorch("retry", "--name", "Flakes", answer="n\n")
    assert refused.returncode == 1 and "retry up to 12 pipelines?" in refused.stderr
    assert json.loads(prorch("list", "--status", "failed", "--json").stdout)["total"] == 12
    done = prorch("retry", "--name", "Flakes", answer="y\n")
    assert done.returncode == 0 and done.stdout.strip() == "retried 12 of 12 matching"
    again = prorch("retry", "--name", "Flakes", "--yes")
    assert again.stdout.strip() == "retried 0 of 12 matching (12 skipped: 12 pending, not failed)"
    assert json.loads(prorch("list", "--status", "pending", "--json").stdout)["total"] == 12


def test_one_rule_says_whether_a_filter_was_given() -> None:
    """The CLI's options (a repeatable ``--attr`` is () when not given) and ``Filters`` (no
    attributes: {}) are judged by one rule, ``prorch.bulk.any_filter``."""
    assert not any_filter({"name": None, "attrs": ()}.values())
    assert any_filter({"name": None, "attrs": ("customer=acme",)}.values())
    assert any_filter({"version": 0}.values())  # 0 is a value
    assert not Filters(attributes={}).given()
    assert Filters(attributes={"customer": "acme"}).given()
    assert Filters(version=0).given()
