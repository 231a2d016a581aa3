"""The records as msgspec Structs (issue #13): uuids, keys from drivers, timestamps."""

from __future__ import annotations

import os
import threading
import uuid as uuid_module
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.sql.elements import quoted_name

from prorch.model.records import PipelineRecord, RecordError, format_timestamp, new_uuid
from repositories.sqlite_fastpath import _db_time


def test_new_uuids_are_random_version_4_and_unique_across_threads() -> None:
    made: list[str] = []

    def make() -> None:
        made.extend(new_uuid() for _ in range(5_000))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == len(made) == 20_000
    for text in made[:2_000]:
        parsed = uuid_module.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid_module.RFC_4122, text)


def test_forked_processes_make_uuids_of_their_own() -> None:
    """A process forked after its parent made a uuid (gunicorn's preload, multiprocessing's
    fork) must not hand out uuids the parent or a sibling also hands out."""
    made_in_parent = [new_uuid() for _ in range(3)]
    children = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its uuids to the pipe, then out without pytest's cleanup
            os.close(read)
            os.write(write, "\n".join(new_uuid() for _ in range(100)).encode())
            os._exit(0)
        os.close(write)
        children.append((pid, read))
    made = [*made_in_parent, *(new_uuid() for _ in range(100))]
    for pid, read in children:
        with os.fdopen(read) as pipe:
            made.extend(pipe.read().split())
        assert os.waitpid(pid, 0)[1] == 0
    assert len(made) == 303
    assert len(set(made)) == len(made), "a forked process repeated another process's uuids"


def test_a_key_that_is_a_str_subclass_still_loads() -> None:
    """A driver may name a column with a str subclass (SQLAlchemy quotes the reserved word
    'key'); msgspec alone refuses such a key."""
    data = {"uuid": "u", "name": "P", "status": "pending", quoted_name("key", True): "order-7"}
    assert PipelineRecord.from_dict(data).key == "order-7"


def test_an_invalid_record_names_the_field() -> None:
    with pytest.raises(RecordError, match="status"):
        PipelineRecord.from_dict({"uuid": "u", "name": "P", "status": "exploded"})


def test_timestamps_are_utc_and_fixed_width_whatever_zone_they_came_in() -> None:
    moment = datetime(2030, 1, 2, 5, 0, tzinfo=timezone(timedelta(hours=2)))
    record = PipelineRecord(uuid="u", name="P", status="pending", created_at=moment)
    assert record.created_at == moment and record.created_at.tzinfo is timezone.utc
    data = record.to_dict()
    assert data["created_at"] == "2030-01-02T03:00:00.000000+00:00"
    naive = PipelineRecord.from_dict({**data, "updated_at": "2030-01-02 03:00:00"})
    assert naive.updated_at == record.created_at


def test_the_cached_timestamp_texts_keep_the_two_instants_of_a_repeated_local_hour_apart() -> None:
    """Regression (review): 02:30 in Paris on 2030-10-27 is 00:30 and 01:30 UTC (``fold`` 0
    and 1), two datetimes that compare and hash equal: caches keyed by them gave the second the
    first's text, on every backend (``format_timestamp``) and SQLite's fast path (``_db_time``)."""
    paris = ZoneInfo("Europe/Paris")
    first, second = (datetime(2030, 10, 27, 2, 30, fold=fold, tzinfo=paris) for fold in (0, 1))
    assert first == second and hash(first) == hash(second)  # why a cache keyed by them is wrong
    assert [format_timestamp(first), format_timestamp(second)] == [
        "2030-10-27T00:30:00.000000+00:00", "2030-10-27T01:30:00.000000+00:00",
    ]  # fmt: skip
    assert [_db_time(first), _db_time(second)] == ["2030-10-27 00:30:00.000000", "2030-10-27 01:30:00.000000"]
