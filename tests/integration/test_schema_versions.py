"""A store migrated by a newer prorch: used as it is when every migration this prorch does not
know only adds, refused with one line otherwise (a synthetic next migration of each kind)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from prorch import OnStartMixin, Step, register_step
from prorch.model.exceptions import SchemaTooNewError
from prorch.model.registry import Registry
from prorch.testing import Harness
from repositories.schema import SCHEMA_REVISION
from repositories.sql import MIGRATIONS, SQLBackend, upgrade
from tests.support.builders import pipeline_of

FUTURE = f"{int(SCHEMA_REVISION) + 1:04d}"  # the revision after the newest this prorch knows

PRORCH = str(Path(sys.executable).parent / "prorch")

MIGRATION = '''
"""A migration of a future prorch.

Revision ID: {revision}
"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{previous}"
branch_labels = None
depends_on = None
additive = {additive}


def upgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        {change}


def downgrade() -> None:
    pass
'''

CHANGES = {
    True: 'batch.add_column(sa.Column("labels", sa.JSON))',
    False: 'batch.alter_column("context", new_column_name="scope")',
}


def migrated_by_a_newer_prorch(tmp_path: Path, url: str, additive: bool) -> None:
    newer = tmp_path / "newer-migrations"
    shutil.copytree(MIGRATIONS, newer, ignore=shutil.ignore_patterns("__pycache__"))
    source = MIGRATION.format(revision=FUTURE, previous=SCHEMA_REVISION, additive=additive, change=CHANGES[additive])
    (newer / "versions" / f"{FUTURE}_future.py").write_text(textwrap.dedent(source))
    backend = SQLBackend(url, migrate=False)
    upgrade(backend, migrations=newer)
    with backend.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM prorch_schema_version")).scalar() == FUTURE
    backend.dispose()


def test_additive_newer_schema_is_used_as_it_is(tmp_path: Path, registry: Registry) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    migrated_by_a_newer_prorch(tmp_path, url, additive=True)

    class Works(OnStartMixin, Step):
        name = "Works"

        def on_start(self) -> None:
            self.finish({"ok": True})

    register_step(Works)
    pipeline = pipeline_of(Works, name="W")
    harness = Harness(SQLBackend(url), registry=registry)
    run = harness.create(pipeline, {"a": 1})
    assert harness.run_until_done(run.uuid) == "finished"
    assert harness.orchestrator.get(run.uuid).steps[0].output == {"ok": True}


def test_newer_schema_that_is_not_additive_is_refused_in_one_line(tmp_path: Path) -> None:
    """Regression: an 80-line Alembic traceback ("Can't locate revision identified by ...")."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    migrated_by_a_newer_prorch(tmp_path, url, additive=False)
    message = f"store schema {FUTURE} is newer than this prorch understands ({SCHEMA_REVISION}); upgrade prorch"
    with pytest.raises(SchemaTooNewError) as caught:
        SQLBackend(url)
    assert str(caught.value) == message
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    result = subprocess.run([PRORCH, "-r", url, "list"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}"


def test_newer_schema_refused_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    migrated_by_a_newer_prorch(tmp_path, postgres_url, additive=False)
    with pytest.raises(SchemaTooNewError, match=f"store schema {FUTURE} is newer"):
        SQLBackend(postgres_url)
