"""A pipeline class's limits (prorch/model/limit_rules.py): parsed from its attributes, and kept by a claim
on the in-memory store, at counts above 1 and together (max_running with a rate limit)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from prorch.model.exceptions import RegistrationError
from prorch.model.limit_rules import (
    ClaimLimit,
    Fairness,
    RateLimit,
    StartLog,
    Tally,
    fair_order,
    limits_of,
    tenant_key,
    within_limits,
)
from prorch.model.records import format_timestamp
from prorch.model.registry import Registry
from prorch.storage.store import Store
from repositories.memory import MemoryBackend
from tests.support.builders import pipeline_of, step_of

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
LEASE = NOW + timedelta(seconds=30)


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [
        ("100/minute", 100, 60),
        ("10/second", 10, 1),
        ("10/seconds", 10, 1),
        ("5/10s", 5, 10),
        ("1000/2h", 1000, 7200),
        ("3/1.5m", 3, 90),
        (" 7 / day ", 7, 86400),
        ("1/d", 1, 86400),
    ],
)
def test_a_rate_is_parsed_to_a_count_and_seconds(text: str, count: int, seconds: float) -> None:
    rate = RateLimit.parse(text)
    assert (rate.count, rate.seconds) == (count, seconds)
    assert rate.period == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5/0s", "the count and the period must be more than 0"),
        ("5/0.0m", "the count and the period must be more than 0"),
        ("0/minute", "the count and the period must be more than 0"),
        ("5/fortnight", r"is not a rate: .* \(periods: second, minute, hour, day, or a number of s, m, h, d\)$"),
        ("minute", "is not a rate"),
        ("5 per minute", "is not a rate"),
        (5, "is not a rate"),
    ],
)
def test_a_rate_that_is_not_one_is_refused(text: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimit.parse(text)


def test_a_class_without_limits_has_none(registry: Registry) -> None:
    assert limits_of(pipeline_of(step_of("A"), name="Free")) is None


def test_a_class_s_limits_are_read_from_its_attributes(registry: Registry) -> None:
    cls = pipeline_of(step_of("A"), name="Bound", max_running=3, max_running_per_tenant=2, rate_limit="5/10s")
    assert limits_of(cls) == ClaimLimit(3, 2, RateLimit(5, 10))
    assert limits_of(pipeline_of(step_of("B"), name="OnlyTenant", max_running_per_tenant=4)) == ClaimLimit(None, 4)
    assert limits_of(pipeline_of(step_of("C"), name="OnlyRate", rate_limit="2/s")) == ClaimLimit(rate=RateLimit(2, 1))


@pytest.mark.parametrize("attribute", ["max_running", "max_running_per_tenant"])
@pytest.mark.parametrize("value", [0, -1, True, 2.0, "3"])
def test_a_limit_that_is_not_a_whole_number_of_1_or_more_is_refused(attribute: str, value: Any) -> None:
    cls = type("Odd", (), {"name": "Odd", attribute: value})
    with pytest.raises(RegistrationError, match=f"pipeline Odd: {attribute} must be a whole number of 1 or more"):
        limits_of(cls)


def test_a_bad_rate_limit_is_refused_with_the_class_name() -> None:
    cls = type("Burst", (), {"rate_limit": "5/0s"})
    with pytest.raises(RegistrationError, match=r"pipeline Burst: rate_limit '5/0s': the count and the period"):
        limits_of(cls)


def test_a_limit_of_1_is_accepted() -> None:
    assert limits_of(type("One", (), {"name": "One", "max_running": 1, "max_running_per_tenant": 1})) == ClaimLimit(
        1, 1
    )


def test_tenants_are_told_apart_by_type_and_value() -> None:
    assert tenant_key({"tenant": "1"}) != tenant_key({"tenant": 1})
    assert tenant_key({"tenant": "acme"}) == ("str", "acme")
    assert tenant_key({"tenant": {"id": 1}}) is None and tenant_key(None) is None and tenant_key({}) is None


def _claim(store: Store, limits: dict[str, ClaimLimit], limit: int = 100, now: datetime = NOW) -> list[str]:
    return sorted(
        str(r.context.get("tenant")) for r in store.claim_due(now, "w", now + timedelta(seconds=30), limit, limits)
    )


def _store(registry: Registry, tenants: list[str | None], **attrs: Any) -> tuple[Store, dict[str, ClaimLimit]]:
    """A store of pending pipelines of a class with ``attrs`` as limits, one per tenant given."""
    backend = MemoryBackend()
    cls = pipeline_of(step_of("A"), name="L", **attrs)
    for tenant in tenants:
        cls.create(backend, tenant=tenant, registry=registry)
    limits = limits_of(cls)
    assert limits is not None
    return Store(backend), {"L": limits}


def test_max_running_above_1_is_kept_across_claims(registry: Registry) -> None:
    store, limits = _store(registry, ["a", "b", "c", "d", "e"], max_running=3)
    assert len(_claim(store, limits, limit=2)) == 2  # the claim's own limit first
    assert len(_claim(store, limits)) == 1  # 2 held: room for 1 more
    assert _claim(store, limits) == []
    assert len(_claim(store, limits, now=NOW + timedelta(seconds=31))) == 3  # the leases expired


def test_max_running_per_tenant_above_1(registry: Registry) -> None:
    store, limits = _store(registry, ["a", "a", "a", "b", "b", "b", None, None, None], max_running_per_tenant=2)
    assert _claim(store, limits) == ["None", "None", "a", "a", "b", "b"]
    assert _claim(store, limits) == []


def test_max_running_with_a_rate_limit_keeps_the_lower(registry: Registry) -> None:
    store, limits = _store(registry, list("abcdefgh"), max_running=5, rate_limit="3/minute")
    assert len(_claim(store, limits)) == 3  # the rate is the lower
    later = NOW + timedelta(minutes=2)  # leases expired and the rate window passed
    store, limits = _store(registry, list("abcdefgh"), max_running=2, rate_limit="10/minute")
    assert len(_claim(store, limits)) == 2  # max_running is the lower
    assert len(_claim(store, limits, now=later)) == 2


def test_a_rate_counts_the_starts_of_the_window_only(registry: Registry) -> None:
    store, limits = _store(registry, list("abcdef"), rate_limit="2/minute")
    assert len(_claim(store, limits)) == 2
    assert _claim(store, limits, now=NOW + timedelta(seconds=59)) == []  # leases expired, the window not
    assert len(_claim(store, limits, now=NOW + timedelta(seconds=61))) == 2


def test_a_tally_counts_what_is_leased_and_what_it_takes() -> None:
    limits = {"L": ClaimLimit(max_running=4, per_tenant=2)}
    tally = Tally(limits).add_leased([{"name": "L", "context": {"tenant": "a"}}, {"name": "other", "context": {}}])
    assert tally.room("L") == 3 and tally.room("other") is None
    rows = [({"name": "L", "context": {"tenant": t}}, t) for t in ["a", "a", "b", "b", "b"]]
    assert within_limits(rows, tally, 10) == ["a", "b", "b"]
    assert tally.room("L") == 0
    assert sorted(tally.full_tenants("L"), key=str) == [("str", "a"), ("str", "b")]
    assert tally.full_tenants("other") == []
    assert within_limits([({"name": "other"}, 1), ({"name": "other"}, 2)], tally, 1) == [1]


def test_full_tenants_are_one_name_s() -> None:
    tally = Tally({"L": ClaimLimit(per_tenant=2), "M": ClaimLimit(max_running=10)})
    tally.add_leased([{"name": "M", "context": {"tenant": "z"}}] * 3 + [{"name": "L", "context": {"tenant": "a"}}])
    assert tally.full_tenants("L") == []  # M's tenant z holds 3, but of M


def test_a_tally_s_room_is_never_negative() -> None:
    tally = Tally({"L": ClaimLimit(max_running=1, rate=RateLimit(1, 60))})
    tally.add_leased([{"name": "L"}, {"name": "L"}])
    assert tally.room("L") == 0


def test_a_start_log_starts_from_the_starts_it_is_given() -> None:
    limits = {"L": ClaimLimit(rate=RateLimit(5, 60))}
    log = StartLog({"L": [format_timestamp(NOW)]})  # as TinyDB reads them back from its file
    assert log.counts(limits, NOW + timedelta(seconds=1)) == {"L": 1}


def test_a_start_log_drops_starts_older_than_the_window() -> None:
    limits = {"L": ClaimLimit(rate=RateLimit(5, 60)), "M": ClaimLimit(max_running=1)}
    log = StartLog()
    log.record([{"name": "L"}, {"name": "M"}, {"name": "N"}], limits, NOW)
    log.record([{"name": "L"}], limits, NOW + timedelta(seconds=30))
    assert log.starts == {"L": [format_timestamp(NOW), format_timestamp(NOW + timedelta(seconds=30))]}
    assert log.counts(limits, NOW + timedelta(seconds=59)) == {"L": 2}
    assert log.counts(limits, NOW + timedelta(seconds=60)) == {"L": 1}  # a start exactly a period ago is out
    assert log.starts == {"L": [format_timestamp(NOW + timedelta(seconds=30))]}


def fair_rows(*groups: str, name: str = "F") -> list[tuple[dict[str, Any], int]]:
    return [({"name": name, "concurrency_key": f'"{group}"'}, i) for i, group in enumerate(groups)]


def test_fair_order_takes_groups_in_turn_and_leaves_other_names_in_place() -> None:
    limits = {"F": ClaimLimit(fair=Fairness())}
    due = [*fair_rows("big", "big", "big"), ({"name": "other"}, 3), *fair_rows("small", "small")]
    due[-2:] = [(row, 4 + i) for i, (row, _) in enumerate(due[-2:])]
    assert [kept for _, kept in fair_order(due, limits, start=0)] == [0, 4, 1, 3, 5, 2]


def test_fair_order_rotates_the_first_group_so_claims_of_one_alternate() -> None:
    """Turns carry no memory between claims: without the rotation a claim of one pipeline
    would take the backlog's group every time, and the other group's never."""
    limits = {"F": ClaimLimit(fair=Fairness())}
    due = fair_rows("big", "big", "big", "small")
    firsts = [fair_order(due, limits, start=claim)[0][0]["concurrency_key"] for claim in range(4)]
    assert firsts == ['"big"', '"small"', '"big"', '"small"']


def test_fair_order_gives_a_weighted_group_its_turns() -> None:
    limits = {"F": ClaimLimit(fair=Fairness((('"gold"', 3.0),)))}
    due = fair_rows(*["free"] * 6, *["gold"] * 6)
    taken = [row["concurrency_key"] for row, _ in fair_order(due, limits, start=0)[:8]]
    assert taken.count('"gold"') == 6 and taken.count('"free"') == 2


def test_fair_order_keeps_each_fair_name_in_its_own_places() -> None:
    """Two fair names: each one's turns fill the places its own pipelines hold (docs/concepts.md,
    and the SQL claim, which orders each name apart). The turns of both were sorted together
    into all their places, so a name's first turn took another name's place: G's second group
    (due last) came before F's second pipeline, and a claim of two took F's and G's instead of
    F's two, which the claim order puts first."""
    limits = {"F": ClaimLimit(fair=Fairness()), "G": ClaimLimit(fair=Fairness())}
    due = [*fair_rows("f0", "f0"), *fair_rows("g0", "g1", name="G")]
    due = [(row, i) for i, (row, _) in enumerate(due)]
    assert [kept for _, kept in fair_order(due, limits, start=0)] == [0, 1, 2, 3]
