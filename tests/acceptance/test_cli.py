"""The real `prorch` executable, in a subprocess, against a SQLite file: commands, output,
exit codes (0 ok, 1 operation failed, 2 usage or configuration error)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator, Status

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PRORCH = shutil.which("prorch", path=str(Path(sys.executable).parent)) or "prorch"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(HERE / "shop.py", tmp_path / "shop.py")
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///shop.db"\napp = ["shop"]\n')
    return tmp_path


def prorch(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    environ.update(env or {})
    return subprocess.run([PRORCH, *args], cwd=workdir, env=environ, capture_output=True, text=True, timeout=120)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def state(workdir: Path, uuid: str) -> dict[str, Any]:
    return json.loads(ok(prorch(workdir, "show", uuid, "--json")))  # type: ignore[no-any-return]


def test_start_run_list_show(workdir: Path) -> None:
    uuid = ok(prorch(workdir, "start", "Order", "--param", "item=book", "-p", "qty=2")).strip()
    assert len(uuid) == 36
    assert state(workdir, uuid)["pipeline"]["status"] == "pending"
    assert "claimed 1, finished 1" in ok(prorch(workdir, "run"))
    listing = ok(prorch(workdir, "list"))
    assert uuid in listing and "finished" in listing and "Order" in listing
    shown = ok(prorch(workdir, "show", uuid))
    assert 'output: {"item": "book", "qty": 2}' in shown and "pipeline.finished" in shown
    data = state(workdir, uuid)
    assert [s["status"] for s in data["steps"]] == ["finished"] * 3
    assert data["steps"][2]["output"]["tracking"].startswith("TRK-")
    finished = json.loads(ok(prorch(workdir, "list", "--status", "finished", "--json")))
    assert [p["uuid"] for p in finished["pipelines"]] == [uuid] and finished["total"] == 1
    assert json.loads(ok(prorch(workdir, "list", "--status", "pending", "--json")))["pipelines"] == []


def test_params_json_and_run_json(workdir: Path) -> None:
    ok(prorch(workdir, "start", "Order", "--params-json", '{"item": "pen", "qty": 5}'))
    summary = json.loads(ok(prorch(workdir, "run", "--json")))
    assert summary["claimed"] == 1 and summary["finished"] == 1


def test_cancel_and_retry(workdir: Path) -> None:
    waiting = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke")).strip()
    ok(prorch(workdir, "run"))
    assert state(workdir, waiting)["steps"][2]["status"] == "pending"  # waiting an hour
    decline = workdir / "decline"
    decline.touch()
    failing = ok(prorch(workdir, "start", "Order", "-p", "item=lamp")).strip()
    ok(prorch(workdir, "run", env={"SHOP_DECLINE_FILE": str(decline)}))
    assert state(workdir, failing)["pipeline"]["status"] == "failed"
    assert "card declined" in ok(prorch(workdir, "show", failing))

    assert f"cancelled {waiting}" in ok(prorch(workdir, "cancel", waiting))
    assert state(workdir, waiting)["pipeline"]["status"] == "cancelled"
    again = prorch(workdir, "cancel", waiting)
    assert again.returncode == 1 and "already cancelled" in again.stderr

    decline.unlink()
    assert f"retrying {failing}" in ok(prorch(workdir, "retry", failing))
    ok(prorch(workdir, "run"))
    data = state(workdir, failing)
    assert data["pipeline"]["status"] == "finished"
    assert "pipeline.retried" in [e["type"] for e in data["history"]]


def test_schema(workdir: Path) -> None:
    schema = json.loads(ok(prorch(workdir, "schema", "Order")))
    assert schema["params"]["required"] == ["item"]
    assert schema["params"]["properties"]["qty"]["default"] == 1
    assert schema["steps"]["Reserve"]["properties"]["qty"]["type"] == "integer"
    assert schema["steps"]["Charge"] is None


def test_config_shows_each_value_and_its_origin(workdir: Path) -> None:
    out = ok(prorch(workdir, "--log-level", "debug", "config", env={"PRORCH_BATCH_SIZE": "7"}))
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert '"sqlite:///shop.db"' in lines["repository"] and "prorch.toml" in lines["repository"]
    assert "7" in lines["batch_size"] and "PRORCH_BATCH_SIZE" in lines["batch_size"]
    assert '"DEBUG"' in lines["log_level"] and "flag --log-level" in lines["log_level"]
    assert "default" in lines["interval"]
    data = json.loads(ok(prorch(workdir, "config", "--json")))
    assert data["settings"]["app"] == ["shop"]


def test_configured_pipeline_priority_applies_to_start(workdir: Path) -> None:
    with (workdir / "prorch.toml").open("a") as config:
        config.write("\n[pipelines.Order]\npriority = 7\n")
    assert json.loads(ok(prorch(workdir, "start", "Order", "-p", "item=a", "--json")))["priority"] == 7
    assert (
        json.loads(ok(prorch(workdir, "start", "Order", "-p", "item=a", "--priority", "9", "--json")))["priority"] == 9
    )


def test_pyproject_tool_prorch_is_read(workdir: Path) -> None:
    (workdir / "prorch.toml").unlink()
    (workdir / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.prorch]\nconcurrency = 2\n')
    data = json.loads(ok(prorch(workdir, "config", "--json")))
    assert data["settings"]["concurrency"] == 2 and "pyproject.toml" in data["origins"]["concurrency"]


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["run", "--no-such-flag"], {}, 2, "No such option"),
        (["start", "Nope"], {}, 2, "no pipeline named 'Nope' is registered (registered: Order)"),
        (["start", "Order", "-p", "qty=2"], {}, 2, "invalid params for pipeline Order: item: Field required"),
        (["start", "Order", "-p", "qty"], {}, 2, "expected KEY=VALUE"),
        (["start", "Order", "--params-json", "{oops"], {}, 2, "not valid JSON"),
        (["show", "no-such-uuid"], {}, 1, "no pipeline with uuid no-such-uuid"),
        (["retry", "no-such-uuid"], {}, 1, "no pipeline with uuid"),
        (["--repository", "nosuch://x", "list"], {}, 2, "unsupported repository URL scheme"),
        (["list"], {"PRORCH_CONCURRENCY": "zero"}, 2, "PRORCH_CONCURRENCY"),
        (["--app", "no_such_module", "list"], {}, 2, "cannot import app module 'no_such_module'"),
    ],
)
def test_errors_are_one_line_with_meaningful_exit_codes(
    workdir: Path, args: list[str], env: dict[str, str], code: int, message: str
) -> None:
    result = prorch(workdir, *args, env=env)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr
    if code == 1 or "error:" in result.stderr:
        assert "Traceback" not in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    if args[0] == "start":
        assert json.loads(ok(prorch(workdir, "list", "--json")))["total"] == 0  # nothing stored


def test_bad_config_file_names_the_key_and_the_file(workdir: Path) -> None:
    (workdir / "prorch.toml").write_text('repository = "sqlite:///shop.db"\nintervall = 3\n')
    result = prorch(workdir, "run")
    assert result.returncode == 2
    assert "unknown setting 'intervall'" in result.stderr and str(workdir / "prorch.toml") in result.stderr
    (workdir / "prorch.toml").write_text("[steps.Ship]\ntimeout = -1\n")
    result = prorch(workdir, "config")
    assert result.returncode == 2 and "steps.Ship.timeout" in result.stderr


def test_verbose_shows_the_traceback(workdir: Path) -> None:
    result = prorch(workdir, "--verbose", "show", "no-such-uuid")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_demo(workdir: Path) -> None:
    started = time.monotonic()
    out = ok(prorch(workdir, "demo"))
    assert time.monotonic() - started < 15
    assert "ProcessCompletionNotification: notified the team" in out
    assert "pipeline.finished" in out and "BackupAutomationPipeline v1" in out


def test_worker_stops_cleanly_on_sigterm_while_a_hook_runs(workdir: Path) -> None:
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=book")).strip()
    marker = workdir / "ship"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    environ["SHOP_SLOW_MARKER"] = str(marker)
    worker = subprocess.Popen(
        [PRORCH, "worker", "--interval", "0.1"], cwd=workdir, env=environ,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not Path(str(marker) + ".start").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Path(str(marker) + ".start").exists(), "the hook never started"
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert Path(str(marker) + ".end").exists()  # the running hook finished
    record = Orchestrator(f"sqlite:///{workdir / 'shop.db'}").get(uuid)
    assert record.pipeline.lease_owner is None  # lease released
    assert record.steps[2].status == Status.PENDING  # the hook's transition was written
    assert "letting running hooks finish" in err


def test_a_second_signal_exits_at_once(workdir: Path) -> None:
    ok(prorch(workdir, "start", "Order", "-p", "item=book"))
    marker = workdir / "ship"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    environ["SHOP_SLOW_MARKER"] = str(marker)
    worker = subprocess.Popen([PRORCH, "worker", "--interval", "0.1"], cwd=workdir, env=environ, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not Path(str(marker) + ".start").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    assert worker.returncode == 1
    assert not Path(str(marker) + ".end").exists()  # it did not wait for the hook


def test_json_logs_carry_pipeline_and_step_uuids(workdir: Path) -> None:
    decline = workdir / "decline"
    decline.touch()
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=lamp")).strip()
    result = prorch(workdir, "--log-format", "json", "run", env={"SHOP_DECLINE_FILE": str(decline)})
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert entries, result.stderr
    assert all({"at", "level", "logger", "message"} <= entry.keys() for entry in entries)
    pass_line = next(e for e in entries if e["message"].startswith("pass:"))
    assert "failed 1" in pass_line["message"]
    charge = state(workdir, uuid)["steps"][1]
    assert charge["status"] == "failed"
    failed = next(e for e in entries if "card declined" in e["message"])
    assert (failed["pipeline_uuid"], failed["step_uuid"], failed["level"]) == (uuid, charge["uuid"], "WARNING")


def test_send_wakes_a_waiting_pipeline(workdir: Path) -> None:
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke")).strip()
    ok(prorch(workdir, "run"))
    assert "claimed 0" in ok(prorch(workdir, "run"))  # waiting an hour
    assert f"sent ping to {uuid}" in ok(prorch(workdir, "send", uuid, "ping", "--payload-json", '{"a": 1}'))
    assert "claimed 1" in ok(prorch(workdir, "run"))  # due at once
    bad = prorch(workdir, "send", uuid, "ping", "--payload-json", "{nope")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    ok(prorch(workdir, "cancel", uuid))
    ended = prorch(workdir, "send", uuid, "ping")
    assert ended.returncode == 1 and "would never be read" in ended.stderr


def test_a_message_without_a_payload_is_not_taken_for_no_message(workdir: Path) -> None:
    """Issue #25: ``prorch send UUID NAME`` without a payload stored null, which ``receive()``
    returned as None (no message): it was consumed and the step waited another hour. Now it
    carries True, and a null payload is refused (nothing stored)."""
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke")).strip()
    ok(prorch(workdir, "run"))  # Ship waits an hour, unless a ship_now message is there
    refused = prorch(workdir, "send", uuid, "ship_now", "--payload-json", "null")
    assert refused.returncode == 2 and "receive() returns None when no message waits" in refused.stderr
    assert "Traceback" not in refused.stderr
    store = Orchestrator(f"sqlite:///{workdir / 'shop.db'}").store
    assert store.messages_of(uuid) == []  # nothing stored
    ok(prorch(workdir, "send", uuid, "ship_now"))
    ok(prorch(workdir, "run"))
    assert state(workdir, uuid)["pipeline"]["status"] == "finished"
    assert [m.payload for m in store.messages_of(uuid)] == [True]


def test_start_a_version_that_is_not_registered(workdir: Path) -> None:
    result = prorch(workdir, "start", "Order", "--version", "3", "-p", "item=a")
    assert result.returncode == 2 and "version 3 is not registered (registered versions: 1)" in result.stderr


def test_an_application_package_named_repositories_gets_a_clear_error(tmp_path: Path) -> None:
    """Regression: "the 'repositories' package is missing; reinstall prorch", naming nothing."""
    own = tmp_path / "repositories"
    own.mkdir()
    (own / "__init__.py").write_text("USERS = {}\n")
    script = "import repositories\nfrom prorch import Orchestrator\nOrchestrator('sqlite:///p.db')\n"
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environ, capture_output=True, text=True)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert f"imported from {own / '__init__.py'}, which shadows prorch's own 'repositories' package" in last
    assert "rename your package" in last


def test_list_pages_filters_and_total(workdir: Path) -> None:
    uuids = [ok(prorch(workdir, "start", "Order", "-p", f"item=i{n}", "-p", f"qty={n}")).strip() for n in range(5)]
    first = ok(prorch(workdir, "list", "--limit", "2"))
    assert "2 shown of 5 matching" in first and "CREATED" in first and " UTC" in first
    after = first.strip().splitlines()[-1].removeprefix("next page: --after ")
    assert after == uuids[3]
    second = json.loads(ok(prorch(workdir, "list", "--limit", "2", "--after", after, "--json")))
    assert [p["uuid"] for p in second["pipelines"]] == [uuids[2], uuids[1]] and second["total"] == 5
    by_param = json.loads(ok(prorch(workdir, "list", "--param", "qty=3", "--json")))
    assert [p["uuid"] for p in by_param["pipelines"]] == [uuids[3]]
    assert json.loads(ok(prorch(workdir, "list", "--param", 'qty="3"', "--json")))["total"] == 0
    assert json.loads(ok(prorch(workdir, "list", "--since", "1h", "--json")))["total"] == 5
    assert json.loads(ok(prorch(workdir, "list", "--until", "2020-01-01", "--json")))["total"] == 0
    bad = prorch(workdir, "list", "--since", "yesterday")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: --since 'yesterday': give an age such as 30m, 2h or 7d, or a time such as 2026-11-23T08:00:00+00:00"
    )


def test_show_tells_what_an_operator_asks(workdir: Path) -> None:
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke", "-p", "qty=1", "--tenant", "acme")).strip()
    ok(prorch(workdir, "run"))
    shown = ok(prorch(workdir, "show", uuid))
    assert "tenant: acme" in shown
    assert 'params: {"item": "slowpoke", "qty": 1}' in shown
    assert "attempt 1 of 1" in shown and " UTC" in shown
    assert "next run:" in shown and "(waiting (a hook called wait()))" in shown
    assert "took " in shown and "progress: 1/4 (25%) in transit" in shown
    data = state(workdir, uuid)
    assert data["next_run"]["reason"].startswith("waiting") and data["next_run"]["at"].endswith("+00:00")


BEATS = """
from datetime import timedelta
from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

@register_step
class Beat(OnStartMixin, Step):
    name = "Beat"

    def on_start(self):
        pass

@register_pipeline
class Nightly(Pipeline):
    name = "Nightly"
    steps = [Beat]
    schedule = "0 3 * * *"
    schedule_tz = "Europe/Berlin"
    catch_up = "all"
"""


def test_schedules_are_listed_and_run(tmp_path: Path) -> None:
    (tmp_path / "beats.py").write_text(BEATS)
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///beats.db"\napp = ["beats"]\n')
    listed = ok(prorch(tmp_path, "schedules"))
    assert "Nightly" in listed and "cron '0 3 * * *' (Europe/Berlin)" in listed and " all " in listed
    ticks = json.loads(ok(prorch(tmp_path, "schedules", "--next", "2", "--json")))[0]["next"]
    assert len(ticks) == 2 and all(t.endswith(("T01:00:00+00:00", "T02:00:00+00:00")) for t in ticks)
    assert ok(prorch(tmp_path, "run")).startswith("scheduled 1, claimed 1, finished 1")
    assert ok(prorch(tmp_path, "run")).startswith("claimed 0")
    (tmp_path / "beats.py").write_text(BEATS.replace("0 3 * * *", "0 25 * * *"))
    bad = prorch(tmp_path, "schedules")
    assert bad.returncode == 2
    assert "schedule '0 25 * * *' is not a cron expression (Bad hour)" in bad.stderr


def test_purge_from_the_command_line(workdir: Path) -> None:
    uuids = [ok(prorch(workdir, "start", "Order", "-p", f"item=i{n}")).strip() for n in range(3)]
    ok(prorch(workdir, "run"))
    assert ok(prorch(workdir, "purge", "--older-than", "1h")).startswith("purged 0 pipelines")
    assert ok(prorch(workdir, "purge", "--older-than", "0s", "--dry-run")).strip() == (
        "would purge 3 pipelines (finished, cancelled) older than 0s"
    )
    assert json.loads(ok(prorch(workdir, "list", "--json")))["total"] == 3
    assert ok(prorch(workdir, "purge", "--older-than", "0s", "--batch-size", "2")).startswith(
        "purged 3 pipelines (finished, cancelled) older than 0s in 2 batches"
    )
    assert json.loads(ok(prorch(workdir, "list", "--json")))["total"] == 0
    assert prorch(workdir, "show", uuids[0]).returncode == 1
    bad = prorch(workdir, "purge", "--older-than", "a month")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --older-than 'a month': give an age such as 30d, 12h or 90m"


def test_wait_prints_the_result_once_a_worker_ran_it(workdir: Path) -> None:
    uuid = ok(prorch(workdir, "start", "Order", "-p", "item=book")).strip()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    waiting = subprocess.Popen(
        [PRORCH, "wait", uuid, "--timeout", "60"], cwd=workdir, env=environ, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1)
    assert waiting.poll() is None  # still waiting: nothing ran it yet
    ok(prorch(workdir, "run"))
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert json.loads(out)["tracking"].startswith("TRK-")  # the last step's output

    declined = workdir / "decline"
    declined.write_text("x")
    failing = ok(prorch(workdir, "start", "Order", "-p", "item=pen")).strip()
    prorch(workdir, "run", env={"SHOP_DECLINE_FILE": str(declined)})
    result = prorch(workdir, "wait", failing)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: pipeline {failing} (Order) failed: card declined"

    slow = ok(prorch(workdir, "start", "Order", "-p", "item=slowpoke")).strip()
    result = prorch(workdir, "wait", slow, "--timeout", "0.5")
    assert result.returncode == 1 and f"pipeline {slow} did not end within 0.5s (it is pending)" in result.stderr
