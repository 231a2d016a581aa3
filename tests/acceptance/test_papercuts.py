"""Papercuts a new user hit (#31), each through the real `prorch` executable where it is a CLI
matter: a custom repository by module:factory, consistent flag names and exit codes, `wait`
saying what it waits for, `show` with tracebacks and honest times, and a clear error when an
application's own `repositories` package meets prorch's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.acceptance.test_cli import PRORCH, ok, prorch, state, workdir  # noqa: F401 - the fixture
from tests.acceptance.test_usage_errors import usage_error

DICT_REPOSITORY = '''
"""A four-method repository over a dict, kept in a JSON file so that each command sees it."""
import json
from pathlib import Path

from prorch import IRepository

FILE = Path("dict_store.json")


def _load():
    return json.loads(FILE.read_text()) if FILE.exists() else {}


class DictRepository(IRepository):
    def get(self, uuid):
        return _load().get(self.model, {}).get(uuid)

    def save(self, data):
        self.update(data["uuid"], data)

    def update(self, uuid, data):
        stored = _load()
        stored.setdefault(self.model, {}).setdefault(uuid, {}).update(data)
        FILE.write_text(json.dumps(stored))

    def search(self, filter):
        field, value = filter
        return [r for r in _load().get(self.model, {}).values() if r.get(field) == value]


def make_repository():
    return DictRepository
'''


def test_a_custom_repository_by_module_and_factory(workdir: Path) -> None:  # noqa: F811
    """Regression: -r took URLs only, so a user's own IRepository could not be used from the CLI."""
    (workdir / "dictrepo.py").write_text(DICT_REPOSITORY)
    for repository in ("dictrepo:make_repository", "dictrepo:DictRepository"):
        (workdir / "dict_store.json").unlink(missing_ok=True)
        uuid = ok(prorch(workdir, "-r", repository, "start", "Order", "-p", "item=a", "-p", "qty=1")).strip()
        ok(prorch(workdir, "-r", repository, "run"))
        listed = json.loads(ok(prorch(workdir, "-r", repository, "list", "--json")))
        assert [(p["uuid"], p["status"]) for p in listed["pipelines"]] == [(uuid, "finished")]
        assert uuid in json.loads((workdir / "dict_store.json").read_text())["PIPELINE"]
    (workdir / "prorch.toml").write_text('repository = "dictrepo:DictRepository"\napp = ["shop"]\n')
    assert json.loads(ok(prorch(workdir, "list", "--json")))["total"] == 1
    usage_error(prorch(workdir, "-r", "dictrepo:nothing", "list"), "dictrepo", "nothing")
    usage_error(prorch(workdir, "-r", "nomodule:factory", "list"), "nomodule")


def test_dashboard_port_is_named_as_given(workdir: Path) -> None:  # noqa: F811
    """Regression: `prorch dashboard --port 99999` blamed the flag --dashboard-port."""
    line = usage_error(prorch(workdir, "dashboard", "--port", "99999"), "flag --port")
    assert "--dashboard-port" not in line


def test_postgres_urls_are_accepted_as_postgresql(workdir: Path) -> None:  # noqa: F811
    """Regression: postgres:// was 'unsupported repository URL scheme' though the extra is 'postgres'."""
    from repositories.postgresql import PostgreSQLBackend
    from repositories.sql import dialect_class

    assert dialect_class("postgres://u@127.0.0.1:1/db") is PostgreSQLBackend
    result = prorch(workdir, "-r", "postgres://nobody@127.0.0.1:1/nothing", "list")
    assert "unsupported repository URL scheme" not in result.stderr, result.stderr


def test_a_plugin_module_that_fails_to_register_is_a_configuration_error(workdir: Path) -> None:  # noqa: F811
    """Regression: a RegistrationError in a --plugins module exited 1, not 2."""
    (workdir / "badplugin.py").write_text(
        "from prorch import register_plugin\n"
        "@register_plugin(step='Reserve', point='nowhere')\n"
        "def render(step):\n"
        "    return 'x'\n"
    )
    usage_error(prorch(workdir, "--plugins", "badplugin", "list"), "badplugin", "nowhere")


def test_wait_says_what_it_waits_for(workdir: Path) -> None:  # noqa: F811
    """Regression: `prorch wait UUID` with no worker printed nothing, forever."""
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=a", "-p", "qty=1")).strip()
    started = time.monotonic()
    result = prorch(workdir, "wait", uuid, "--timeout", "1")
    assert time.monotonic() - started < 60
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"waiting for pipeline {uuid} (Order, pending) to end"), lines
    assert "a worker" in lines[0] and "--timeout 1" in lines[0]
    assert lines[-1] == f"error: pipeline {uuid} did not end within 1s (it is pending)"
    assert result.stdout == ""


FAILING = """
from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step


@register_step
class Explode(OnStartMixin, Step):
    name = "Explode"

    def on_start(self):
        raise RuntimeError("boom in on_start")


@register_pipeline
class Fragile(Pipeline):
    name = "Fragile"
    steps = [Explode]
"""


def test_show_a_step_that_failed_in_its_first_hook(workdir: Path) -> None:  # noqa: F811
    """Regression: no traceback without --json, 'took - · started -', no step.started in the history."""
    (workdir / "fragile.py").write_text(FAILING)
    (workdir / "prorch.toml").write_text('repository = "sqlite:///shop.db"\napp = ["shop", "fragile"]\n')
    uuid = ok(prorch(workdir, "start", "Fragile")).strip()
    prorch(workdir, "run")
    shown = ok(prorch(workdir, "show", uuid))
    assert "Traceback (most recent call last)" in shown and 'raise RuntimeError("boom in on_start")' in shown
    step_line = next(line for line in shown.splitlines() if "Explode" in line and "failed" in line)
    assert "took -" not in step_line and "started -" not in step_line, step_line
    history = [e["type"] for e in state(workdir, uuid)["history"]]
    assert history.index("step.started") < history.index("step.failed"), history
    brief = ok(prorch(workdir, "show", uuid, "--no-traceback"))
    assert "Traceback" not in brief and "RuntimeError: boom in on_start" in brief


def test_show_a_waiting_step_says_waiting_since(workdir: Path) -> None:  # noqa: F811
    """Regression: a waiting step read 'took 15m36s'."""
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke", "-p", "qty=1")).strip()
    ok(prorch(workdir, "run"))
    ship = next(line for line in ok(prorch(workdir, "show", uuid)).splitlines() if "Ship" in line)
    assert "waiting since" in ship and "took" not in ship, ship
    reserve = next(line for line in ok(prorch(workdir, "show", uuid)).splitlines() if "Reserve" in line)
    assert "took " in reserve


def test_an_app_package_named_repositories_is_explained_under_the_cli(tmp_path: Path) -> None:
    """Regression: "cannot import name 'UserRepository' from 'repositories' (.../repositories/__init__.py)",
    which blamed the application."""
    own = tmp_path / "repositories"
    own.mkdir()
    (own / "__init__.py").write_text("class UserRepository:\n    pass\n")
    (tmp_path / "userapp.py").write_text("from repositories import UserRepository\n")
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///app.db"\napp = ["userapp"]\n')
    line = usage_error(prorch(tmp_path, "list"), "userapp", "UserRepository", "prorch's own 'repositories' package")
    assert "rename your package" in line


def test_an_unrelated_import_error_in_an_app_is_reported_as_before(workdir: Path) -> None:  # noqa: F811
    (workdir / "brokenimport.py").write_text("from json import nothing_here\n")
    line = usage_error(prorch(workdir, "--app", "brokenimport", "list"), "brokenimport", "nothing_here")
    assert "repositories" not in line


def test_the_seed_readme_style_script_runs(tmp_path: Path) -> None:
    """The README's form (a declared Params model, attribute access) keeps working."""
    script = (
        "from pydantic import BaseModel\n"
        "from prorch import OnStartMixin, Orchestrator, Pipeline, Step, register_pipeline, register_step\n"
        "@register_step\nclass Backup(OnStartMixin, Step):\n    name = 'Backup'\n"
        "    def on_start(self):\n        self.finish({'file': self.params.path + '.tar'})\n"
        "@register_pipeline\nclass BackupPipeline(Pipeline):\n    name = 'BackupPipeline'\n    steps = [Backup]\n"
        "    class Params(BaseModel):\n        path: str\n"
        "p = BackupPipeline.create('sqlite:///p.db', params={'path': '/data'})\n"
        "o = Orchestrator('sqlite:///p.db'); o.execute_pipelines()\nprint(o.get(p.uuid).steps[0].output)\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environ, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "/data.tar" in result.stdout
