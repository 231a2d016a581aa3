"""The due rule written once (prorch/model/due.py), on datetimes and on stored ISO strings."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from prorch.model.due import (
    claim_order,
    claimable_by,
    holds_lease,
    is_due,
    is_leased,
    leased,
    row_claim_order,
    row_is_due,
)
from prorch.model.records import format_timestamp

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
EARLIER, LATER = NOW - timedelta(seconds=1), NOW + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("status", "next_run_at", "lease", "due"),
    [
        ("pending", None, None, True),  # no time: due at once
        ("pending", EARLIER, None, True),
        ("pending", NOW, NOW, True),  # both bounds inclusive
        ("pending", LATER, None, False),  # waiting
        ("pending", EARLIER, LATER, False),  # leased by a live worker
        ("pending", EARLIER, EARLIER, True),  # the lease expired
        ("created", None, None, False),  # a seed pipeline not started
        ("finished", None, None, False),
    ],
)
def test_due_on_datetimes_and_on_stored_strings_alike(
    status: str, next_run_at: datetime | None, lease: datetime | None, due: bool
) -> None:
    assert is_due(status, next_run_at, lease, NOW) is due
    row = {
        "status": status,
        "next_run_at": format_timestamp(next_run_at) if next_run_at else None,
        "lease_expires_at": format_timestamp(lease) if lease else None,
    }
    assert row_is_due(row, format_timestamp(NOW)) is due


def test_claim_order_is_priority_first_then_the_longest_due() -> None:
    rows = [
        {"uuid": "low-old", "priority": 0, "next_run_at": "2029"},
        {"uuid": "high-new", "priority": 5, "next_run_at": "2030"},
        {"uuid": "low-now", "priority": 0, "next_run_at": None},
        {"uuid": "high-old", "priority": 5, "next_run_at": "2028"},
    ]
    assert [r["uuid"] for r in sorted(rows, key=row_claim_order)] == ["high-old", "high-new", "low-now", "low-old"]
    assert claim_order(1, None) < claim_order(0, "2000")


def test_one_pipeline_is_claimable_unless_another_owner_holds_a_live_lease() -> None:
    now = format_timestamp(NOW)
    live = {"lease_owner": "a", "lease_expires_at": format_timestamp(LATER)}
    assert claimable_by(live, "a", now) is True  # our own lease: renewed
    assert claimable_by(live, "b", now) is False
    assert claimable_by({**live, "lease_expires_at": format_timestamp(EARLIER)}, "b", now) is True
    assert claimable_by({}, "b", now) is True


def test_a_claim_leases_counts_and_bumps_the_revision() -> None:
    row = {"uuid": "x", "claims": 1, "revision": 3, "lease_owner": None}
    assert leased(row, "me", "2030-01-01T00:00:30.000000+00:00") == {
        "uuid": "x", "claims": 2, "revision": 4, "lease_owner": "me",
        "lease_expires_at": "2030-01-01T00:00:30.000000+00:00",
    }  # fmt: skip
    assert row["revision"] == 3  # the row given is left as it was


@pytest.mark.parametrize(
    ("status", "lease", "leased"),
    [
        ("pending", LATER, True),
        ("pending", NOW, False),  # a lease expiring exactly now is over
        ("pending", EARLIER, False),
        ("pending", None, False),
        ("created", LATER, False),  # only pending pipelines count against max_running
        ("finished", LATER, False),
    ],
)
def test_a_live_lease_on_datetimes_and_on_stored_strings_alike(
    status: str, lease: datetime | None, leased: bool
) -> None:
    assert is_leased(status, lease, NOW) is leased
    row = {"status": status, "lease_expires_at": format_timestamp(lease) if lease else None}
    assert holds_lease(row, format_timestamp(NOW)) is leased


def test_a_lease_expiring_exactly_now_is_claimable_by_another_owner() -> None:
    now = format_timestamp(NOW)
    assert claimable_by({"lease_owner": "a", "lease_expires_at": now}, "b", now) is True
    assert row_is_due({"status": "pending", "lease_expires_at": now}, now) is True


def test_a_claim_of_a_row_never_claimed_counts_from_zero() -> None:
    row = leased({"uuid": "x"}, "me", "2030")
    assert (row["claims"], row["revision"]) == (1, 1)


def test_priority_is_0_by_default_in_the_claim_order() -> None:
    assert row_claim_order({"next_run_at": "2030"}) == (0, "2030")
    assert row_claim_order({"priority": -1}) > row_claim_order({"next_run_at": "2031"})
