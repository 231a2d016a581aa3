"""What each backend promises beyond the contract: crash-safe files, concurrent processes,
schema upgrades, and clear errors for bad URLs and corrupt stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from prorch import ConfigurationError, CorruptStoreError, Orchestrator, PipelineRecord, Status
from prorch.model.records import new_uuid
from repositories import from_url
from repositories.schema import SCHEMA_REVISION, VERSION_TABLE
from repositories.sql import SQLBackend, upgrade

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


WRITER = """
    import sys
    from repositories import from_url
    from prorch import PipelineRecord, Status
    from prorch.model.records import new_uuid
    backend = from_url(sys.argv[1])
    repo = backend("PIPELINE")
    print("ready", flush=True)
    for i in range(int(sys.argv[2])):
        repo.save(PipelineRecord(uuid=new_uuid(), name="P", status=Status.PENDING,
                                 params={"i": i, "pad": "x" * 2000}).to_dict())
    print("done", flush=True)
"""


def test_sigkill_mid_write_never_corrupts_the_tinydb_file(tmp_path: Path) -> None:
    store = tmp_path / "store.json"
    url = f"tinydb:///{store}"
    from_url(url)  # creates the file
    counts = []
    for round_ in range(12):
        proc = python(WRITER, url, "100000")
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.02 * round_)  # kill at a different point each time
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(store.read_text())  # valid JSON every time
        rows = data.get("pipelines", {})
        assert all(PipelineRecord.from_dict(row).status == Status.PENDING for row in rows.values())
        counts.append(len(rows))
        backend = from_url(url)  # and it opens as a store
        assert len(backend("PIPELINE").search(["status", "pending"])) == len(rows)
    assert counts == sorted(counts) and counts[-1] > counts[0]  # writes landed between kills
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 12  # a killed writer may leave its temp file, never a torn store


def test_two_processes_write_one_sqlite_file_without_locking_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    from_url(url).dispose()
    writers = [python(WRITER, url, "300") for _ in range(2)]
    for proc in writers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "database is locked" not in err
        assert out.splitlines()[-1] == "done"
    backend = from_url(url)
    assert len(backend("PIPELINE").search(["status", "pending"])) == 600


def test_two_processes_share_one_tinydb_file(tmp_path: Path) -> None:
    url = f"tinydb:///{tmp_path / 'shared.json'}"
    from_url(url)
    writers = [python(WRITER, url, "60") for _ in range(2)]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    rows = json.loads((tmp_path / "shared.json").read_text())["pipelines"]
    assert len(rows) == 120 and len({r["uuid"] for r in rows.values()}) == 120


@pytest.mark.parametrize("content", ["", '{"pipelines": {"1": {"uuid": "x", "na', "not json", "[1, 2]"])
def test_corrupt_tinydb_file_is_reported_and_left_untouched(tmp_path: Path, content: str) -> None:
    store = tmp_path / "broken.json"
    store.write_text(content)
    with pytest.raises(CorruptStoreError, match=str(store)):
        from_url(f"tinydb:///{store}")
    assert store.read_text() == content


def test_a_store_made_by_schema_0001_opens_after_an_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = SQLBackend(url, migrate=False)
    upgrade(old, "0001")  # the first released schema: no messages table, no event order
    engine = create_engine(url)
    uuid = new_uuid()
    with engine.begin() as connection:
        assert "pipeline_messages" not in inspect(connection).get_table_names()
        connection.execute(
            text(
                "INSERT INTO pipelines (uuid, name, version, status, params, context, metadata, priority, "
                "next_run_at, revision) VALUES (:u, 'Old', 1, 'pending', '{}', '{}', '{}', 0, "
                "'2020-01-01 00:00:00.000000', 0)"
            ),
            {"u": uuid},
        )
    engine.dispose()
    old.dispose()

    backend = from_url(url)  # upgrades on first use
    with backend.engine.connect() as connection:  # type: ignore[attr-defined]
        assert connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == SCHEMA_REVISION
        assert "pipeline_messages" in inspect(connection).get_table_names()
    record = Orchestrator(backend).get(uuid).pipeline
    assert record.name == "Old" and record.status == Status.PENDING
    assert backend("EVENT").search(["pipeline_uuid", uuid]) == []


def test_upgrade_is_skipped_when_current(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    from_url(url).dispose()
    sys.modules.pop("alembic.command", None)
    from_url(url).dispose()
    assert "alembic.command" not in sys.modules  # the fast path imports no Alembic


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("prorch.db", "malformed repository URL"),
        ("nosuch://x", "unsupported repository URL scheme 'nosuch'"),
        ("tinydb://relative.json", "malformed TinyDB URL"),
        ("sqlite:////no/such/folder/x.db", "does not exist"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous=sometimes"),
        ("sqlite:///x.db?wal_autocheckpoint=often", "wal_autocheckpoint=often"),
        ("mysql://u@localhost/db", "no driver for repository URL"),
    ],
)
def test_bad_urls_give_one_clear_error(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        from_url(url)


@pytest.mark.parametrize(("query", "pages"), [("", 10_000), ("?wal_autocheckpoint=500", 500)])
def test_sqlite_checkpoints_every_so_many_wal_pages(tmp_path: Path, query: str, pages: int) -> None:
    backend = from_url(f"sqlite:///{tmp_path / 'wal.db'}{query}")
    with backend.engine.connect() as connection:  # type: ignore[attr-defined]
        dbapi = connection.connection.driver_connection
        assert dbapi.execute("PRAGMA wal_autocheckpoint").fetchone() == (pages,)
        assert dbapi.execute("PRAGMA journal_size_limit").fetchone() == (64 * 1024 * 1024,)
        assert dbapi.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(("query", "level"), [("", 2), ("?synchronous=normal", 1), ("?synchronous=FULL", 2)])
def test_sqlite_is_durable_by_default(tmp_path: Path, query: str, level: int) -> None:
    """WAL with synchronous=FULL (2) survives a power cut; NORMAL (1) is an opt-in."""
    backend = from_url(f"sqlite:///{tmp_path / 'durable.db'}{query}")
    with backend.engine.connect() as connection:  # type: ignore[attr-defined]
        dbapi = connection.connection.driver_connection
        assert dbapi.execute("PRAGMA synchronous").fetchone() == (level,)
        assert dbapi.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    backend.dispose()  # type: ignore[attr-defined]


def test_sqlite_bad_synchronous_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    with pytest.raises(ConfigurationError, match=r"synchronous=often in .*: use one of off, normal, full, extra$"):
        from_url(f"sqlite:///{path}?synchronous=often")
    assert not path.exists()  # nothing stored


def test_one_backend_per_url_per_process(tmp_path: Path) -> None:
    assert from_url("memory://") is from_url("memory://")
    assert from_url("memory://a") is not from_url("memory://b")
    url = f"sqlite:///{tmp_path / 'one.db'}"
    assert from_url(url) is from_url(url)
    child = python(
        """
        import os, sys
        from repositories import from_url
        parent = from_url(sys.argv[1])
        pid = os.fork()
        if pid == 0:
            os._exit(0 if from_url(sys.argv[1]) is not parent else 1)
        print(os.waitpid(pid, 0)[1])
        """,
        url,
    )
    out, err = child.communicate(timeout=60)
    assert out.strip() == "0", err


def test_a_file_that_is_not_a_sqlite_database_is_reported_and_left_untouched(tmp_path: Path) -> None:
    store = tmp_path / "notes.db"
    store.write_text("shopping list: milk, eggs\n" * 200)
    before = store.read_bytes()
    with pytest.raises(CorruptStoreError, match=r"is not a usable SQLite store .*left untouched"):
        from_url(f"sqlite:///{store}")
    assert store.read_bytes() == before


def test_a_partial_update_inside_a_sqlite_transaction_leaves_the_connection_usable(tmp_path: Path) -> None:
    backend = from_url(f"sqlite:///{tmp_path / 'mixed.db'}")
    pipelines = backend("PIPELINE")
    row = PipelineRecord(uuid=new_uuid(), name="P", status=Status.PENDING).to_dict()
    with backend.pinned():  # type: ignore[attr-defined]  # one connection for both transactions
        with backend.transaction():  # type: ignore[attr-defined]
            pipelines.save(row)
            pipelines.update(row["uuid"], {"status": "finished"})  # partial: through SQLAlchemy
        with backend.transaction():  # type: ignore[attr-defined]
            pipelines.update(row["uuid"], {**row, "priority": 5})
        other = PipelineRecord(uuid=new_uuid(), name="Q", status=Status.PENDING).to_dict()
        pipelines.save(other)  # a write of its own (SQLAlchemy's begin) on the same connection
    stored = pipelines.get(row["uuid"])
    assert (stored["status"], stored["priority"]) == ("pending", 5)
    assert pipelines.get(other["uuid"]) is not None


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_reads_are_single_statements_without_a_transaction(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A read is one round trip: no BEGIN and COMMIT around it (each of prorch's reads is one
    statement, which sees a consistent snapshot on its own); writes keep their transaction."""
    url = f"sqlite:///{tmp_path / 'reads.db'}" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    backend = from_url(url)
    with backend.connect(write=False) as connection:  # type: ignore[attr-defined]
        assert connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
        assert not connection.in_transaction()
        assert connection.execute(text("SELECT 1")).scalar() == 1
    with backend.connect(write=True) as connection:  # type: ignore[attr-defined]
        assert connection.in_transaction()


@pytest.mark.slow
def test_the_benchmarks_postgresql_commits_durably() -> None:
    """Every PostgreSQL benchmark figure is a durable commit (tests/benchmarks/run.py starts its
    server this way); the test suite's own server runs without fsync, for speed."""
    from tests.support.postgres import PostgresUnavailable, remove, start_server

    try:
        server = start_server(durable=True)
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    try:
        engine = create_engine(server.url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as connection:
            settings = [connection.execute(text(f"SHOW {name}")).scalar() for name in ("fsync", "synchronous_commit")]
        engine.dispose()
        assert settings == ["on", "on"]
    finally:
        remove(server)
