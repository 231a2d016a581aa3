"""One contract, every backend: the four seed methods, each optional capability the backend
offers, and a full pipeline run through the engine. A new backend is one more fixture param."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from prorch import (
    EventRecord,
    MessageRecord,
    OnContinueMixin,
    OnStartMixin,
    PipelineRecord,
    Status,
    Step,
    StepRecord,
    SupportsClaim,
    SupportsCompareAndSet,
    SupportsDueQuery,
    SupportsMessageQuery,
    SupportsPartialUpdate,
    SupportsSearchMany,
    SupportsTransaction,
    register_step,
)
from prorch.engine.passes import marked_by
from prorch.model.due import ClaimRequest
from prorch.model.limit_rules import ClaimLimit, Fairness, RateLimit
from prorch.model.records import ErrorInfo, new_uuid
from prorch.model.registry import Registry
from prorch.model.workers import WorkerRow
from prorch.storage.repository import SupportsLimitedClaim
from prorch.storage.store import Store
from prorch.testing import Harness
from tests.support.builders import pipeline_of

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


def pipeline_row(**changes: Any) -> dict[str, Any]:
    record = PipelineRecord(
        uuid=new_uuid(),
        name="P",
        status=Status.PENDING,
        params={"path": "/x", "n": [1, 2]},
        context={"tenant": "t1"},
        metadata={"current_step": None},
        created_at=NOW,
        updated_at=NOW,
        next_run_at=NOW,
        last_error=ErrorInfo(type="E", message="m", traceback="tb"),
    )
    return {**record.to_dict(), **changes}


def test_save_then_get_returns_the_same_record(backend: Any) -> None:
    repo = backend("PIPELINE")
    row = pipeline_row()
    repo.save(row)
    assert PipelineRecord.from_dict(repo.get(row["uuid"])) == PipelineRecord.from_dict(row)
    assert repo.get(row["uuid"]) == row


def test_every_model_round_trips(backend: Any) -> None:
    step = StepRecord(
        uuid=new_uuid(),
        pipeline_uuid="p",
        name="S",
        position=0,
        status=Status.PENDING,
        metadata={"job": "j"},
        output={"file": "f", "sizes": [1.5, None]},
        attempt=2,
        started_at=NOW,
    ).to_dict()
    event = EventRecord(
        uuid=new_uuid(), pipeline_uuid="p", type="step.started", at=NOW, seq=3, data={"attempt": 1}
    ).to_dict()
    for model, row in (("STEP", step), ("EVENT", event)):
        repo = backend(model)
        repo.save(row)
        assert repo.get(row["uuid"]) == row


def test_get_missing_is_none(backend: Any) -> None:
    assert not backend("PIPELINE").get("no-such-uuid")


def test_update_replaces_fields(backend: Any) -> None:
    repo = backend("PIPELINE")
    row = pipeline_row()
    repo.save(row)
    repo.update(row["uuid"], {**row, "status": "finished", "metadata": {"current_step": "s"}})
    stored = repo.get(row["uuid"])
    assert stored["status"] == "finished" and stored["metadata"] == {"current_step": "s"}


def test_search_by_field(backend: Any) -> None:
    repo = backend("PIPELINE")
    a, b = pipeline_row(), pipeline_row(status="finished")
    repo.save(a)
    repo.save(b)
    assert [r["uuid"] for r in repo.search(["status", "pending"])] == [a["uuid"]]
    assert repo.search(["status", "cancelled"]) == []


# --- capabilities (skipped where a backend does not offer them) --------------------------------


def require(obj: Any, capability: type) -> None:
    if not isinstance(obj, capability):
        pytest.skip(f"backend does not offer {capability.__name__}")


def test_compare_and_set(backend: Any) -> None:
    repo = backend("PIPELINE")
    require(repo, SupportsCompareAndSet)
    row = pipeline_row(revision=4)
    repo.save(row)
    assert repo.compare_and_set(row["uuid"], 3, {**row, "status": "failed"}) is False
    assert repo.get(row["uuid"])["status"] == "pending"
    assert repo.compare_and_set(row["uuid"], 4, {**row, "status": "failed", "revision": 5}) is True
    assert repo.get(row["uuid"])["revision"] == 5
    assert repo.compare_and_set("missing", 0, row) is False


def test_partial_update_keeps_the_fields_not_given(backend: Any) -> None:
    repo = backend("PIPELINE")
    require(repo, SupportsPartialUpdate)
    assert repo.partial_update is True
    row = pipeline_row(revision=2, priority=5)
    repo.save(row)
    assert repo.compare_and_set(row["uuid"], 2, {"status": "failed", "revision": 3}) is True
    repo.update(row["uuid"], {"metadata": {"k": [1]}})
    stored = repo.get(row["uuid"])
    assert (stored["status"], stored["revision"], stored["priority"]) == ("failed", 3, 5)
    assert stored["metadata"] == {"k": [1]} and stored["name"] == row["name"]
    assert repo.compare_and_set(row["uuid"], 2, {"status": "finished", "revision": 3}) is False


def test_search_many_finds_every_value(backend: Any) -> None:
    repo = backend("PIPELINE")
    require(repo, SupportsSearchMany)
    rows = [pipeline_row() for _ in range(5)]
    for row in rows:
        repo.save(row)
    wanted = [rows[0]["uuid"], rows[3]["uuid"], "missing"]
    assert sorted(r["uuid"] for r in repo.search_many("uuid", wanted)) == sorted(wanted[:2])
    many = [f"x-{index}" for index in range(1200)] + [rows[4]["uuid"]]  # more than one chunk
    assert [r["uuid"] for r in repo.search_many("uuid", many)] == [rows[4]["uuid"]]
    assert repo.search_many("uuid", []) == []


def due_rows(repo: Any) -> dict[str, dict[str, Any]]:
    later = (NOW + timedelta(hours=1)).isoformat()
    rows = {
        "low": pipeline_row(priority=0),
        "high": pipeline_row(priority=9),
        "waiting": pipeline_row(next_run_at=later),
        "leased": pipeline_row(lease_owner="w", lease_expires_at=later),
        "expired": pipeline_row(lease_owner="w", lease_expires_at=(NOW - timedelta(seconds=1)).isoformat()),
        "done": pipeline_row(status="finished"),
    }
    for row in rows.values():
        repo.save(row)
    return rows


def test_search_due_filters_and_orders(backend: Any) -> None:
    repo = backend("PIPELINE")
    require(repo, SupportsDueQuery)
    rows = due_rows(repo)
    found = [r["uuid"] for r in repo.search_due(NOW, 10)]
    assert found[0] == rows["high"]["uuid"]
    assert set(found) == {rows[k]["uuid"] for k in ("low", "high", "expired")}
    assert len(repo.search_due(NOW, 1)) == 1


def test_claim_due_leases_atomically(backend: Any) -> None:
    repo = backend("PIPELINE")
    require(repo, SupportsClaim)
    rows = due_rows(repo)
    until = NOW + timedelta(seconds=60)
    claimed = repo.claim_due(NOW, "me", until, 10)
    assert {r["uuid"] for r in claimed} == {rows[k]["uuid"] for k in ("low", "high", "expired")}
    assert all(r["lease_owner"] == "me" for r in claimed)
    assert all(r["revision"] == rows["low"]["revision"] + 1 for r in claimed)
    assert PipelineRecord.from_dict(claimed[0]).lease_expires_at == until
    assert repo.claim_due(NOW, "other", until, 10) == []


@pytest.mark.parametrize("limited", [False, True])
def test_a_claim_takes_only_the_classes_the_worker_has(backend: Any, limited: bool) -> None:
    """Issue #25: an old worker beside a new one claims only the (name, version) pairs it
    has; before, it claimed the new ones too and put each off by a lease it could not use."""
    repo = backend("PIPELINE")
    require(repo, SupportsClaim)
    if limited:
        require(repo, SupportsLimitedClaim)
    rows = {
        "p1": pipeline_row(name="P", version=1),
        "p2": pipeline_row(name="P", version=2, priority=9),  # first in claim order
        "q1": pipeline_row(name="Q", version=1),
        "new": pipeline_row(name="New", version=1, priority=5),
    }
    for row in rows.values():
        repo.save(row)
    until = NOW + timedelta(seconds=60)
    limits = {"P": ClaimLimit(max_running=10)} if limited else None

    def claim(owner: str, runnable: Any) -> set[str]:
        found = (
            repo.claim_due_limited(NOW, owner, until, 10, limits, runnable)
            if limits is not None
            else repo.claim_due(NOW, owner, until, 10, runnable)
        )
        return {row["uuid"] for row in found}

    assert claim("nothing", frozenset()) == set()
    assert claim("old", frozenset({("P", 1), ("Q", 1), ("Q", 3)})) == {rows["p1"]["uuid"], rows["q1"]["uuid"]}
    assert all(repo.get(rows[k]["uuid"])["lease_owner"] is None for k in ("p2", "new"))
    assert claim("new", frozenset({("P", 1), ("P", 2), ("Q", 1), ("New", 1)})) == {
        rows["p2"]["uuid"],
        rows["new"]["uuid"],
    }


MIXED = {  # name: (priority, minutes overdue); the claim order, by the rule, is the listed order
    "urgent-old": (9, 30),
    "urgent-new": (9, 1),
    "normal-oldest": (0, 120),
    "normal-old": (0, 45),
    "normal-new": (0, 2),
    "low-old": (-3, 90),
    "low-new": (-3, 5),
}


@pytest.mark.parametrize("limited", [False, True])
def test_a_claim_that_marks_hooks_marks_no_crash_suspect(
    request: pytest.FixtureRequest, backend: Any, limited: bool
) -> None:
    """#28 item 5: a worker's claim stores the hook mark of each pipeline it takes (shared, at
    the claim's time), so that its first hook starts after one commit, not two; a crash suspect
    (an old mark, or crashes charged) keeps what it had, the evidence the engine reads. A
    user's four-method repository marks nothing: the engine then marks as before."""
    repo = backend("PIPELINE")
    expired = (NOW - timedelta(seconds=1)).isoformat()
    old_mark = NOW - timedelta(minutes=2)
    rows = {
        "fresh": pipeline_row(),
        "suspect": pipeline_row(
            lease_owner="dead", lease_expires_at=expired, hook_started_at=old_mark.isoformat(), hook_shared=False
        ),
        "crashed": pipeline_row(crashes=1),
    }
    for row in rows.values():
        repo.save(row)
    limits = {"P": ClaimLimit(max_running=10)} if limited else {}
    claimed = Store(backend).claim(ClaimRequest(NOW, "me", NOW + timedelta(seconds=60), 10, limits, mark=True))
    by_uuid = {record.uuid: record for record in claimed}
    assert set(by_uuid) == {row["uuid"] for row in rows.values()}
    marked = marked_by(claimed, NOW)
    shipped = request.node.callspec.params["backend"] in ("memory", "sqlite", "postgresql", "tinydb")
    assert marked == ({rows["fresh"]["uuid"]} if shipped else set())
    suspect, crashed = by_uuid[rows["suspect"]["uuid"]], by_uuid[rows["crashed"]["uuid"]]
    assert (suspect.hook_started_at, suspect.hook_shared) == (old_mark, False)
    assert (crashed.hook_started_at, crashed.crashes) == (None, 1)
    stored = Store(backend).get_pipeline(rows["fresh"]["uuid"])
    assert stored is not None and (stored.hook_started_at == NOW) is shipped


@pytest.mark.parametrize("how", ["due", "claim", "limited claim"])
def test_every_backend_claims_in_the_one_order(backend: Any, how: str) -> None:
    """Highest priority first, then the longest due (``prorch.model.due.CLAIM_ORDER``), whether the
    backend orders in SQL, in Python, or the engine's fallback does for a four-method
    repository; saved in an order that is neither, so that no order falls out by accident."""
    repo = backend("PIPELINE")
    uuids = {}
    for name in ("normal-new", "low-old", "urgent-new", "normal-oldest", "low-new", "urgent-old", "normal-old"):
        priority, overdue = MIXED[name]
        row = pipeline_row(name=name, priority=priority, next_run_at=(NOW - timedelta(minutes=overdue)).isoformat())
        repo.save(row)
        uuids[row["uuid"]] = name
    store = Store(backend)
    until = NOW + timedelta(seconds=60)
    if how == "due":
        found = store.due(NOW, 100)
    elif how == "claim":
        found = store.claim_due(NOW, "me", until, 100)
    else:
        found = store.claim_due(NOW, "me", until, 100, {name: ClaimLimit(max_running=10) for name in MIXED})
    assert [uuids[record.uuid] for record in found] == list(MIXED)
    if how == "due":  # a limit takes the first ones
        assert [uuids[record.uuid] for record in store.due(NOW, 3)] == list(MIXED)[:3]


ACROSS = {  # label: (class, priority, minutes overdue), in claim order; Limited runs at most 2
    "limited-urgent": ("Limited", 9, 1),
    "free-urgent": ("Free", 5, 1),
    "limited-oldest": ("Limited", 0, 120),
    "free-older": ("Free", 0, 100),
    "limited-old": ("Limited", 0, 60),  # its limit is full by now: left for a later claim
    "free-new": ("Free", 0, 2),
    "free-low": ("Free", -3, 200),
}
SAVED = ["free-new", "limited-old", "free-low", "limited-urgent", "free-older", "limited-oldest", "free-urgent"]
HELD = ["limited-urgent", "free-urgent", "limited-oldest", "free-older", "free-new", "free-low"]
ACROSS_LIMITS = {
    "max_running": ClaimLimit(max_running=2),
    "per_tenant": ClaimLimit(per_tenant=2),
    "per_key": ClaimLimit(per_key=2),
    "rate": ClaimLimit(rate=RateLimit(2, 60)),
    "fair": ClaimLimit(max_running=2, fair=Fairness()),
}


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("kind", list(ACROSS_LIMITS))
def test_limited_and_unlimited_classes_are_claimed_in_the_one_order(backend: Any, kind: str, size: int) -> None:
    """A limited class with room is claimed in its place in the claim order, not after all the
    due work of unlimited classes: claims of one (or three) take the limited pipeline of
    priority 9 first, and the oldest one while it has room left, before a younger unlimited
    one (the SQL claim took every unlimited name first: a limited class waited behind them)."""
    repo = backend("PIPELINE")
    uuids = {}
    for label in SAVED:
        name, priority, overdue = ACROSS[label]
        due = (NOW - timedelta(minutes=overdue)).isoformat()
        row = pipeline_row(name=name, priority=priority, next_run_at=due, concurrency_key='"k"')
        repo.save(row)
        uuids[row["uuid"]] = label
    store, limits = Store(backend), {"Limited": ACROSS_LIMITS[kind]}
    until = NOW + timedelta(seconds=60)
    if not isinstance(repo, SupportsClaim):  # no leases: every pass starts from nothing held
        assert [uuids[p.uuid] for p in store.claim_due(NOW, "w", until, 100, limits)] == HELD
        return
    require(repo, SupportsLimitedClaim)  # a user's claim without limits: they are not enforced (warned)
    taken = []
    for number in range(len(ACROSS)):
        found = store.claim_due(NOW, f"w{number}", until, size, limits)
        assert len(found) <= size
        taken += [uuids[p.uuid] for p in found]
    assert taken == HELD


def test_claim_one_respects_a_live_lease(backend: Any) -> None:
    repo = backend("PIPELINE")
    require(repo, SupportsClaim)
    row = pipeline_row()
    repo.save(row)
    until = NOW + timedelta(seconds=60)
    assert repo.claim_one(row["uuid"], NOW, "me", until)["lease_owner"] == "me"
    assert repo.claim_one(row["uuid"], NOW, "other", until) is None
    assert repo.claim_one(row["uuid"], until, "other", until + timedelta(seconds=60))["lease_owner"] == "other"
    assert repo.claim_one("missing", NOW, "me", until) is None


def test_transaction_is_all_or_nothing(backend: Any) -> None:
    require(backend, SupportsTransaction)
    pipelines, steps = backend("PIPELINE"), backend("STEP")
    row = pipeline_row()
    with pytest.raises(RuntimeError), backend.transaction():
        pipelines.save(row)
        steps.save(StepRecord(uuid=new_uuid(), pipeline_uuid=row["uuid"], name="S", status=Status.CREATED).to_dict())
        raise RuntimeError("crash in the middle of a transition")
    assert not pipelines.get(row["uuid"])
    assert steps.search(["pipeline_uuid", row["uuid"]]) == []


# --- the engine on each backend ------------------------------------------------------------------


def test_a_pipeline_runs_to_the_end(backend: Any, registry: Registry) -> None:
    class Poll(OnStartMixin, OnContinueMixin, Step):
        name = "Poll"

        def on_start(self) -> None:
            self.metadata["checks"] = 0

        def on_continue(self) -> None:
            self.metadata["checks"] += 1
            if self.metadata["checks"] < 3:
                self.wait(seconds=30)
            else:
                self.finish({"checks": self.metadata["checks"]})

    class Report(OnStartMixin, Step):
        name = "Report"

        def on_start(self) -> None:
            self.finish({"seen": self.outputs["Poll"]["checks"]})

    register_step(Poll)
    register_step(Report)
    p = pipeline_of(Poll, Report, name="P")
    harness = Harness(backend, registry=registry)
    runs = [harness.create(p, {"i": i}) for i in range(3)]
    for run in runs:
        assert harness.run_until_done(run.uuid) == "finished"
    state = harness.orchestrator.get(runs[0].uuid)
    assert [s.output for s in state.steps] == [{"checks": 3}, {"seen": 3}]
    assert harness.event_types(runs[0].uuid) == [
        "pipeline.created",
        "pipeline.started",
        "step.started",
        "step.finished",
        "step.started",
        "step.finished",
        "pipeline.finished",
    ]


def test_claims_count_up_and_leases_renew_only_for_their_owner(backend: Any) -> None:
    repo = backend("PIPELINE")
    require(repo, SupportsClaim)
    row = pipeline_row(claims=0)
    repo.save(row)
    until = NOW + timedelta(seconds=60)
    assert repo.claim_one(row["uuid"], NOW, "me", until)["claims"] == 1
    later = until + timedelta(seconds=60)
    assert repo.renew_lease(row["uuid"], "me", later) is True
    stored = PipelineRecord.from_dict(repo.get(row["uuid"]))
    assert stored.lease_expires_at == later and stored.revision == row["revision"] + 1  # not bumped by renew
    assert repo.renew_lease(row["uuid"], "other", later) is False
    assert repo.claim_due(later, "other", later + timedelta(seconds=60), 5)[0]["claims"] == 2


def test_leases_renew_together_each_only_for_its_owner(backend: Any) -> None:
    """``Store.renew_leases``: one batch (one statement, or one rewrite of the TinyDB file, on
    a shipped backend; one ``renew_lease`` each on a user's repository) moves the expiry of
    each lease whose token still holds it, and of no other: a wrong token, a lease another
    owner took, a pipeline not stored."""
    repo = backend("PIPELINE")
    require(repo, SupportsClaim)
    store = Store(backend)
    until, later = NOW + timedelta(seconds=60), NOW + timedelta(seconds=120)
    rows = [pipeline_row() for _ in range(5)]
    for row in rows:
        repo.save(row)
    mine, mine_too, stale, taken, unleased = (row["uuid"] for row in rows)
    for uuid in (mine, mine_too, stale):
        assert store.claim_one(uuid, NOW, "me#1", until) is not None
    assert store.claim_one(taken, NOW, "other#1", until) is not None
    leases = [(mine, "me#1"), (stale, "me#0"), (taken, "me#1"), (mine_too, "me#1"), (unleased, "me#1")]
    leases.append(("missing", "me#1"))
    renewed, failed = store.renew_leases(leases, later)
    assert renewed == {mine, mine_too} and failed == {}
    expiry = {uuid: store.get_pipeline(uuid).lease_expires_at for uuid in (mine, mine_too, stale, taken)}  # type: ignore[union-attr]
    assert expiry == {mine: later, mine_too: later, stale: until, taken: until}
    assert store.get_pipeline(unleased).lease_owner is None  # type: ignore[union-attr]
    assert store.renew_leases([], later) == (set(), {})


@pytest.mark.parametrize(
    "payload",
    [7, 2.5, "text", "7", True, None, [1, "a"], {"n": 1}, 2**70, -(2**63), 2.5e-7, "é ☃ \u2028", {"ü": ["ß"]}],
)
def test_json_values_of_every_shape_round_trip(backend: Any, payload: Any) -> None:
    from prorch import MessageRecord

    messages = backend("MESSAGE")
    row = MessageRecord(uuid=new_uuid(), pipeline_uuid="p", name="m", payload=payload, sent_at=NOW).to_dict()
    messages.save(row)
    assert messages.get(row["uuid"])["payload"] == payload
    assert [m["payload"] for m in messages.search(["pipeline_uuid", "p"])] == [payload]
    steps = backend("STEP")
    step = StepRecord(uuid=new_uuid(), pipeline_uuid="p", name="S", status=Status.FINISHED, output=payload)
    steps.save(step.to_dict())
    assert steps.get(step.uuid)["output"] == payload


def test_create_many_then_run(backend: Any, registry: Registry) -> None:
    class Once(OnStartMixin, Step):
        name = "Once"

        def on_start(self) -> None:
            self.finish({"n": self.params["n"]})

    register_step(Once)
    p = pipeline_of(Once, name="Batch")
    harness = Harness(backend, registry=registry)
    made = p.create_many(backend, [{"n": i} for i in range(20)], clock=harness.clock)
    assert len({m.uuid for m in made}) == 20
    for _ in range(3):
        harness.run_pass()
    outputs = sorted(harness.orchestrator.get(m.uuid).steps[0].output["n"] for m in made)
    assert outputs == list(range(20))


BIG = 2**70 + 1
"""A whole number wider than 64 bits that no float holds exactly (2**70 alone is a float)."""


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql", "tinydb"])
def test_whole_numbers_wider_than_64_bits_round_trip_through_the_engine(
    kind: str, tmp_path: Any, request: pytest.FixtureRequest, registry: Registry
) -> None:
    """Params, metadata and outputs (a scalar one too) come back exact on the engine's own read
    paths: a later hook in a later pass, the next step's ``outputs`` and ``Orchestrator.get``."""
    from tests.integration.conftest import make_backend

    seen: dict[str, Any] = {}

    class Store(OnStartMixin, OnContinueMixin, Step):
        name = "StoreBig"

        def on_start(self) -> None:
            seen["params"] = self.params["n"]
            self.metadata["big"] = [BIG, -BIG, {"n": BIG}]
            self.wait(seconds=1)

        def on_continue(self) -> None:
            seen["metadata"] = self.metadata["big"]
            self.finish(BIG)

    class Read(OnStartMixin, Step):
        name = "ReadBig"

        def on_start(self) -> None:
            seen["output"] = self.outputs["StoreBig"]
            self.finish({"n": BIG, "list": [BIG]})

    register_step(Store)
    register_step(Read)
    backend = make_backend(kind, tmp_path, request)
    harness = Harness(backend, registry=registry)
    uuid = harness.create(pipeline_of(Store, Read, name="Big"), {"n": BIG}).uuid
    assert harness.run_until_done(uuid) == "finished"
    assert seen == {"params": BIG, "metadata": [BIG, -BIG, {"n": BIG}], "output": BIG}
    assert all(type(value) is int for value in (seen["params"], seen["output"]))
    state = harness.orchestrator.get(uuid)
    assert state.pipeline.params == {"n": BIG}
    assert [s.output for s in state.steps] == [BIG, {"n": BIG, "list": [BIG]}]
    assert state.steps[0].metadata["big"] == [BIG, -BIG, {"n": BIG}]
    assert harness.orchestrator.result(uuid) == {"n": BIG, "list": [BIG]}
    if hasattr(backend, "dispose"):
        backend.dispose()


def test_unread_messages_by_name_oldest_first_by_pages(backend: Any) -> None:
    repo = backend("MESSAGE")
    require(repo, SupportsMessageQuery)
    pipeline, other = new_uuid(), new_uuid()
    assert repo.unread_messages(pipeline, "a", None, 10) == [] and repo.last_sent_at(pipeline) is None
    assert not repo.has_unread_messages(pipeline)

    def message(name: str, seconds: int, owner: str = pipeline, read: bool = False) -> dict[str, Any]:
        at = NOW + timedelta(seconds=seconds)
        record = MessageRecord(uuid=new_uuid(), pipeline_uuid=owner, name=name, payload={"n": seconds}, sent_at=at,
                               consumed_at=at if read else None)  # fmt: skip
        repo.save(record.to_dict())
        return record.to_dict()

    tied = sorted([message("a", 5), message("a", 5)], key=lambda row: row["uuid"])  # same time: by uuid
    first, read, later = message("a", 1), message("a", 2, read=True), message("a", 9)
    message("b", 3), message("a", 4, owner=other), message("a", 20, owner=other, read=True)
    order = [first["uuid"], tied[0]["uuid"], tied[1]["uuid"], later["uuid"]]
    assert [r["uuid"] for r in repo.unread_messages(pipeline, "a", None, 10)] == order
    assert repo.unread_messages(pipeline, "a", None, 10)[0]["payload"] == {"n": 1}
    page = repo.unread_messages(pipeline, "a", None, 2)
    assert [r["uuid"] for r in page] == order[:2]
    after = (datetime.fromisoformat(page[-1]["sent_at"]), page[-1]["uuid"])
    assert [r["uuid"] for r in repo.unread_messages(pipeline, "a", after, 10)] == order[2:]
    assert read["uuid"] not in order and repo.has_unread_messages(pipeline) and repo.has_unread_messages(other)
    assert repo.last_sent_at(pipeline) == NOW + timedelta(seconds=9)
    assert repo.last_sent_at(other) == NOW + timedelta(seconds=20)
    repo.update(first["uuid"], {"consumed_at": NOW.isoformat()})
    assert [r["uuid"] for r in repo.unread_messages(pipeline, "a", None, 10)] == order[1:]


def test_worker_rows_are_upserted_listed_and_deleted(backend: Any) -> None:
    """A heartbeat replaces its worker's row; a clean stop deletes it (issue #27), on every
    backend and on a user's repository (message records addressed to no pipeline)."""
    store = Store(backend)
    start = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    one = WorkerRow(id="h:1:aa", host="h", pid=1, prorch_version="2.0", app_version="1.5", started_at=start,
                    heartbeat_at=start, beat_seconds=5.0, concurrency=4, in_flight=0)  # fmt: skip
    two = WorkerRow(id="h:2:bb", host="h", pid=2, prorch_version="2.0", app_version=None,
                    started_at=start + timedelta(seconds=1), heartbeat_at=start, beat_seconds=0.5,
                    concurrency=1, in_flight=1)  # fmt: skip
    store.upsert_worker(one)
    store.upsert_worker(two)
    one.heartbeat_at, one.in_flight = start + timedelta(seconds=5), 3
    store.upsert_worker(one)
    assert store.workers() == [one, two]
    assert one.alive(start + timedelta(seconds=20)) and not two.alive(start + timedelta(seconds=2))
    store.delete_worker(one.id)
    store.delete_worker("never:was:here")
    assert store.workers() == [two]
    assert store.pipelines_with_status(Status.PENDING) == []  # nothing else was written as a pipeline
