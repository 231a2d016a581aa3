"""Claims with pauses of classes, class versions, tenants and single pipelines, on memory, SQLite,
PostgreSQL and TinyDB side by side: the same random pipelines, pauses and resumes, and the same random
sequence of claims (batch sizes, runnable classes, limits: max_running, per tenant, fair, rate)
on each. A paused pipeline is never claimed (by the model's rule, ``prorch.model.pauses``), and
each claim takes the same pipelines in the same order on every backend; after each claim, the
listing's ``state="paused"`` names, on each, exactly the unleased pipelines a pause holds. (A fair claim's turns
start with the same group on each: the rotation is reset before each backend's claim.)"""

from __future__ import annotations

import itertools
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from prorch import FakeClock, Orchestrator
from prorch.model import limit_rules
from prorch.model.due import ClaimRequest
from prorch.model.limit_rules import ClaimLimit, Fairness, RateLimit, key_text
from prorch.model.pauses import Pause, Paused, make_pause, row_scopes
from prorch.model.records import PipelineRecord, new_uuid
from prorch.model.registry import Registry
from prorch.model.status import Status
from prorch.storage.store import Store
from tests.integration.conftest import make_backend
from tests.support.builders import pipeline_of, quick

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
NAMES = ("A", "B", "C")
TENANTS: tuple[Any, ...] = (None, "t1", "t2", 7, "7", "ünï", 'q"\\u', True, 2.5, -3)
"""Tenants as a context may hold them: texts and integers, which a tenant pause names by their
text, and values that are neither (a boolean, a fraction), which no tenant pause holds."""
PAUSE_TENANTS = ("t1", "7", "ünï", 'q"\\u', "true", "1", "2.5", "-3")
KINDS = ("memory", "sqlite", "postgresql", "tinydb")


def pipelines(rng: random.Random, count: int) -> list[PipelineRecord]:
    """``count`` pending pipelines: due at distinct times (some not yet), some leased."""
    made = []
    for index in rng.sample(range(-5000, 200), count):
        tenant, leased = rng.choice(TENANTS), rng.random() < 0.1
        record = PipelineRecord(
            uuid=new_uuid(), name=rng.choice(NAMES), version=rng.choice((1, 2)), status=Status.PENDING,
            context={} if tenant is None else {"tenant": tenant}, priority=rng.choice((-1, 0, 0, 3, 9)),
            created_at=NOW, updated_at=NOW, next_run_at=NOW + timedelta(seconds=index),
            concurrency_key=key_text(tenant),  # as a create stores it: the tenant, "null" for none
        )  # fmt: skip
        if leased:
            record.lease_owner, record.lease_expires_at = "other", NOW + timedelta(minutes=5)
        made.append(record)
    return made


def random_pause(rng: random.Random, uuids: list[str]) -> Pause:
    kind = rng.choice(("class", "version", "tenant", "tenant", "pipeline"))
    if kind == "class":
        return make_pause(name=rng.choice(NAMES), since=NOW)
    if kind == "version":
        return make_pause(name=rng.choice(NAMES), version=rng.choice((1, 2)), since=NOW)
    if kind == "tenant":
        return make_pause(tenant=rng.choice(PAUSE_TENANTS), since=NOW)
    return make_pause(uuid=rng.choice(uuids), since=NOW)


def random_limit(rng: random.Random) -> ClaimLimit:
    """A class's limits: a cap on running, per tenant, a fair claim by tenant, or a rate."""
    kind = rng.choice(("max_running", "per_tenant", "fair", "rate", "both"))
    if kind == "max_running":
        return ClaimLimit(max_running=rng.randrange(2, 6))
    if kind == "per_tenant":
        return ClaimLimit(per_tenant=rng.randrange(1, 3))
    if kind == "fair":
        return ClaimLimit(fair=Fairness(weights=((key_text("t1"), 2.0),)))
    if kind == "rate":
        return ClaimLimit(rate=RateLimit(rng.randrange(2, 8), 60))
    return ClaimLimit(max_running=rng.randrange(3, 8), per_tenant=rng.randrange(1, 3))


def random_claim(rng: random.Random, step: int) -> ClaimRequest:
    runnable = None if rng.random() < 0.5 else frozenset((n, v) for n in NAMES for v in (1, 2) if rng.random() < 0.7)
    limits = {} if rng.random() < 0.4 else {rng.choice(NAMES): random_limit(rng)}
    at = NOW + timedelta(seconds=20 * step)
    return ClaimRequest(at, f"w{step}", at + timedelta(days=1), rng.randrange(1, 12), limits, runnable)


def paused_listed(store: Store, now: datetime) -> set[str]:
    """The pipelines ``query(state="paused")`` lists at ``now`` (the listing's own rule)."""
    reads = Orchestrator(store.engine, clock=FakeClock(now))
    return {p.uuid for p in reads.query(state="paused", limit=1000).pipelines}


@pytest.fixture
def stores(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    made = {kind: make_backend(kind, tmp_path, request) for kind in KINDS}
    yield {kind: Store(backend) for kind, backend in made.items()}
    for backend in made.values():
        if hasattr(backend, "dispose"):
            backend.dispose()


@pytest.mark.parametrize("seed", range(6))
def test_claims_with_pauses_take_no_paused_pipeline_and_the_same_ones_in_the_same_order_everywhere(
    stores: dict[str, Store], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    records = pipelines(rng, 120)
    uuids = [record.uuid for record in records]
    rows = {record.uuid: record.to_dict() for record in records}
    for store in stores.values():
        store.insert_all([PipelineRecord.from_dict(record.to_dict()) for record in records])
    pauses: dict[str, Pause] = {}
    claimed: set[str] = set()
    seen_paused: set[str] = set()
    for step in range(30):
        if rng.random() < 0.4:  # an operator pauses a scope, or resumes one
            if pauses and rng.random() < 0.4:
                scope = rng.choice(sorted(pauses))
                del pauses[scope]
                for store in stores.values():
                    assert store.remove_pause(scope) is not None
            else:
                pause = random_pause(rng, uuids)
                if pause.scope not in pauses:
                    pauses[pause.scope] = pause
                    for store in stores.values():
                        assert store.add_pause(pause)
        request = random_claim(rng, step)
        taken = {}
        for kind, store in stores.items():  # a fair claim's turns start with the same group on each
            monkeypatch.setattr(limit_rules, "_ROTATIONS", itertools.count(step))
            taken[kind] = [p.uuid for p in store.claim(request)]
        held = Paused(pauses.values())
        paused = [
            u for u in taken["memory"] + taken["sqlite"] + taken["postgresql"] if held.holding(row_scopes(rows[u]))
        ]
        assert paused == [], (step, [(rows[u]["context"], held.holding(row_scopes(rows[u]))) for u in paused])
        assert all(taken[kind] == taken["memory"] for kind in KINDS), (step, request, pauses, taken)
        assert not claimed & set(taken["memory"])  # leases of a day: none claimed twice
        claimed |= set(taken["memory"])
        leased = claimed | {u for u, r in rows.items() if r["lease_owner"] and request.now < NOW + timedelta(minutes=5)}
        expected = {u for u in uuids if u not in leased and held.holding(row_scopes(rows[u]))}
        listed = {kind: paused_listed(store, request.now) for kind, store in stores.items()}
        assert all(found == expected for found in listed.values()), (step, pauses, expected, listed)
        seen_paused |= expected
    assert claimed and seen_paused  # the claims took something, and pauses held some


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql", "tinydb"])
def test_a_tenant_pause_holds_text_and_integer_tenants_only_alike_on_every_backend(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, registry: Registry
) -> None:
    """A tenant that is neither a text nor an integer (``2.5``, ``true``) is no tenant a pause
    names (``tenant_text``): SQLite and PostgreSQL held it by its text ("2.5"; "1" or "true"
    for true) while memory, TinyDB and the listing's "paused" on them did not."""
    Job = pipeline_of(quick("Work"), name="Job")
    backend = make_backend(kind, tmp_path, request)
    orchestrator = Orchestrator(backend, registry=registry)
    tenants: list[Any] = [2.5, True, 7, "7", "t"]
    uuids = {repr(t): Job.create(backend, {}, context={"tenant": t}, registry=registry).uuid for t in tenants}
    for tenant in ("2.5", "true", "1", "7"):
        orchestrator.pause(tenant=tenant)
    held = {uuids["7"], uuids["'7'"]}
    assert {p.uuid for p in orchestrator.query(state="paused").pipelines} == held
    orchestrator.execute_pipelines()
    ran = {u for u in uuids.values() if orchestrator.get(u).pipeline.status == Status.FINISHED}
    assert ran == set(uuids.values()) - held
