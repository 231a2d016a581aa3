"""Configuration layering, in-process: defaults < config file < PRORCH_* < flags, with the
origin of every value; the acceptance tests cover the same through the CLI."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from prorch.config import Settings, SettingsFields, load_settings
from prorch.model.exceptions import ConfigurationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("PRORCH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    loaded = load_settings(cwd=tmp_path)
    assert loaded.settings.repository == "sqlite:///prorch.db"
    assert loaded.config_file is None
    assert set(loaded.origins.values()) == {"default"}


def test_each_layer_overrides_the_one_below_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "prorch.toml").write_text(
        "concurrency = 2\nbatch_size = 7\ninterval = 9\n[steps.Charge]\ntimeout = 5\n"
    )
    monkeypatch.setenv("PRORCH_BATCH_SIZE", "8")
    monkeypatch.setenv("PRORCH_INTERVAL", "10")
    loaded = load_settings({"interval": 11.0, "concurrency": None}, cwd=tmp_path)
    settings = loaded.settings
    assert (settings.concurrency, settings.batch_size, settings.interval) == (2, 8, 11.0)
    assert settings.steps["Charge"].timeout == 5
    assert loaded.origins["concurrency"] == f"file {tmp_path / 'prorch.toml'}"
    assert loaded.origins["batch_size"] == "environment variable PRORCH_BATCH_SIZE"
    assert loaded.origins["interval"] == "flag --interval"
    assert loaded.origins["lease_seconds"] == "default"


def test_pyproject_table_is_read_when_there_is_no_prorch_toml(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "app"\n[tool.prorch]\napp = ["my.pipelines"]\n')
    loaded = load_settings(cwd=tmp_path)
    assert loaded.settings.app == ["my.pipelines"]
    assert loaded.config_file == tmp_path / "pyproject.toml"


def test_prorch_toml_wins_over_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.prorch]\nconcurrency = 3\n")
    (tmp_path / "prorch.toml").write_text("batch_size = 5\n")
    loaded = load_settings(cwd=tmp_path)
    assert (loaded.settings.concurrency, loaded.settings.batch_size) == (4, 5)


def test_a_pyproject_without_a_prorch_table_is_no_config_file(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "app"\n')
    assert load_settings(cwd=tmp_path).config_file is None


def test_an_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "prorch.toml").write_text("concurency = 2\n")
    with pytest.raises(ConfigurationError, match=r"unknown setting 'concurency' in file .*prorch.toml"):
        load_settings(cwd=tmp_path)


def test_a_bad_value_names_its_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRORCH_CONCURRENCY", "0")
    with pytest.raises(ConfigurationError, match="'concurrency' in environment variable PRORCH_CONCURRENCY"):
        load_settings(cwd=tmp_path)


def test_a_file_that_is_not_toml_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "prorch.toml").write_text("concurrency = = 2\n")
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        load_settings(cwd=tmp_path)


def test_a_misspelt_variable_is_a_warning_with_a_suggestion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRORCH_CONCURENCY", "2")
    warnings = load_settings(cwd=tmp_path).warnings
    assert warnings == [
        "environment variable PRORCH_CONCURENCY is not a prorch setting; ignored (did you mean PRORCH_CONCURRENCY?)"
    ]


def test_settings_in_your_own_code_read_the_same_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///from-file.db"\nconcurrency = 2\nbatch_size = 3\n')
    monkeypatch.setenv("PRORCH_CONCURRENCY", "6")
    settings = Settings(batch_size=9)
    assert (settings.repository, settings.concurrency, settings.batch_size) == ("sqlite:///from-file.db", 6, 9)


def test_group_commit_reaches_the_orchestrator_from_the_environment_and_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prorch.cli.helpers import Context

    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert Context({"repository": url}, None, False).orchestrator().group_commit == 100
    monkeypatch.setenv("PRORCH_GROUP_COMMIT", "1")
    assert Context({"repository": url}, None, False).orchestrator().group_commit == 1
    assert Context({"repository": url, "group_commit": 8}, None, False).orchestrator().group_commit == 8
    monkeypatch.setenv("PRORCH_GROUP_COMMIT", "0")
    with pytest.raises(ConfigurationError, match="group_commit"):
        load_settings(cwd=tmp_path)


def orchestrator_accepts(name: str, value: Any) -> bool:
    from prorch import Orchestrator
    from repositories.memory import MemoryBackend

    try:
        Orchestrator(MemoryBackend(), **{name: value}).close()
    except ConfigurationError:
        return False
    return True


def settings_accept(name: str, value: Any) -> bool:
    try:
        SettingsFields.model_validate({name: value})
    except ValidationError:
        return False
    return True


def test_the_settings_and_the_orchestrator_agree_on_defaults_and_bounds() -> None:
    """A setting given to ``prorch worker`` and the same given to ``Orchestrator(...)`` take the
    same default and refuse the same values (they once drifted: ``max_crashes = 0`` was refused
    in ``prorch.toml`` and taken by ``Orchestrator(max_crashes=0)``)."""
    from prorch import Orchestrator

    keywords = inspect.signature(Orchestrator.__init__).parameters
    shared = [
        name for name in SettingsFields.model_fields if name in keywords and name not in ("repository", "retention")
    ]
    assert {"concurrency", "batch_size", "lease_seconds", "max_crashes", "max_abandoned_hooks"} <= set(shared)
    for name in shared:
        assert keywords[name].default == SettingsFields.model_fields[name].default, name
        for value in (-1, 0, 0.5, 1, 2, 65535, 65536, None):
            assert orchestrator_accepts(name, value) == settings_accept(name, value), (name, value)
    for name in ("interval", "wake_poll"):
        default = inspect.signature(Orchestrator.run_forever).parameters[name].default
        assert default == SettingsFields.model_fields[name].default, name


def test_the_documented_defaults_are_the_defaults() -> None:
    """docs/configuration.md's table states each numeric setting's default as the code has it."""
    table = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| `([0-9.]+)` \|", table, re.MULTILINE))
    assert {"interval", "concurrency", "lease_seconds", "max_crashes", "dashboard_port"} <= set(documented)
    for name, text in documented.items():
        assert str(SettingsFields.model_fields[name].default) == text, name
