"""Secrets stay out of what prorch shows: URLs, driver errors, stored errors; store files are
private; the working directory shadows no installed module."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from prorch import ConfigurationError
from prorch.model.exceptions import RepositoryError
from prorch.model.records import ErrorInfo, PipelineRecord, new_uuid
from prorch.model.secrets import redact_url
from prorch.model.status import Status
from prorch.storage.store import Store
from repositories import from_url
from repositories.sql import SQLBackend

PRORCH = str(Path(sys.executable).parent / "prorch")


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}, **env}
    return subprocess.run([PRORCH, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:hunter2@db/prorch", "postgresql://app:***@db/prorch"),
        (
            "postgresql://app@db/prorch?password=hunter2&sslmode=require",
            "postgresql://app@db/prorch?password=***&sslmode=require",
        ),
        ("sqlite:///prorch.db", "sqlite:///prorch.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_prorch_config_and_url_errors_hide_passwords(tmp_path: Path) -> None:
    """Regression: `prorch config` printed database passwords; a query-string password showed
    up in error messages."""
    url = "postgresql://app:hunter2@db.invalid/prorch?password=hunter3"
    for args in (("config",), ("config", "--json")):
        result = cli(tmp_path, *args, PRORCH_REPOSITORY=url)
        assert result.returncode == 0 and "app:***@db.invalid" in result.stdout
        assert "hunter2" not in result.stdout and "hunter3" not in result.stdout
    bad_port = "postgresql://app:hunter2@db:54x32/prorch?password=hunter3"
    with pytest.raises(ConfigurationError) as caught:
        SQLBackend(bad_port)
    assert "hunter" not in str(caught.value) and "malformed repository URL" in str(caught.value)
    result = cli(tmp_path, "-r", bad_port, "list")
    assert result.returncode == 2 and "hunter" not in result.stderr and result.stderr.count("\n") == 1


def test_driver_errors_keep_rows_and_parameters_out(postgres_url: str) -> None:
    """Regression: on PostgreSQL, SQLAlchemy's error text copied whole rows (metadata holding
    API tokens) into the logs and into the stored last_error."""
    store = Store(from_url(postgres_url))
    token = "sk_live_SECRET_TOKEN"
    record = PipelineRecord(uuid=new_uuid(), name="x" * 300, status=Status.PENDING, metadata={"api": token})
    with pytest.raises(RepositoryError) as caught:
        store.insert_all([record])
    text = str(caught.value)
    assert "value too long" in text
    stored = ErrorInfo.from_exception(caught.value)
    assert token not in text and token not in (stored.traceback or "")


def test_store_files_are_private_and_keep_an_operators_mode(tmp_path: Path) -> None:
    """Regression: a new SQLite file was world-readable; TinyDB reset its file to 0600 on every write."""
    sqlite_file = tmp_path / "new.db"
    Store(f"sqlite:///{sqlite_file}").insert_all([PipelineRecord(uuid=new_uuid(), name="P", status=Status.PENDING)])
    assert stat.S_IMODE(sqlite_file.stat().st_mode) == 0o600
    tiny = tmp_path / "new.json"
    Store(f"tinydb:///{tiny}")
    assert stat.S_IMODE(tiny.stat().st_mode) == 0o600
    tiny.chmod(0o640)
    Store(f"tinydb:///{tiny}").insert_all([PipelineRecord(uuid=new_uuid(), name="P", status=Status.PENDING)])
    assert stat.S_IMODE(tiny.stat().st_mode) == 0o640
    shared = tmp_path / "shared.db"
    shared.touch(mode=0o640)
    shared.chmod(0o640)
    Store(f"sqlite:///{shared}").insert_all([PipelineRecord(uuid=new_uuid(), name="P", status=Status.PENDING)])
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640


def test_the_working_directory_shadows_no_installed_module(tmp_path: Path) -> None:
    """Regression: `prorch list` without --app imported a stray ./sqlite3.py."""
    (tmp_path / "sqlite3.py").write_text("raise SystemExit('the stray sqlite3.py was imported')\n")
    result = cli(tmp_path, "-r", f"sqlite:///{tmp_path / 'p.db'}", "list")
    assert result.returncode == 0, result.stderr
    (tmp_path / "myapp.py").write_text("IMPORTED = True\n")
    result = cli(tmp_path, "-r", f"sqlite:///{tmp_path / 'p.db'}", "--app", "myapp", "list")
    assert result.returncode == 0, result.stderr  # --app modules still import from the working directory
