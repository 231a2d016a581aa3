"""Concurrency per key and fair claims (#30 item 2), in the claim of every shipped backend and
the seed adapter's fallback: ``concurrency_key`` with ``max_running_per_key`` holds per key
value, beside per tenant, ``max_running`` and ``rate_limit``; a fair class's claim takes each
tenant's (or key's) due pipelines in turn, weighted, so a backlog does not hold back another
group's first pipeline. Worker processes: ``test_key_limit_workers.py``."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from pydantic import BaseModel
from sqlalchemy import inspect, text

from prorch import ConfigurationError, FakeClock, InvalidParamsError, Orchestrator, RegistrationError
from prorch.model.limit_rules import ClaimLimit, RateLimit, limits_of
from prorch.model.records import new_uuid
from prorch.model.registry import Registry
from repositories.sql import MIGRATIONS, SQLBackend, upgrade
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, step_of

ALL_CLAIMING = ["memory", "sqlite", "postgresql", "tinydb", "seed"]
SHIPPED = ["memory", "sqlite", "postgresql", "tinydb"]


class Order(BaseModel):
    customer_id: str | int | None = None
    size: int = 1


def keyed(registry: Registry, **attributes: Any) -> Any:
    step = step_of("Work", None, lambda self: None)
    return pipeline_of(step, name="Keyed", Params=Order, concurrency_key="customer_id", **attributes)


class Claims:
    """Claims of a store at one instant, each with its own owner, within a class's limits."""

    def __init__(self, backend: Any, registry: Registry, *classes: Any) -> None:
        self.orchestrator = Orchestrator(backend, registry=registry)
        self.limits = {cls.name: limits_of(cls) for cls in classes}
        self.now = self.orchestrator.clock.now()
        self.owners = 0

    def __call__(self, most: int, at: datetime | None = None, **limits: ClaimLimit) -> list[Any]:
        self.owners += 1
        at = at or self.now
        return self.orchestrator.store.claim_due(
            at, f"w{self.owners}", at + timedelta(seconds=60), most, {**self.limits, **limits}
        )


@pytest.mark.parametrize("kind", ALL_CLAIMING)
def test_max_running_per_key_leaves_room_to_each_key(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    cls = keyed(registry, max_running_per_key=2)
    crowd = [cls.create(backend, {"customer_id": "c1"}).uuid for _ in range(20)]  # due first
    alone = cls.create(backend, {"customer_id": "c2"}).uuid
    numeric = cls.create(backend, {"customer_id": 7}).uuid  # 7 is not "7"
    text = cls.create(backend, {"customer_id": "7"}).uuid
    unkeyed = [cls.create(backend, {}).uuid for _ in range(3)]  # no key: one group of their own
    claim = Claims(backend, registry, cls)
    first = claim(100)
    assert sorted(p.uuid for p in first) == sorted([*crowd[:2], alone, numeric, text, *unkeyed[:2]])
    assert [p.concurrency_key for p in first if p.uuid in (numeric, text)] == ["7", '"7"']
    if kind == "seed":  # no leases without claims: each pass starts from nothing held
        return
    assert claim(100) == []  # every group is full, across owners
    later = claim.now + timedelta(seconds=61)  # the leases ran out: each group has room again
    assert len([p for p in claim(100, at=later) if p.uuid in crowd]) == 2


@pytest.mark.parametrize("kind", SHIPPED)
def test_per_key_with_per_tenant_max_running_and_a_rate_all_hold(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    """The groupings are one rule: a pipeline is claimed when its key, its tenant, its name's
    ``max_running`` and its rate all have room; the lowest wins."""
    backend = make_backend(kind, tmp_path, request)
    cls = keyed(registry, max_running_per_key=1, max_running_per_tenant=2)
    for customer in ("a", "b", "c"):
        for _ in range(3):
            cls.create(backend, {"customer_id": customer}, tenant="t1")
    cls.create(backend, {"customer_id": "d"}, tenant="t2")
    claim = Claims(backend, registry, cls)
    first = claim(100)
    assert len({p.concurrency_key for p in first}) == len(first) == 3  # t1's two (of a, b, c), t2's d
    assert sorted(p.context["tenant"] for p in first) == ["t1", "t1", "t2"]
    assert claim(100) == []
    later = claim.now + timedelta(seconds=61)
    both = ClaimLimit(max_running=3, per_key=1, rate=RateLimit(2, 60))
    assert len(claim(100, at=later, Keyed=both)) == 2  # the rate's room (2) is the lowest
    assert claim(100, at=later + timedelta(seconds=1), Keyed=both) == []  # rate spent


@pytest.mark.parametrize("kind", ALL_CLAIMING)
def test_a_fair_claim_takes_the_second_tenant_s_pipeline_in_the_first_claim(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    """One tenant's backlog due first, another tenant's pipelines created after: a fair class's
    claim of a batch of 4 takes from both in turn (without ``fair``, the backlog's four)."""
    backend = make_backend(kind, tmp_path, request)
    step = step_of("Work", None, lambda self: None)
    fair = pipeline_of(step, name="Fair", fair=True)
    backlog = [fair.create(backend, {}, tenant="big").uuid for _ in range(40)]
    small = [fair.create(backend, {}, tenant="small").uuid for _ in range(3)]
    claim = Claims(backend, registry, fair)
    first = [p.uuid for p in claim(4)]
    assert sorted(first) == sorted([*backlog[:2], *small[:2]])
    # in the order of the turns, which a worker runs a claim in: RETURNING has no order of its own
    assert [uuid in small for uuid in first] in ([False, True, False, True], [True, False, True, False]), first
    if kind == "seed":
        return
    assert sorted(p.uuid for p in claim(4)) == sorted([*backlog[2:5], small[2]])  # small's last, then big's


@pytest.mark.parametrize("kind", SHIPPED)
def test_weights_give_a_tenant_more_turns_and_a_fair_key_groups_by_key(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    backend = make_backend(kind, tmp_path, request)
    step = step_of("Work", None, lambda self: None)
    weighted = pipeline_of(step, name="Weighted", tenant_weights={"gold": 3})
    for _ in range(10):
        weighted.create(backend, {}, tenant="free")
    for _ in range(10):
        weighted.create(backend, {}, tenant="gold")
    claim = Claims(backend, registry, weighted)
    assert sorted(p.context["tenant"] for p in claim(8)) == ["free"] * 2 + ["gold"] * 6
    by_key = keyed(registry, fair=True)  # fair by the key's values, not the tenant
    for _ in range(10):
        by_key.create(backend, {"customer_id": 1}, tenant="one")
    by_key.create(backend, {"customer_id": 2}, tenant="one")
    claim = Claims(backend, registry, by_key)
    assert sorted(p.params.get("customer_id") for p in claim(2, Weighted=ClaimLimit(max_running=1))) == [1, 2]


def test_the_key_is_stored_at_create_and_a_bad_one_stores_nothing(tmp_path: Path, registry: Registry) -> None:
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    cls = keyed(registry, max_running_per_key=1)
    assert cls.create(backend, {"customer_id": "acme"}).record.concurrency_key == '"acme"'
    by_function = pipeline_of(
        step_of("Other", None, lambda self: None),
        name="ByFunction",
        concurrency_key=lambda params: params["region"][:2],
        max_running_per_key=1,
    )
    assert by_function.create(backend, {"region": "eu-west"}).record.concurrency_key == '"eu"'
    listed = Orchestrator(backend, registry=registry)
    with pytest.raises(InvalidParamsError, match=re.escape("a concurrency key must be a str, int, float, bool")):
        by_function.create(backend, {"region": ["eu"]})
    with pytest.raises(InvalidParamsError, match="concurrency_key of pipeline ByFunction raised KeyError"):
        by_function.create(backend, {})
    assert len(listed.list_pipelines(name="ByFunction")) == 1  # the refused ones stored nothing


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"concurrency_key": "customer", "Params": Order}, "concurrency_key 'customer' names no field of its Params"),
        ({"concurrency_key": 3}, "concurrency_key must be a params field's name or a function of the params, got 3"),
        ({"max_running_per_key": 2}, "max_running_per_key needs a concurrency_key"),
        ({"concurrency_key": "x", "max_running_per_key": 0}, "max_running_per_key must be a whole number of 1"),
        ({"tenant_weights": {"a": 0}}, "tenant_weights: the weight of 'a' must be a positive number, got 0"),
        ({"tenant_weights": {"a": "3"}}, "the weight of 'a' must be a positive number, got '3'"),
        ({"tenant_weights": {"a": True}}, "the weight of 'a' must be a positive number, got True"),
        ({"tenant_weights": []}, "tenant_weights must be a non-empty dict of group to weight"),
        ({"fair": "yes"}, "fair must be True or False, got 'yes'"),
    ],
)
def test_bad_key_limits_and_weights_are_refused_at_registration(
    registry: Registry, attributes: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegistrationError, match=re.escape(message)):
        pipeline_of(step_of("S", lambda self: None), name="Bad", **attributes)
    assert "Bad" not in registry.pipelines


def status(orchestrator: Orchestrator, uuid: str) -> str:
    record = orchestrator.store.get_pipeline(uuid)
    assert record is not None
    return record.status.value


# --- the seams: a key's limit across retries, children, group commit and lost leases ---------


def test_a_pipeline_waiting_out_its_retry_backoff_leaves_its_key_to_the_next(
    tmp_path: Path, registry: Registry
) -> None:
    """A retry's backoff releases the lease, so it does not count: the key's next pipeline runs
    meanwhile, and the retry runs when it is due and the key has room."""
    failed: list[str] = []

    def flaky(self: Any) -> None:
        if self.params.size == 0 and not failed:
            failed.append(self.pipeline_uuid)
            raise RuntimeError("the first call fails")
        self.finish({"size": self.params.size})

    step = step_of("Flaky", flaky, max_attempts=2, retry_delay=60)
    cls = pipeline_of(step, name="Keyed", Params=Order, concurrency_key="customer_id", max_running_per_key=1)
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    retried = cls.create(backend, {"customer_id": "c", "size": 0}).uuid
    nxt = cls.create(backend, {"customer_id": "c", "size": 1}).uuid
    clock = FakeClock(datetime.now(timezone.utc))
    orchestrator = Orchestrator(backend, registry=registry, clock=clock)
    assert orchestrator.execute_pipelines().claimed == 1  # the key's one: the retried pipeline, which fails once
    assert orchestrator.execute_pipelines().finished == 1  # it waits out its backoff unleased: the next runs
    assert status(orchestrator, nxt) == "finished" and status(orchestrator, retried) == "pending"
    clock.advance(61)
    orchestrator.execute_pipelines()
    assert status(orchestrator, retried) == "finished"


def test_a_parent_waiting_for_its_child_of_the_same_key_leaves_it_room(tmp_path: Path, registry: Registry) -> None:
    """A parent and its child of one key, at most one of the key running: the parent waits for
    the child unleased, so the child runs (no deadlock), then the parent finishes."""

    def spawn(self: Any) -> None:
        if self.params.size == 0:
            self.finish({"child": True})
            return
        child = self.start_child("Family", {"customer_id": self.params.customer_id, "size": 0})
        result = self.child_result(child)
        if result is None:
            self.wait(seconds=3600)
        else:
            self.finish({"from child": result})

    cls = pipeline_of(
        step_of("Spawn", None, spawn), name="Family", Params=Order, concurrency_key="customer_id", max_running_per_key=1
    )
    backend = make_backend("sqlite", tmp_path, None)  # type: ignore[arg-type]
    parent = cls.create(backend, {"customer_id": "c", "size": 1}).uuid
    orchestrator = Orchestrator(backend, registry=registry)
    for _ in range(4):
        orchestrator.execute_pipelines()
    [child] = orchestrator.store.children_of(parent)
    assert child.concurrency_key == '"c"'  # the child's own key, from its params
    assert status(orchestrator, parent) == "finished"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_group_commit_claims_one_of_each_key_per_pass(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    """Passes that store their transitions by group commit: each claim takes one pipeline of a
    key, the key's next one is claimed once that round is stored, and each key runs in turn."""
    runs: list[tuple[int, Any]] = []
    passes = [0]
    step = step_of("Record", lambda self: runs.append((passes[0], self.params.customer_id)))
    cls = pipeline_of(step, name="Keyed", Params=Order, concurrency_key="customer_id", max_running_per_key=1)
    backend = make_backend(kind, tmp_path, request)
    for customer in ("a", "b", "c") * 3:
        cls.create(backend, {"customer_id": customer})
    orchestrator = Orchestrator(backend, registry=registry, group_commit=8)
    while passes[0] < 6 and orchestrator.execute_pipelines().claimed:
        passes[0] += 1
    assert passes[0] == 3 and len(runs) == 9
    assert all(sorted(customer for at, customer in runs if at == n) == ["a", "b", "c"] for n in range(3))


def test_the_orchestrator_s_weights_apply_to_fair_classes_without_their_own(registry: Registry) -> None:
    backend = make_backend("memory", Path("."), None)  # type: ignore[arg-type]
    step = step_of("Work", None, lambda self: None)
    fair = pipeline_of(step, name="Fair", fair=True)
    own = pipeline_of(step, name="Own", tenant_weights={"free": 2})
    for tenant in ("free", "gold") * 10:
        fair.create(backend, {}, tenant=tenant)
    orchestrator = Orchestrator(backend, registry=registry, tenant_weights={"gold": 3})
    limits = orchestrator.extensions.claim_limits()
    assert limits["Own"] == limits_of(own)  # a class's own weights win
    now = orchestrator.clock.now()
    claimed = orchestrator.store.claim_due(now, "w", now + timedelta(seconds=60), 8, dict(limits))
    assert sorted(p.context["tenant"] for p in claimed) == ["free"] * 2 + ["gold"] * 6
    with pytest.raises(
        ConfigurationError,
        match=re.escape("Orchestrator(tenant_weights=...): the weight of 'gold' must be a positive number, got -1"),
    ):
        Orchestrator(backend, registry=registry, tenant_weights={"gold": -1})


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migration_0020_gives_pending_pipelines_their_tenant_as_key_and_takes_it_back(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    old = SQLBackend(url, migrate=False)
    upgrade(old, "0016")
    tenants: list[Any] = ["acme", 7, "7", True, None, {"id": 1}]
    rows = [
        {"uuid": new_uuid(), "name": "P", "version": 1, "status": "pending", "params": {}, "metadata": {},
         "context": {} if tenant is None else {"tenant": tenant}, "priority": 0, "revision": 0}
        for tenant in [*tenants, "ended"]
    ]  # fmt: skip
    rows[-1]["status"] = "finished"
    columns = "uuid, name, version, status, params, context, metadata, priority, revision, claims, crashes"
    with old.engine.begin() as connection:
        for row in rows:
            values = {**row, "params": "{}", "metadata": "{}", "context": json.dumps(row["context"])}
            connection.execute(
                text(f"INSERT INTO pipelines ({columns}, cancel_requested, hook_shared) VALUES "
                     "(:uuid, :name, :version, :status, :params, :context, :metadata, :priority, :revision, 0, 0, "
                     "false, false)"),
                values,
            )  # fmt: skip
    old.dispose()
    new = SQLBackend(url)  # opening the store upgrades it
    with new.engine.connect() as connection:
        found = dict(connection.execute(text("SELECT uuid, concurrency_key FROM pipelines")).all())
    assert [found[row["uuid"]] for row in rows] == ['"acme"', "7", '"7"', "true", "null", "null", None]
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with new.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0016")
    with new.engine.connect() as connection:
        assert "concurrency_key" not in {column["name"] for column in inspect(connection).get_columns("pipelines")}
    new.dispose()
