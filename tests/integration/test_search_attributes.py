"""Search attributes (issue #29, item 6): given at create and by ``self.set_attribute`` (stored
with the hook's transition, all or nothing), filtered in listings and bulk actions, indexed in
``pipeline_attributes`` on SQL stores (kept by triggers, group commit included), removed with
the pipeline by retention and purge, copied by a rerun. Real SQLite and TinyDB files, the real
PostgreSQL server, the in-memory store and a user's four-method repository."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select, text

from prorch import FakeClock, InvalidParamsError, Orchestrator
from prorch.bulk import BulkAction, Filters
from prorch.model.registry import Registry
from prorch.storage.repository import PipelineQuery
from prorch.storage.store import Store
from repositories import from_url
from repositories.schema import TABLES, pipeline_attributes
from repositories.sql_listing import listing
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of
from tests.support.grouped import run_grouped_counting

KINDS = ["sqlite", "postgresql", "memory", "tinydb", "seed"]
SQL = ["sqlite", "postgresql"]


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    made = make_backend(request.param, tmp_path, request)
    yield made
    if hasattr(made, "dispose"):
        made.dispose()


def labelled(self: Any) -> None:
    """A hook that labels its pipeline by its params and finishes."""
    if self.params.get("label") is not None:
        self.set_attribute("stage", self.params["label"])
    if self.params.get("drop"):
        self.set_attribute("customer", None)
    if self.params.get("explode"):
        raise RuntimeError("boom after set_attribute")
    self.finish()


def index_rows(backend: Any) -> set[tuple[str, str, str]]:
    engine: Engine = backend.engine
    with engine.connect() as connection:
        a = pipeline_attributes.c
        return {tuple(row) for row in connection.execute(select(a.pipeline_uuid, a.name, a.value))}  # type: ignore[misc]


def uuids(page: Any) -> set[str]:
    return {p.uuid for p in page.pipelines}


def test_created_and_hook_set_attributes_are_filtered(backend: Any, registry: Registry) -> None:
    job = pipeline_of(step_of("Label", labelled), name="Job")
    acme = job.create(backend, {"label": "billed"}, attributes={"customer": "acme", "region": "eu"}).uuid
    other = job.create(backend, {}, attributes={"customer": "globex", "region": "eu"}).uuid
    dropped = job.create(backend, {"drop": True}, attributes={"customer": "acme"}).uuid
    orchestrator = Orchestrator(backend, registry=registry)
    assert uuids(orchestrator.query(attributes={"customer": "acme"})) == {acme, dropped}
    assert uuids(orchestrator.query(attributes={"region": "eu", "customer": "globex"})) == {other}
    assert orchestrator.query(attributes={"customer": "ACME"}, count=True).total == 0

    orchestrator.execute_pipelines()

    assert orchestrator.get(acme).pipeline.attributes == {"customer": "acme", "region": "eu", "stage": "billed"}
    assert uuids(orchestrator.query(attributes={"stage": "billed"})) == {acme}
    assert uuids(orchestrator.query(attributes={"customer": "acme"}, count=True)) == {acme}  # dropped's is gone
    assert orchestrator.get(dropped).pipeline.attributes == {}
    if hasattr(backend, "engine"):  # the index holds exactly the stored attributes
        assert index_rows(backend) == {
            (acme, "customer", "acme"), (acme, "region", "eu"), (acme, "stage", "billed"),
            (other, "customer", "globex"), (other, "region", "eu"),
        }  # fmt: skip


def test_a_hook_that_raises_sets_no_attribute(backend: Any, registry: Registry) -> None:
    job = pipeline_of(step_of("Label", labelled), name="Job")
    uuid = job.create(backend, {"label": "x", "explode": True}, attributes={"customer": "acme"}).uuid
    orchestrator = Orchestrator(backend, registry=registry)
    orchestrator.execute_pipelines()
    state = orchestrator.get(uuid)
    assert state.pipeline.status.value == "failed"
    assert state.pipeline.attributes == {"customer": "acme"}
    assert orchestrator.query(attributes={"stage": "x"}).pipelines == []


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"customer": 42}, r"attribute customer=42: values are strings; pass str\(value\)"),
        ({"9lives": "x"}, "attribute name '9lives': use 1 to 64 letters"),
        ({"customer": "x" * 201}, "at most 200 characters"),
        ({f"a{i}": "x" for i in range(33)}, "at most 32"),
        (["customer"], "attributes must be a dict"),
    ],
)
@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_bad_attributes_are_one_clear_error_and_store_nothing(
    kind: str, attributes: Any, message: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Label", labelled), name="Job")
    with pytest.raises(InvalidParamsError, match=message):
        job.create(backend, {}, attributes=attributes)
    assert Store(backend).all_pipelines() == []


def test_a_bad_set_attribute_fails_the_attempt_and_stores_nothing(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    job = pipeline_of(step_of("Label", lambda self: self.set_attribute("n", 3)), name="Job")
    uuid = job.create(url, {}).uuid
    orchestrator = Orchestrator(url, registry=registry)
    orchestrator.execute_pipelines()
    state = orchestrator.get(uuid)
    assert state.steps[0].error is not None
    assert state.steps[0].error.type == "StepUsageError"
    assert "set_attribute: attribute n=3: values are strings" in state.steps[0].error.message
    assert state.pipeline.attributes == {}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "memory", "tinydb"])
def test_retention_and_purge_remove_the_attributes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Label", labelled), name="Job")
    clock = FakeClock()
    old = [job.create(backend, {}, attributes={"customer": "acme"}, clock=clock).uuid for _ in range(3)]
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    orchestrator.execute_pipelines()
    clock.advance(timedelta(days=40).total_seconds())
    young = job.create(backend, {}, attributes={"customer": "acme"}, clock=clock).uuid
    orchestrator.execute_pipelines()

    purged = orchestrator.purge(timedelta(days=30), ["finished"])

    assert purged.pipelines == len(old)
    assert uuids(orchestrator.query(attributes={"customer": "acme"})) == {young}
    if hasattr(backend, "engine"):
        assert index_rows(backend) == {(young, "customer", "acme")}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "memory"])
def test_a_rerun_copies_the_attributes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Label", labelled), step_of("Next", lambda self: self.finish()), name="Job")
    original = job.create(backend, {"label": "done"}, attributes={"customer": "acme"}).uuid
    orchestrator = Orchestrator(backend, registry=registry)
    orchestrator.execute_pipelines()
    rerun = orchestrator.rerun(original, "Next").pipeline.uuid
    wanted = {"customer": "acme", "stage": "done"}
    assert orchestrator.get(rerun).pipeline.attributes == wanted
    assert uuids(orchestrator.query(attributes=wanted)) == {original, rerun}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "tinydb"])
def test_bulk_actions_filter_by_attributes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    wait = step_of("Wait", lambda self: None, lambda self: self.wait(seconds=3600))
    job = pipeline_of(wait, name="Job")
    acme = {job.create(backend, {}, attributes={"customer": "acme"}).uuid for _ in range(3)}
    globex = {job.create(backend, {}, attributes={"customer": "globex"}).uuid for _ in range(2)}
    orchestrator = Orchestrator(backend, registry=registry)
    orchestrator.execute_pipelines()

    summary = orchestrator.bulk(BulkAction("cancel"), Filters(attributes={"customer": "acme"}))

    assert (summary.matched, summary.done) == (3, 3)
    assert uuids(orchestrator.query(status="cancelled")) == acme
    assert uuids(orchestrator.query(status="pending")) == globex


@pytest.mark.parametrize("kind", SQL)
def test_group_commit_indexes_each_pipelines_attributes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(kind, tmp_path, request)
    job = pipeline_of(step_of("Label", labelled), name="Job")
    made = {job.create(backend, {"label": f"s{i}"}).uuid: f"s{i}" for i in range(4)}
    rounds = run_grouped_counting(backend, registry, monkeypatch, "attributes")

    assert {p.uuid: p.attributes.get("stage") for p in Store(backend).all_pipelines()} == made
    assert max(rounds) >= 2, rounds  # two pipelines' new attributes went in one commit
    assert index_rows(backend) == {(uuid, "stage", label) for uuid, label in made.items()}
    orchestrator = Orchestrator(backend, registry=registry)
    assert all(uuids(orchestrator.query(attributes={"stage": label})) == {uuid} for uuid, label in made.items())


def test_the_sqlite_filter_reads_the_attribute_index(tmp_path: Path, registry: Registry) -> None:
    backend = from_url(f"sqlite:///{tmp_path / 'plan.db'}")
    page, _ = listing(TABLES["PIPELINE"], PipelineQuery(attributes={"customer": "acme"}), "sqlite")
    compiled = page.compile(backend.engine, compile_kwargs={"literal_binds": True})
    with backend.engine.connect() as connection:
        plan = " ".join(str(row[-1]) for row in connection.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))
    assert "SEARCH attribute USING COVERING INDEX ix_pipeline_attributes_value" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # read in order, newest first: a page costs a page


def test_the_cli_filters_shows_and_acts_by_attribute(tmp_path: Path, registry: Registry) -> None:
    from prorch.cli.commands import main

    wait = step_of("Wait", lambda self: None, lambda self: self.wait(seconds=3600))
    job = pipeline_of(wait, name="Job")
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    acme = job.create(url, {}, attributes={"customer": "acme", "tier": "gold"}).uuid
    job.create(url, {}, attributes={"customer": "globex"})
    runner = CliRunner()
    listed = runner.invoke(main, ["-r", url, "list", "--attr", "customer=acme", "--attr", "tier=gold", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [p["uuid"] for p in json.loads(listed.stdout)["pipelines"]] == [acme]
    shown = runner.invoke(main, ["-r", url, "show", acme])
    assert "  attributes: customer=acme, tier=gold" in shown.stdout
    bad = runner.invoke(main, ["-r", url, "list", "--attr", "customer"])
    assert bad.exit_code != 0 and "--attr 'customer': expected NAME=VALUE" in bad.output
    dry = runner.invoke(main, ["-r", url, "cancel", "--attr", "customer=globex", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would cancel 1 of 1 matching" in dry.stdout
    started = runner.invoke(main, ["-r", url, "start", "Job", "--attr", "customer=initech", "--json"])
    assert started.exit_code == 0, started.output
    assert json.loads(started.stdout)["attributes"] == {"customer": "initech"}
    refused = runner.invoke(main, ["-r", url, "start", "Job", "--attr", "9=x"])
    assert refused.exit_code != 0 and "attribute name '9'" in refused.output


def asgi_get(app: Any, path: str, query: str = "") -> tuple[int, str]:
    """One GET through the ASGI app in this process (no server, no HTTP client)."""
    import asyncio

    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http", "http_version": "1.1", "method": "GET", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "headers": [(b"host", b"127.0.0.1")], "scheme": "http",
        "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234), "root_path": "",
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


def test_the_dashboard_filters_shows_and_bulk_acts_by_attribute(tmp_path: Path, registry: Registry) -> None:
    pytest.importorskip("starlette")
    from urllib.parse import urlencode

    from prorch.dashboard import acting, views
    from prorch.dashboard.app import create_app

    job = pipeline_of(step_of("Wait", lambda self: None, lambda self: self.wait(seconds=3600)), name="Job")
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    acme = job.create(url, {}, attributes={"customer": "acme", "tier": "gold"}).uuid
    job.create(url, {}, attributes={"customer": "globex"})
    orchestrator = Orchestrator(url, registry=registry)
    app = create_app(orchestrator)

    status, body = asgi_get(app, "/api/pipelines", urlencode({"attributes": "customer=acme, tier=gold"}))
    assert status == 200, body
    assert [p["uuid"] for p in json.loads(body)["pipelines"]] == [acme]
    status, body = asgi_get(app, "/api/pipelines", urlencode({"attributes": "customer"}))
    assert status == 400 and "expected NAME=VALUE" in body
    status, body = asgi_get(app, "/pipelines", urlencode({"attributes": "customer=acme"}))
    assert status == 200 and acme[:8] in body and 'name="attributes" value="customer=acme"' in body
    assert json.loads(asgi_get(app, f"/api/pipelines/{acme}")[1])["pipeline"]["attributes"] == {
        "customer": "acme", "tier": "gold",
    }  # fmt: skip
    status, body = asgi_get(app, f"/pipelines/{acme}")
    assert status == 200 and 'href="/pipelines?attributes=customer%3Dacme">customer=acme</a>' in body

    chosen = acting.bulk_request({"action": "cancel"}, {"attributes": "customer=globex"}, orchestrator.clock.now(), "t")
    assert chosen.filters.attributes == {"customer": "globex"}
    summary = orchestrator.bulk(chosen.action, chosen.filters)
    assert (summary.matched, summary.done) == (1, 1)
    assert views.pipelines(orchestrator, {"status": "cancelled"})["total"] == 1
