"""``tinydb:///prorch.json``: the prorch 1.0.1 JSON store, made crash-safe and multi-process.

The file stays human-readable TinyDB JSON (the same layout a 1.0.1 ``TinyDBRepository`` wrote,
so such a file opens here). Unlike TinyDB's own ``JSONStorage``, which rewrites the file in place,
``AtomicJSONStorage`` writes a temp file in the same folder, fsyncs it and renames it over the old
one, under an inter-process lock: a SIGKILL mid-write leaves the old file or the new one, never a
torn one. A file that is empty, truncated or not JSON is reported, never replaced.

Every lookup scans the table in memory (the file is parsed once per change): fine for thousands
of pipelines; use SQLite beyond that.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock
from tinydb.storages import Storage

from prorch.model.due import (
    TERMINAL_VALUES,
    ClaimRequest,
    Runnable,
    can_run,
    claimable_by,
    holds_lease,
    leased,
    row_claim_order,
    row_is_due,
)
from prorch.model.exceptions import ConfigurationError, CorruptRecordError, CorruptStoreError
from prorch.model.limit_rules import StartLog, Tally, fair_order, within_limits
from prorch.model.pauses import Paused
from prorch.model.records import JSONDict, Metadata, format_timestamp, to_utc
from prorch.model.status import Status
from prorch.storage.composed import RepositoryBackend
from prorch.storage.repository import ClaimsByRequest, IRepository
from prorch.storage.wakeups import Bell, bell_for

STATUSES = tuple(status.value for status in Status)
STATUS_MODELS = (Metadata.PIPELINES_MODEL, Metadata.STEP_MODEL)
RATE_TABLE = "rate_limit_starts"
TICKS_TABLE = "schedule_ticks"  # one document: each schedule's last created tick
WORKERS_TABLE = "workers"  # one document: the worker rows, by worker id
PAUSES_TABLE = "pauses"  # one document: the pauses, by scope (prorch.model.pauses)
"""The starts of rate-limited pipelines within their window, in one document by name."""


class AtomicJSONStorage(Storage):
    """A TinyDB ``Storage`` writing whole-file replacements atomically. Call it only while the
    backend's lock is held. Parsed data is cached and re-read only when the file changed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._cache: dict[str, dict[str, Any]] | None = None
        self._stamp: tuple[int, int, int] | None = None
        self.buffering = False  # inside a transaction: writes stay in memory until flush()
        self._dirty = False
        self.next_ids: dict[str, int] = {}  # per table; forgotten whenever the file is read again

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> dict[str, dict[str, Any]] | None:
        if self.buffering and self._cache is not None:
            return self._cache
        stamp = self._file_stamp()
        if stamp is None:
            self._cache, self._stamp = None, None
            return None
        if stamp == self._stamp and self._cache is not None:
            return self._cache
        text = self.path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            what = "empty" if not text.strip() else f"not valid JSON ({exc})"
            raise CorruptStoreError(
                f"TinyDB store {self.path} is {what}; it was left untouched: restore it from a backup "
                "or move it away to start a new store"
            ) from exc
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise CorruptStoreError(f"TinyDB store {self.path} does not hold TinyDB tables; it was left untouched")
        self._cache, self._stamp = data, stamp
        self.next_ids = {}
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        self._cache = data
        if self.buffering:
            self._dirty = True
            return
        self._replace(data)

    def flush(self) -> None:
        """Write what a transaction buffered, in one atomic replacement."""
        if self._dirty and self._cache is not None:
            self._replace(self._cache)
        self._dirty = False

    def forget(self) -> None:
        """Drop the cache (after a failed transaction): the next read comes from the file."""
        self._cache, self._stamp, self._dirty = None, None, False
        self.next_ids = {}

    def _replace(self, data: dict[str, dict[str, Any]]) -> None:
        # compact: json only uses its C encoder without indent (pretty-print with python -m json.tool)
        payload = json.dumps(data, ensure_ascii=False)
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with contextlib.suppress(FileNotFoundError):  # keep the operator's mode; a new store is 0600
                os.fchmod(fd, os.stat(self.path).st_mode & 0o7777)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
        self._stamp = self._file_stamp()


class TinyDBBackend(RepositoryBackend):
    """A backend over one TinyDB file; repositories of all models share its lock and cache."""

    thread_safe = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.parent.is_dir():
            raise ConfigurationError(f"folder {self.path.parent} of TinyDB store {self.path} does not exist")
        if self.path.is_dir():
            raise ConfigurationError(
                f"TinyDB store {self.path} is a directory; name a file in it, e.g. tinydb:///{self.path}/prorch.json"
            )
        self.storage = AtomicJSONStorage(self.path)
        self._thread_lock = threading.RLock()
        self._file_lock = FileLock(str(self.path) + ".lock")
        self._depth = 0
        self._looks = threading.local()  # what each waiting thread saw of the file
        with self.locked():
            if self.storage.read() is None:  # a new store: create the file, atomically
                self.storage.write({})

    def __call__(self, model: str) -> TinyDBRepository:
        return TinyDBRepository(model, self)

    def __repr__(self) -> str:
        return f"TinyDBBackend('tinydb:///{self.path}')"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the thread lock and the inter-process file lock."""
        with self._thread_lock, self._file_lock:
            self._depth += 1
            try:
                yield
            except BaseException:
                if self._depth == 1:
                    self.storage.forget()
                raise
            finally:
                self._depth -= 1

    def schedule_ticks(self) -> dict[str, datetime]:
        """Every schedule's last created tick (``SupportsScheduleTicks``)."""
        with self.locked():
            return {name: to_utc(datetime.fromisoformat(tick)) for name, tick in self._ticks().items()}

    def advance_schedule(self, name: str, tick: datetime) -> bool:
        """Move the schedule's last tick forward to ``tick``, under the file lock (in a
        transaction, written with it in one replacement of the file)."""
        with self.locked():
            ticks = self._ticks()
            stored = ticks.get(name)
            if stored is not None and to_utc(datetime.fromisoformat(stored)) >= tick:
                return False
            data = self.storage.read() or {}
            data[TICKS_TABLE] = {"1": {"ticks": {**ticks, name: format_timestamp(tick)}}}
            self.storage.write(data)
            return True

    def _ticks(self) -> dict[str, str]:
        ticks: dict[str, str] = (self.storage.read() or {}).get(TICKS_TABLE, {}).get("1", {}).get("ticks", {})
        return ticks

    def upsert_worker(self, row: JSONDict) -> None:
        """Under the file lock, in one atomic replacement of the file (as every write here)."""
        with self.locked():
            self._write_workers({**self._workers(), str(row["id"]): row})

    def delete_worker(self, worker_id: str) -> None:
        with self.locked():
            rows = self._workers()
            if rows.pop(worker_id, None) is not None:
                self._write_workers(rows)

    def workers(self) -> list[JSONDict]:
        with self.locked():
            return list(self._workers().values())

    def _workers(self) -> dict[str, JSONDict]:
        rows: dict[str, JSONDict] = (self.storage.read() or {}).get(WORKERS_TABLE, {}).get("1", {}).get("workers", {})
        return dict(rows)

    def _write_workers(self, rows: dict[str, JSONDict]) -> None:
        data = self.storage.read() or {}
        data[WORKERS_TABLE] = {"1": {"workers": rows}}
        self.storage.write(data)

    def rate_starts(self, name: str, since: datetime) -> int:
        with self.locked():
            stamp = format_timestamp(since)
            return sum(start > stamp for start in self(Metadata.PIPELINES_MODEL)._start_log().starts.get(name, []))

    def pauses(self) -> list[JSONDict]:
        with self.locked():
            return list(self._pauses().values())

    def add_pause(self, row: JSONDict) -> bool:
        """Under the file lock, in one atomic replacement of the file (in a transaction, with it)."""
        with self.locked():
            rows = self._pauses()
            if str(row["scope"]) in rows:
                return False
            self._write_pauses({**rows, str(row["scope"]): row})
            return True

    def drop_pause(self, scope: str) -> JSONDict | None:
        with self.locked():
            rows = self._pauses()
            found = rows.pop(scope, None)
            if found is not None:
                self._write_pauses(rows)
            return found

    def _pauses(self) -> dict[str, JSONDict]:
        rows: dict[str, JSONDict] = (self.storage.read() or {}).get(PAUSES_TABLE, {}).get("1", {}).get("pauses", {})
        return dict(rows)

    def _write_pauses(self, rows: dict[str, JSONDict]) -> None:
        data = self.storage.read() or {}
        data[PAUSES_TABLE] = {"1": {"pauses": rows}}
        self.storage.write(data)

    # --- waiting (prorch.storage.wakeups) --------------------------------------------------

    def wake_bell(self) -> Bell:
        """One bell per file in this process."""
        return bell_for(f"tinydb:{self.path}")

    def work_elsewhere(self) -> bool:
        """The file was replaced since this thread last looked (a ``stat``, no read) and a
        pipeline is due now."""
        stamp = self.storage._file_stamp()
        if stamp == getattr(self._looks, "stamp", None):
            return False
        self._looks.stamp = stamp
        try:
            return bool(self(Metadata.PIPELINES_MODEL).search_due(datetime.now(timezone.utc), 1))
        except Exception:  # unreadable now: let the pass look, and say what it finds
            return True

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes in the block reach the file in one atomic replacement, or not at all."""
        with self.locked():
            if self.storage.buffering:  # nested: the outer block flushes
                yield
                return
            self.storage.read()
            self.storage.buffering = True
            try:
                yield
                self.storage.buffering = False
                self.storage.flush()
            finally:
                self.storage.buffering = False


class TinyDBRepository(ClaimsByRequest, IRepository):
    """One model's table in the backend's file, edited in TinyDB's layout
    (``{table: {doc_id: record}}``) directly through the storage: TinyDB's ``Table`` caches its
    next document id per instance, which two processes writing one file would break."""

    partial_update = True  # update and compare_and_set keep the fields not given

    def __init__(self, model: str, backend: TinyDBBackend) -> None:
        super().__init__(model)
        if model not in Metadata.TABLE_NAMES:
            raise ConfigurationError(f"unknown model {model!r}")
        self.backend = backend
        self.name = Metadata.TABLE_NAMES[model]

    def _rows(self) -> dict[str, JSONDict]:
        return (self.backend.storage.read() or {}).get(self.name, {})

    def _write_row(self, doc_id: str | None, row: JSONDict) -> str:
        storage = self.backend.storage
        data = storage.read() or {}
        table = data.setdefault(self.name, {})
        if doc_id is None:
            next_id = storage.next_ids.get(self.name) or max((int(key) for key in table), default=0) + 1
            storage.next_ids[self.name] = next_id + 1
            doc_id = str(next_id)
        table[doc_id] = row
        self.backend.storage.write(data)
        return doc_id

    def _find(self, uuid: str) -> tuple[str, JSONDict] | None:
        for doc_id, row in self._rows().items():
            if row.get("uuid") == uuid:
                return doc_id, row
        return None

    def get(self, uuid: str) -> JSONDict | None:
        with self.backend.locked():
            found = self._find(uuid)
            return dict(found[1]) if found else None

    def save(self, data: JSONDict) -> int:
        with self.backend.locked():
            return int(self._write_row(None, dict(data)))

    def update(self, uuid: str, data: JSONDict) -> None:
        with self.backend.locked():
            found = self._find(uuid)
            if found is None:
                raise KeyError(f"{self.model} {uuid} does not exist")
            self._write_row(found[0], {**found[1], **data})

    def delete_by(self, field: str, values: list[Any]) -> int:
        wanted = set(values)
        with self.backend.locked():
            storage = self.backend.storage
            data = storage.read() or {}
            table = data.get(self.name, {})
            doomed = [doc_id for doc_id, row in table.items() if row.get(field) in wanted]
            for doc_id in doomed:
                del table[doc_id]
            if doomed:
                storage.write(data)
        return len(doomed)

    def search(self, filter: list[Any]) -> list[JSONDict]:  # noqa: A002 - the seed's name
        field, value = filter
        with self.backend.locked():
            rows = self._rows()
            if field == "status" and self.model in STATUS_MODELS:
                self._check_statuses(rows)
            return [dict(row) for row in rows.values() if row.get(field) == value]

    def _check_statuses(self, rows: dict[str, JSONDict]) -> None:
        """A hand-edited record with a status prorch does not know would match no search and
        vanish from `list` and `run`: say which one instead."""
        for doc_id, row in rows.items():
            if row.get("status") not in STATUSES:
                raise CorruptRecordError(
                    f"{self.name} record {row.get('uuid')!r} (document {doc_id} in {self.backend.path}) has "
                    f"unknown status {row.get('status')!r}; expected one of {', '.join(STATUSES)}",
                    uuid=row.get("uuid"),
                )

    # --- capabilities ------------------------------------------------------------------------

    def search_many(self, field: str, values: list[Any]) -> list[JSONDict]:
        """``search`` for several values in one scan of the table."""
        wanted = set(values)
        with self.backend.locked():
            return [dict(row) for row in self._rows().values() if row.get(field) in wanted]

    def unread_messages(
        self, pipeline_uuid: str, name: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[JSONDict]:
        """A pipeline's unread messages of a name, from one scan of the table (parsed once
        per change of the file): only these are copied and returned."""
        start = (format_timestamp(after[0]), after[1]) if after is not None else ("", "")
        with self.backend.locked():
            found = [
                row
                for row in self._rows().values()
                if row.get("pipeline_uuid") == pipeline_uuid and row.get("name") == name
                and row.get("consumed_at") is None and (str(row.get("sent_at")), str(row.get("uuid"))) > start
            ]  # fmt: skip
            found.sort(key=lambda row: (str(row.get("sent_at")), str(row.get("uuid"))))
            return [dict(row) for row in found[:limit]]

    def has_unread_messages(self, pipeline_uuid: str) -> bool:
        with self.backend.locked():
            rows = self._rows().values()
            return any(r.get("pipeline_uuid") == pipeline_uuid and r.get("consumed_at") is None for r in rows)

    def last_sent_at(self, pipeline_uuid: str) -> datetime | None:
        with self.backend.locked():
            times = [str(r.get("sent_at")) for r in self._rows().values() if r.get("pipeline_uuid") == pipeline_uuid]
        return datetime.fromisoformat(max(times)) if times else None

    def compare_and_set(self, uuid: str, expected_revision: int, data: JSONDict) -> bool:
        with self.backend.locked():
            found = self._find(uuid)
            if found is None or found[1].get("revision", 0) != expected_revision:
                return False
            self._write_row(found[0], {**found[1], **data})
            return True

    def _due(self, now: str, limit: int, runnable: Runnable | None = None) -> list[tuple[str, JSONDict]]:
        self._check_statuses(self._rows())
        paused = Paused.of_rows(self.backend._pauses().values())
        rows = [
            (i, row) for i, row in self._rows().items()
            if row_is_due(row, now) and can_run(row, runnable) and not paused.holds_row(row)
        ]  # fmt: skip
        rows.sort(key=lambda item: row_claim_order(item[1]))
        return rows[:limit]

    def search_due(self, now: datetime, limit: int) -> list[JSONDict]:
        with self.backend.locked():
            return [dict(row) for _, row in self._due(format_timestamp(now), limit)]

    def claim(self, request: ClaimRequest) -> list[JSONDict]:
        with self.backend.transaction():
            stamp = format_timestamp(request.now)
            chosen = self._due(stamp, request.limit, request.runnable) if not request.limits else self._within(request)
            mark = stamp if request.mark else None
            return [self._lease(doc_id, row, request.owner, request.lease_expires_at, mark) for doc_id, row in chosen]

    def _within(self, request: ClaimRequest) -> list[tuple[str, JSONDict]]:
        """The due pipelines the request's limits admit, their starts stored (in its transaction)."""
        now, limits = request.now, request.limits
        stamp = format_timestamp(now)
        rows = self._rows()
        starts = self._start_log()
        tally = Tally(limits, started=starts.counts(limits, now))
        tally.add_leased(row for row in rows.values() if holds_lease(row, stamp))
        due = [(row, (doc_id, row)) for doc_id, row in self._due(stamp, len(rows), request.runnable)]
        chosen = within_limits(fair_order(due, limits), tally, request.limit)
        starts.record((row for _, row in chosen), limits, now)
        self._save_start_log(starts)
        return chosen

    def _start_log(self) -> StartLog:
        document = (self.backend.storage.read() or {}).get(RATE_TABLE, {}).get("1", {})
        return StartLog({name: list(starts) for name, starts in document.get("starts", {}).items()})

    def _save_start_log(self, log: StartLog) -> None:
        data = self.backend.storage.read() or {}
        data[RATE_TABLE] = {"1": {"starts": log.starts}}
        self.backend.storage.write(data)

    def claim_one(self, uuid: str, now: datetime, owner: str, lease_expires_at: datetime) -> JSONDict | None:
        with self.backend.transaction():
            found = self._find(uuid)
            if found is None:
                return None
            doc_id, row = found
            if row.get("status") in TERMINAL_VALUES:
                return dict(row)
            if not claimable_by(row, owner, format_timestamp(now)):
                return None
            return self._lease(doc_id, row, owner, lease_expires_at)

    def renew_lease(self, uuid: str, owner: str, lease_expires_at: datetime) -> bool:
        with self.backend.locked():
            found = self._find(uuid)
            if found is None or found[1].get("lease_owner") != owner:
                return False
            self._write_row(found[0], {**found[1], "lease_expires_at": format_timestamp(lease_expires_at)})
            return True

    def renew_leases(self, leases: Sequence[tuple[str, str]], lease_expires_at: datetime) -> set[str]:
        """One read and one rewrite of the file for the batch (none when nothing is renewed)."""
        owners = dict(leases)
        stamp = format_timestamp(lease_expires_at)
        with self.backend.transaction():
            renewed = {
                doc_id: row
                for doc_id, row in self._rows().items()
                if row.get("uuid") in owners and row.get("lease_owner") == owners[row["uuid"]]
            }
            for doc_id, row in renewed.items():
                self._write_row(doc_id, {**row, "lease_expires_at": stamp})
            return {str(row["uuid"]) for row in renewed.values()}

    def _lease(
        self, doc_id: str, row: JSONDict, owner: str, lease_expires_at: datetime, mark: str | None = None
    ) -> JSONDict:
        claimed = leased(row, owner, format_timestamp(lease_expires_at), mark)
        self._write_row(doc_id, claimed)
        return dict(claimed)
