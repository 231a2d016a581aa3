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
    deep = "[" * 60_000 + "]" * 60_000  # beyond the interpreter's recursion limit (900 was not)
    usage_error(
        prorch(workdir, "start", "Order", "--params-json", json.dumps({"item": "a"})[:-1] + f', "x": {deep}}}'),
        "--params-json is nested too deeply",
    )


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


def without_app(folder: Path) -> None:
    (folder / "prorch.toml").write_text('repository = "sqlite:///shop.db"\n')  # the CLI without --app


def stored(folder: Path, uuid: str) -> dict[str, object]:
    return json.loads(ok(prorch(folder, "show", uuid, "--json")))["pipeline"]  # type: ignore[no-any-return]


def test_acting_without_the_code_fails_before_claiming(workdir: Path) -> None:  # noqa: F811
    """Regression (#25): `prorch cancel UUID` without --app exited 2 but left the pipeline
    leased by the CLI process, which had ended; retry checks the same, before any write."""
    declined = workdir / "decline"
    declined.write_text("yes")
    failed = ok(prorch(workdir, "start", "Order", "-p", "item=a")).strip()
    ok(prorch(workdir, "run", env={"SHOP_DECLINE_FILE": str(declined)}))
    waiting = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke")).strip()
    ok(prorch(workdir, "run"))
    before = {uuid: stored(workdir, uuid) for uuid in (waiting, failed)}
    assert before[failed]["status"] == "failed" and before[waiting]["status"] == "pending"
    without_app(workdir)
    usage_error(prorch(workdir, "cancel", waiting), f"pipeline {waiting}", "cannot be cancelled", "--app")
    usage_error(prorch(workdir, "retry", failed), f"pipeline {failed}", "cannot be retried", "--app")
    for uuid in (waiting, failed):
        assert stored(workdir, uuid) == before[uuid]  # no lease, nothing written


def test_show_without_the_code_shows_the_stored_next_run(workdir: Path) -> None:  # noqa: F811
    """Regression (#25): without --app, `prorch show` called a waiting pipeline BLOCKED and hid
    its next run; the workers, which have the code, run it on time."""
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke")).strip()
    ok(prorch(workdir, "run"))
    without_app(workdir)
    shown = ok(prorch(workdir, "show", uuid))
    assert "BLOCKED" not in shown and "blocked" not in shown, shown
    assert "next run: 20" in shown and "(waiting (a hook called wait()))" in shown, shown
    assert "its code is not loaded here" in shown and "--app" in shown, shown
    data = json.loads(ok(prorch(workdir, "show", uuid, "--json")))
    assert data["blocked"] is None and data["next_run"]["at"] is not None and "Order" in data["code_missing"]


def test_list_with_the_code_names_the_pipelines_no_worker_can_run(workdir: Path) -> None:  # noqa: F811
    """#25: a pipeline of a class (or version) the workers' code lacks is never claimed; with
    --app, `prorch list` and `prorch show` say it is blocked and why."""
    (workdir / "gone.py").write_text(
        "from prorch import Pipeline, register_pipeline\nfrom shop import Reserve\n\n"
        "@register_pipeline\nclass Gone(Pipeline):\n    name = 'Gone'\n    steps = [Reserve]\n"
    )
    uuid = ok(prorch(workdir, "--app", "gone", "start", "Gone", "-p", "item=a")).strip()
    kept = ok(prorch(workdir, "start", "Order", "-p", "item=a")).strip()
    listing = ok(prorch(workdir, "list"))
    line = next(line for line in listing.splitlines() if line.startswith(uuid))
    assert "blocked: no pipeline named 'Gone' is registered" in line, listing
    assert "blocked" not in next(line for line in listing.splitlines() if line.startswith(kept))
    assert "BLOCKED: no pipeline named 'Gone'" in ok(prorch(workdir, "show", uuid))
    data = json.loads(ok(prorch(workdir, "list", "--json")))
    assert list(data["blocked"]) == [uuid]


def test_a_message_payload_nested_too_deeply(workdir: Path) -> None:  # noqa: F811
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke")).strip()
    deep = "[" * 60_000 + "]" * 60_000
    usage_error(prorch(workdir, "send", uuid, "poke", "--payload-json", deep), "--payload-json is nested too deeply")


@pytest.mark.parametrize(("value", "expected"), [("inf", "finite"), ("nan", "finite"), ("1e300", "31536000")])
def test_an_infinite_lease_is_refused(workdir: Path, value: str, expected: str) -> None:  # noqa: F811
    """Regression (#25): `--lease-seconds inf` printed an OverflowError's traceback."""
    usage_error(prorch(workdir, "run", "--lease-seconds", value), "invalid setting 'lease_seconds'", expected)


def test_a_tinydb_url_naming_a_directory(workdir: Path) -> None:  # noqa: F811
    (workdir / "somedir").mkdir()
    usage_error(prorch(workdir, "-r", "tinydb:///somedir", "list"), "is a directory", "somedir/prorch.json")
