"""Usage errors: one line on stderr and exit 2 (the traceback only with -v), as docs/cli.md says."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.acceptance.test_cli import ok, prorch, workdir  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("workdir")


def usage_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]  # log lines (a new store)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_sqlite_url_with_two_slashes(workdir: Path) -> None:  # noqa: F811
    usage_error(prorch(workdir, "-r", "sqlite://prorch.db", "list"), "sqlite:///prorch.db")


@pytest.mark.parametrize("url", ["sqlite://", "memory://"])
@pytest.mark.parametrize("command", [("list",), ("run",), ("start", "Order", "-p", "item=a", "-p", "qty=1")])
def test_in_memory_stores_are_refused_where_nothing_would_be_kept(
    workdir: Path,  # noqa: F811
    url: str,
    command: tuple[str, ...],
) -> None:
    usage_error(prorch(workdir, "-r", url, *command), "keeps nothing after this command exits")


def test_a_bad_json_environment_variable(workdir: Path) -> None:  # noqa: F811
    usage_error(prorch(workdir, "config", env={"PRORCH_STEPS": "{bad"}), "PRORCH_STEPS", "not valid JSON")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def broken(:\n", "SyntaxError"),
        ("raise RuntimeError('no database config')\n", "RuntimeError: no database config"),
        (
            "from prorch import OnStartMixin, Step, register_step\n"
            "for cls in ('First', 'Second'):\n"
            "    register_step(type(cls, (OnStartMixin, Step), {'name': 'Twice', 'on_start': lambda self: None}))\n",
            "Twice",
        ),
    ],
)
def test_an_app_module_that_fails_to_import(workdir: Path, source: str, expected: str) -> None:  # noqa: F811
    (workdir / "brokenapp.py").write_text(source)
    usage_error(prorch(workdir, "--app", "brokenapp", "list"), "brokenapp", expected)
    verbose = prorch(workdir, "-v", "--app", "brokenapp", "list")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_params_nested_too_deeply(workdir: Path) -> None:  # noqa: F811
    deep = "[" * 900 + "]" * 900
    usage_error(prorch(workdir, "start", "Order", "--params-json", json.dumps({"item": "a"})[:-1] + f', "x": {deep}}}'))


def test_an_unknown_param_key_is_an_error(workdir: Path) -> None:  # noqa: F811
    """Regression: `prorch start -p typo=1` dropped the key silently."""
    usage_error(prorch(workdir, "start", "Order", "-p", "item=a", "-p", "qty=1", "-p", "typo=1"), "unknown key(s) typo")
    assert json.loads(ok(prorch(workdir, "list", "--json")))["total"] == 0


def test_show_without_the_code_does_not_call_an_ended_pipeline_blocked(workdir: Path) -> None:  # noqa: F811
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=a", "-p", "qty=1")).strip()
    ok(prorch(workdir, "run"))
    (workdir / "prorch.toml").write_text('repository = "sqlite:///shop.db"\n')  # no --app now
    shown = ok(prorch(workdir, "show", uuid))
    assert "BLOCKED" not in shown and "its code is not loaded here" in shown


def test_a_tinydb_record_with_an_unknown_status_is_named(workdir: Path) -> None:  # noqa: F811
    """Regression: such a record silently vanished from `list` and `run`."""
    url = f"tinydb:///{workdir / 'store.json'}"
    uuid = ok(prorch(workdir, "-r", url, "start", "Order", "-p", "item=a", "-p", "qty=1")).strip()
    store = workdir / "store.json"
    data = json.loads(store.read_text())
    for row in data["pipelines"].values():
        row["status"] = "paused"
    store.write_text(json.dumps(data))
    for command in ("list", "run"):
        result = prorch(workdir, "-r", url, command)
        assert result.returncode == 1 and uuid in result.stderr and "unknown status 'paused'" in result.stderr


def test_a_misspelt_environment_variable_is_reported(workdir: Path) -> None:  # noqa: F811
    """Regression: an unknown PRORCH_* variable was ignored without a word."""
    result = prorch(workdir, "config", env={"PRORCH_BATCHSIZE": "7"})
    assert result.returncode == 0
    assert (
        "warning: environment variable PRORCH_BATCHSIZE is not a prorch setting; ignored "
        "(did you mean PRORCH_BATCH_SIZE?)" in result.stderr
    )


def test_a_misspelt_override_is_reported(workdir: Path) -> None:  # noqa: F811
    """Regression: a misspelt [steps.Rendr] table was ignored without a word."""
    with (workdir / "prorch.toml").open("a") as config:
        config.write("\n[steps.Chrage]\ntimeout = 5\n\n[steps.Charge]\nmax_attempts = 2\n")
    result = prorch(workdir, "list")
    assert result.returncode == 0
    assert "warning: [steps.Chrage] names no registered step; ignored (did you mean Charge?)" in result.stderr
    assert "[steps.Charge]" not in result.stderr
