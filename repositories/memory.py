"""``memory://``: every record in a dict, for tests and ``prorch.testing``.

Records are kept as JSON text, so that only JSON survives a round trip, as with a real store,
and nothing a caller holds aliases what is stored. Thread-safe, with every capability (claim
with lease, compare-and-set, transaction, due query), so the engine's multi-worker paths run on
it too; nothing survives the process.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from prorch.model.due import TERMINAL_VALUES, ClaimRequest, Runnable, can_run, claim_order, claimable_by, is_due, leased
from prorch.model.limit_rules import StartLog, Tally, fair_order, within_limits
from prorch.model.records import JSONDict, MessageRecord, Metadata, format_timestamp, to_utc
from prorch.model.status import Status
from prorch.storage.composed import RepositoryBackend
from prorch.storage.repository import ClaimsByRequest, IRepository

INDEXED = ("pipeline_uuid", "status", "key")  # the fields the engine searches by
TICKS = "schedule_ticks"  # the table of schedules' last ticks, one row per schedule
WORKERS = "workers"  # the table of worker rows, by worker id
PAUSES = "pauses"  # the table of pauses, by scope (prorch.model.pauses)


class MemoryBackend(RepositoryBackend):
    """A backend: ``backend(model)`` gives the repository of that model; all share one lock."""

    thread_safe = True

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._tables: dict[str, MemoryRepository] = {}
        self._undo: list[tuple[MemoryRepository, str, str | None]] | None = None

    def __call__(self, model: str) -> MemoryRepository:
        with self.lock:
            if model not in self._tables:
                self._tables[model] = MemoryRepository(model, self)
            return self._tables[model]

    def __repr__(self) -> str:
        return "MemoryBackend('memory://')"

    @property
    def tables(self) -> dict[str, dict[str, JSONDict]]:
        """A snapshot of every table, for tests to look at."""
        with self.lock:
            for model in Metadata.TABLE_NAMES:  # every model's, those not written to yet too
                self(model)
            return {model: {u: json.loads(t) for u, t in repo.rows.items()} for model, repo in self._tables.items()}

    def schedule_ticks(self) -> dict[str, datetime]:
        """Every schedule's last created tick (``SupportsScheduleTicks``)."""
        with self.lock:
            rows = (json.loads(text) for text in self(TICKS).rows.values())
            return {row["name"]: to_utc(datetime.fromisoformat(row["tick"])) for row in rows}

    def advance_schedule(self, name: str, tick: datetime) -> bool:
        """Move the schedule's last tick forward to ``tick``, under the backend's lock (in a
        transaction, rolled back with it)."""
        with self.lock:
            marks = self(TICKS)
            stored = marks._row(name)
            if stored is not None and to_utc(datetime.fromisoformat(stored["tick"])) >= tick:
                return False
            marks._write(name, {"uuid": name, "name": name, "tick": format_timestamp(tick)})
            return True

    def upsert_worker(self, row: JSONDict) -> None:
        with self.lock:
            self(WORKERS)._put(str(row["id"]), json.dumps(row))

    def delete_worker(self, worker_id: str) -> None:
        with self.lock:
            self(WORKERS)._put(worker_id, None)

    def workers(self) -> list[JSONDict]:
        with self.lock:
            return [json.loads(text) for text in self(WORKERS).rows.values()]

    def rate_starts(self, name: str, since: datetime) -> int:
        with self.lock:
            stamp = format_timestamp(since)
            return sum(start > stamp for start in self(Metadata.PIPELINES_MODEL).starts.starts.get(name, []))

    def pauses(self) -> list[JSONDict]:
        with self.lock:
            return [json.loads(text) for text in self(PAUSES).rows.values()]

    def add_pause(self, row: JSONDict) -> bool:
        with self.lock:
            table, scope = self(PAUSES), str(row["scope"])
            if scope in table.rows:
                return False
            table._write(scope, {**row, "uuid": scope})
            return True

    def drop_pause(self, scope: str) -> JSONDict | None:
        with self.lock:
            table = self(PAUSES)
            found = table._row(scope)
            if found is not None:
                table.delete_by("uuid", [scope])
                found.pop("uuid", None)
            return found

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes in the block, or none: on an exception the tables are put back."""
        with self.lock:
            if self._undo is not None:  # nested: the outer block decides
                yield
                return
            self._undo = []
            try:
                yield
            except BaseException:
                for repository, uuid, previous in reversed(self._undo):
                    repository._put(uuid, previous)
                raise
            finally:
                self._undo = None


class MemoryRepository(ClaimsByRequest, IRepository):
    """One model's table inside a ``MemoryBackend``, indexed by the fields the engine searches."""

    partial_update = True  # update and compare_and_set keep the fields not given

    def __init__(self, model: str, backend: MemoryBackend) -> None:
        super().__init__(model)
        self.backend = backend
        self.rows: dict[str, str] = {}
        self.starts = StartLog()  # rate-limited names' recent claims (a pipelines table's)
        # value -> uuids, in insertion order (a dict used as an ordered set)
        self.index: dict[str, dict[Any, dict[str, None]]] = {field: defaultdict(dict) for field in INDEXED}
        # pending pipelines' (priority, next_run_at, lease_expires_at): the due query reads no JSON
        self.due_keys: dict[str, tuple[int, str | None, str | None]] = {}
        # messages: unread ones by (pipeline, name) -> {uuid: (sent_at, uuid)}; each pipeline's
        # newest sent_at ever stored (kept on delete: a later message still goes after it)
        self.unread: dict[tuple[Any, Any], dict[str, tuple[str, str]]] = defaultdict(dict)
        self.unread_count: dict[Any, int] = defaultdict(int)
        self.last_sent: dict[Any, str] = {}

    def _put(self, uuid: str, text: str | None) -> None:
        """Store (or with None, remove) a row and keep the indexes in step."""
        old = self.rows.get(uuid)
        if old is not None:
            old_row = json.loads(old)
            for field in INDEXED:
                self.index[field][old_row.get(field)].pop(uuid, None)
            self.due_keys.pop(uuid, None)
            self._unindex_message(old_row)
        if text is None:
            self.rows.pop(uuid, None)
            return
        self.rows[uuid] = text
        row = json.loads(text)
        for field in INDEXED:
            self.index[field][row.get(field)][uuid] = None
        if row.get("status") == Status.PENDING.value:
            self.due_keys[uuid] = (row.get("priority", 0), row.get("next_run_at"), row.get("lease_expires_at"))
        if self.model == MessageRecord.MODEL:
            self._index_message(row)

    def _index_message(self, row: JSONDict) -> None:
        pipeline, sent_at = row.get("pipeline_uuid"), str(row.get("sent_at"))
        self.last_sent[pipeline] = max(self.last_sent.get(pipeline, sent_at), sent_at)
        if row.get("consumed_at") is None:
            self.unread[(pipeline, row.get("name"))][row["uuid"]] = (sent_at, row["uuid"])
            self.unread_count[pipeline] += 1

    def _unindex_message(self, row: JSONDict) -> None:
        if self.model == MessageRecord.MODEL and row.get("consumed_at") is None:
            pipeline = row.get("pipeline_uuid")
            if self.unread[(pipeline, row.get("name"))].pop(row["uuid"], None) is not None:
                self.unread_count[pipeline] -= 1

    def _write(self, uuid: str, row: JSONDict) -> None:
        if self.backend._undo is not None:
            self.backend._undo.append((self, uuid, self.rows.get(uuid)))
        self._put(uuid, json.dumps(row))

    def _row(self, uuid: str) -> JSONDict | None:
        text = self.rows.get(uuid)
        return json.loads(text) if text is not None else None

    def get(self, uuid: str) -> JSONDict | None:
        with self.backend.lock:
            return self._row(uuid)

    def save(self, data: JSONDict) -> str:
        uuid = data["uuid"]
        with self.backend.lock:
            if uuid in self.rows:
                raise KeyError(f"{self.model} {uuid} already exists")
            self._write(uuid, data)
        return str(uuid)

    def update(self, uuid: str, data: JSONDict) -> None:
        with self.backend.lock:
            current = self._row(uuid)
            if current is None:
                raise KeyError(f"{self.model} {uuid} does not exist")
            self._write(uuid, {**current, **data})

    def delete_by(self, field: str, values: list[Any]) -> int:
        wanted = set(values)
        with self.backend.lock:
            if field == "uuid":
                uuids = [u for u in wanted if u in self.rows]
            elif field in self.index:
                uuids = [u for value in wanted for u in self.index[field].get(value, ())]
            else:
                uuids = [u for u, text in self.rows.items() if json.loads(text).get(field) in wanted]
            for uuid in uuids:
                if self.backend._undo is not None:
                    self.backend._undo.append((self, uuid, self.rows.get(uuid)))
                self._put(uuid, None)
        return len(uuids)

    def search_many(self, field: str, values: list[Any]) -> list[JSONDict]:
        with self.backend.lock:
            if field == "uuid":  # the rows' own key (a keyed create_many): no scan per value
                return [json.loads(self.rows[uuid]) for uuid in dict.fromkeys(values) if uuid in self.rows]
            return [row for value in dict.fromkeys(values) for row in self.search([field, value])]

    def search(self, filter: list[Any]) -> list[JSONDict]:  # noqa: A002 - the seed's name
        field, value = filter
        with self.backend.lock:
            if field in self.index:
                uuids = list(self.index[field].get(value, ()))
                return [json.loads(self.rows[u]) for u in uuids]
            rows = (json.loads(text) for text in self.rows.values())
            return [row for row in rows if row.get(field) == value]

    # --- capabilities ------------------------------------------------------------------------

    def compare_and_set(self, uuid: str, expected_revision: int, data: JSONDict) -> bool:
        with self.backend.lock:
            current = self._row(uuid)
            if current is None or current.get("revision", 0) != expected_revision:
                return False
            self._write(uuid, {**current, **data})
            return True

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[JSONDict]:
        with self.backend.lock:
            start = (format_timestamp(after[0]), after[1]) if after is not None else ("", "")
            keys = [key for key in self.unread.get((pipeline_uuid, name), {}).values() if key > start]
            return [json.loads(self.rows[uuid]) for _, uuid in heapq.nsmallest(limit, keys)]

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        with self.backend.lock:
            return self.unread_count.get(pipeline_uuid, 0) > 0

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        with self.backend.lock:
            found = self.last_sent.get(pipeline_uuid)
        return datetime.fromisoformat(found) if found is not None else None

    def search_due(self, now: datetime, limit: int) -> list[JSONDict]:
        with self.backend.lock:
            return self._due(format_timestamp(now), limit)

    def claim(self, request: ClaimRequest) -> list[JSONDict]:
        now, limits = request.now, request.limits
        with self.backend.lock:
            stamp = format_timestamp(now)
            if not limits:
                chosen = self._due(stamp, request.limit, request.runnable)
            else:
                leased_now = [u for u, (_, _, lease) in self.due_keys.items() if lease is not None and lease > stamp]
                tally = Tally(limits, started=self.starts.counts(limits, now))
                tally.add_leased(json.loads(self.rows[u]) for u in leased_now)
                due = [(row, row) for row in self._due(stamp, len(self.due_keys), request.runnable)]
                chosen = within_limits(fair_order(due, limits), tally, request.limit)
                self.starts.record(chosen, limits, now)
            mark = stamp if request.mark else None
            return [self._lease(row, request.owner, request.lease_expires_at, mark) for row in chosen]

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        with self.backend.lock:
            row = self._row(uuid)
            if row is None or row.get("status") in TERMINAL_VALUES:
                return row
            if not claimable_by(row, owner, format_timestamp(now)):
                return None
            return self._lease(row, owner, lease_expires_at)

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        with self.backend.lock:
            row = self._row(uuid)
            if row is None or row.get("lease_owner") != owner:
                return False
            row["lease_expires_at"] = format_timestamp(lease_expires_at)
            self._write(uuid, row)
            return True

    def renew_leases(self, leases: Sequence[tuple[str, str]], lease_expires_at: datetime) -> set[str]:
        """Under the backend's lock, once for the batch."""
        with self.backend.lock:
            return {uuid for uuid, owner in leases if self.renew_lease(uuid, owner, lease_expires_at)}

    def _due(self, now: str, limit: int, runnable: Runnable | None = None) -> list[JSONDict]:
        due = [
            (*claim_order(priority, next_run_at), uuid)
            for uuid, (priority, next_run_at, lease) in self.due_keys.items()
            if is_due(Status.PENDING.value, next_run_at, lease, now)
        ]
        due.sort()
        rows = (json.loads(self.rows[uuid]) for _, _, uuid in due)
        paused = self.backend.paused()
        wanted = (row for row in rows if can_run(row, runnable) and not paused.holds_row(row))
        return list(itertools.islice(wanted, limit))

    def _lease(self, row: JSONDict, owner: str, lease_expires_at: datetime, mark: str | None = None) -> JSONDict:
        claimed = leased(row, owner, format_timestamp(lease_expires_at), mark)
        self._write(claimed["uuid"], claimed)
        return claimed
