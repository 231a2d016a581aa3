"""A worker's row: who runs hooks on a store right now (``prorch workers``, the dashboard's
Workers page). Its heartbeat rewrites it every few seconds; a clean stop deletes it; a row whose
heartbeat is late belongs to a worker that died (or froze), and the pipelines it leased are
stranded until their leases run out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from prorch.model.records import JSONDict, format_timestamp, to_utc

HEARTBEAT_SECONDS = 5.0
"""How often a worker rewrites its row (at most; a worker with short leases beats faster)."""
STALE_BEATS = 3
"""A row whose heartbeat is older than this many of its beats belongs to a dead worker."""


def worker_of(lease_owner: str | None) -> str | None:
    """The id of the worker whose lease token this is: a token is ``<worker id>#<claim>``."""
    if not lease_owner:
        return None
    return lease_owner.split("#", 1)[0]


def _time(value: object) -> datetime:
    if isinstance(value, datetime):
        return to_utc(value)
    return to_utc(datetime.fromisoformat(str(value)))


@dataclass(slots=True)
class WorkerRow:
    """One live (or lately dead) worker process."""

    id: str
    host: str
    pid: int
    prorch_version: str
    app_version: str | None
    started_at: datetime
    heartbeat_at: datetime
    beat_seconds: float
    concurrency: int
    in_flight: int

    def to_dict(self) -> JSONDict:
        """The row as JSON values (times as ISO 8601 text)."""
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "prorch_version": self.prorch_version,
            "app_version": self.app_version,
            "started_at": format_timestamp(self.started_at),
            "heartbeat_at": format_timestamp(self.heartbeat_at),
            "beat_seconds": self.beat_seconds,
            "concurrency": self.concurrency,
            "in_flight": self.in_flight,
        }

    @classmethod
    def from_dict(cls, data: JSONDict) -> WorkerRow:
        """A row as a backend returns it (times as text or as datetimes)."""
        return cls(
            id=str(data["id"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            prorch_version=str(data["prorch_version"]),
            app_version=None if data.get("app_version") is None else str(data["app_version"]),
            started_at=_time(data["started_at"]),
            heartbeat_at=_time(data["heartbeat_at"]),
            beat_seconds=float(data["beat_seconds"]),
            concurrency=int(data["concurrency"]),
            in_flight=int(data["in_flight"]),
        )

    @property
    def free_slots(self) -> int:
        return max(self.concurrency - self.in_flight, 0)

    def alive(self, now: datetime) -> bool:
        """Whether its heartbeat is recent: within ``STALE_BEATS`` of its beats."""
        return now - self.heartbeat_at <= timedelta(seconds=STALE_BEATS * self.beat_seconds)

    def summary(self, now: datetime) -> JSONDict:
        """The row with whether it is alive and its free slots (``prorch workers --json``, ``/api/workers``)."""
        return {**self.to_dict(), "alive": self.alive(now), "free_slots": self.free_slots}


def stranded_until(
    lease_owner: str | None, lease_expires_at: datetime | None, rows: list[WorkerRow], now: datetime
) -> datetime | None:
    """When a pipeline whose live lease belongs to a worker whose row is stale (it died or
    froze) resumes: its lease's expiry. None when the holder is alive, or left no row (a
    command's short claim, a worker of an older prorch), or no live lease is held."""
    owner = worker_of(lease_owner)
    if owner is None or lease_expires_at is None or to_utc(lease_expires_at) <= now:
        return None
    row = next((r for r in rows if r.id == owner), None)
    if row is None or row.alive(now):
        return None
    return to_utc(lease_expires_at)
