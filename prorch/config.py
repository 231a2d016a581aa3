"""Settings, layered: defaults < config file (``prorch.toml``, or ``[tool.prorch]`` in
``pyproject.toml``) < environment (``PRORCH_*``) < command-line flags. Every value remembers
which layer it came from, for ``prorch config``; a bad value or unknown key is one error naming
it and where it was set."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from prorch.engine.policy import StepOverride
from prorch.model import defaults
from prorch.model.exceptions import ConfigurationError
from prorch.storage.listing import parse_age

if sys.version_info >= (3, 11):
    from tomllib import TOMLDecodeError
else:  # pragma: no cover - Python 3.10
    from tomli import TOMLDecodeError

DEFAULT_REPOSITORY_URL = "sqlite:///prorch.db"
CONFIG_FILE = "prorch.toml"
PYPROJECT_FILE = "pyproject.toml"
PYPROJECT_TABLE = ("tool", "prorch")


Scope = Literal["read", "act", "start"]


class ApiToken(BaseModel):
    """One token of the HTTP API (``/api/v1/``), under a label that the logs name (never the
    token): what it may do (``scopes``) and, optionally, to which pipeline names."""

    model_config = ConfigDict(extra="forbid")
    token: SecretStr = Field(description="the bearer token (16 characters or more)")
    scopes: list[Scope] = Field(min_length=1, description="read (get, result, list), act (send, cancel, retry), start")
    names: list[str] | None = Field(default=None, description="pipeline names it may touch (unset: every name)")

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("a token needs 16 characters or more: make one with openssl rand -hex 20")
        return value


class PipelineOverride(BaseModel):
    """Per-pipeline settings that override the class attributes, by pipeline name."""

    model_config = ConfigDict(extra="forbid")
    priority: int | None = None


def ruled(rule: defaults.Rule[Any], description: str) -> Any:
    """A field whose default and bounds are its rule's in ``prorch.model.defaults``, which the
    ``Orchestrator`` checks its arguments by too."""
    finite = None if rule.integer else False  # no inf or nan where a number of seconds is taken
    return Field(
        default=rule.default, gt=rule.gt, ge=rule.ge, le=rule.le, allow_inf_nan=finite, description=description
    )


Modules = Annotated[list[str], NoDecode]  # "a.b, c.d" in the environment, a list in TOML
Names = Annotated[list[str], NoDecode]  # "a, b" in the environment, a list in TOML


class SettingsFields(BaseModel):
    """Everything ``prorch`` can be told. Field names are the TOML keys; the environment
    variable is ``PRORCH_`` + the name in capitals (``PRORCH_LEASE_SECONDS``); the flag is
    ``--`` + the name with dashes (``--lease-seconds``). Validates one layer on its own."""

    model_config = ConfigDict(extra="forbid")

    repository: str = Field(
        default=DEFAULT_REPOSITORY_URL, description="repository URL, or module:factory naming your own repository"
    )
    app: Modules = Field(default_factory=list, description="modules that define your pipelines")
    plugins: Modules = Field(default_factory=list, description="modules that register plugins")
    interval: float = ruled(defaults.INTERVAL, "seconds an idle worker waits at most between passes")
    wake_poll: float = ruled(
        defaults.WAKE_POLL, "seconds between an idle worker's looks for other processes' work (SQLite, TinyDB)"
    )
    concurrency: int = ruled(defaults.CONCURRENCY, "hooks run at once by one process")
    batch_size: int = ruled(defaults.BATCH_SIZE, "pipelines claimed per pass")
    group_commit: int = ruled(
        defaults.GROUP_COMMIT, "transitions of different pipelines stored per commit (1: one each)"
    )
    group_window: float = ruled(
        defaults.GROUP_WINDOW, "seconds a worker waits for a running hook before it commits the transitions waiting"
    )
    prefetch: int | None = ruled(
        defaults.PREFETCH, "pipelines a worker claims beyond its free slots (default: concurrency / 4, at least 2)"
    )
    lease_seconds: float = ruled(defaults.LEASE_SECONDS, "how long a claim lasts unrenewed")
    max_crashes: int = ruled(
        defaults.MAX_CRASHES, "worker deaths in a row inside a pipeline's hooks before it is quarantined"
    )
    hook_timeout: float | None = ruled(
        defaults.HOOK_TIMEOUT, "seconds one hook call may take when its step sets no timeout (off)"
    )
    max_abandoned_hooks: int | None = ruled(
        defaults.MAX_ABANDONED_HOOKS, "hung hook threads a worker may hold before it exits (default: concurrency)"
    )
    shutdown_grace: float = ruled(
        defaults.SHUTDOWN_GRACE, "seconds a stopping worker waits for running hooks before it exits"
    )
    step_log_lines: int = ruled(defaults.STEP_LOG_LINES, "lines of a hook's self.log kept per step attempt")
    capture_logging: bool = Field(
        default=False, description="keep the logging records emitted while a hook runs with its step's logs too"
    )
    retention: str | None = Field(
        default=None,
        description="a worker purges finished and cancelled pipelines older than this (e.g. 30d; unset: never)",
    )
    metrics_port: int | None = ruled(defaults.PORT, "port a worker serves /metrics and /healthz on (unset: none)")
    dashboard_host: str = Field(default="127.0.0.1", description="address prorch dashboard listens on")
    dashboard_port: int = ruled(defaults.DASHBOARD_PORT, "port prorch dashboard listens on")
    dashboard_token: SecretStr | None = Field(
        default=None, description="token that allows the dashboard's actions (unset: read-only)"
    )
    dashboard_allowed_hosts: Names = Field(
        default_factory=list,
        description="host names the dashboard answers to besides its address and localhost (* for any)",
    )
    api_tokens: dict[str, ApiToken] = Field(
        default_factory=dict,
        description="tokens of the dashboard's HTTP API /api/v1/, by label (unset: the API answers 401)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log level")
    log_format: Literal["text", "json"] = Field(default="text", description="log line format")
    pipelines: dict[str, PipelineOverride] = Field(default_factory=dict, description="per-pipeline overrides")
    steps: dict[str, StepOverride] = Field(default_factory=dict, description="per-step overrides")

    @field_validator("app", "plugins", "dashboard_allowed_hosts", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("retention")
    @classmethod
    def _age(cls, value: str | None) -> str | None:
        if value is not None:
            parse_age(value, "retention")  # one clear error at load, not at the first purge
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings, SettingsFields):
    """The effective settings. ``Settings()`` in your own code reads the same layers as the
    command line, through pydantic-settings' sources: its arguments < ``PRORCH_*`` < the config
    file found in the current directory; ``load_settings`` also says where each value came from."""

    model_config = SettingsConfigDict(env_prefix="PRORCH_", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        _, source = file_source(None, Path.cwd())
        return (init_settings, env_settings, source) if source is not None else (init_settings, env_settings)


class LoadedSettings(BaseModel):
    """The effective settings and, for each field, the layer that set it."""

    settings: Settings
    origins: dict[str, str]
    config_file: Path | None = None
    warnings: list[str] = []  # things set that nothing reads, e.g. a misspelt PRORCH_* variable


def file_source(explicit: str | Path | None, cwd: Path) -> tuple[Path | None, PydanticBaseSettingsSource | None]:
    """The config file and the pydantic-settings source that reads it: ``explicit``, else
    ``prorch.toml``, else the ``[tool.prorch]`` table of ``pyproject.toml``, in ``cwd``."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigurationError(f"config file {path} does not exist")
        return path, _source(path)
    for name in (CONFIG_FILE, PYPROJECT_FILE):
        path = cwd / name
        if path.is_file():
            source = _source(path)
            if name == CONFIG_FILE or (source is not None and source()):
                return path, source
    return None, None


def _source(path: Path) -> PydanticBaseSettingsSource | None:
    """pydantic-settings' TOML source for the file (its ``[tool.prorch]`` table for a
    ``pyproject.toml``); None for a ``pyproject.toml`` without that table."""
    header = PYPROJECT_TABLE if path.name == PYPROJECT_FILE else None
    try:
        return TomlConfigSettingsSource(Settings, toml_file=path, toml_table_header=header)
    except KeyError:  # no [tool.prorch] table
        return None
    except (OSError, TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc}") from exc


def find_config_file(explicit: str | Path | None, cwd: Path) -> tuple[Path | None, dict[str, Any]]:
    """The config file and its prorch table (see ``file_source``)."""
    path, source = file_source(explicit, cwd)
    return path, dict(source()) if source is not None else {}


def load_settings(
    flags: dict[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    cwd: Path | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> LoadedSettings:
    """Merge the layers, validating each on its own so that an error names where it was set.
    ``flag_names``: the flag of a setting whose flag is not ``--`` + its name (``--port``)."""
    names = flag_names or {}
    path, file_values = find_config_file(config_file, cwd or Path.cwd())
    flag_values = {key: value for key, value in (flags or {}).items() if value not in (None, ())}
    layers: list[tuple[Callable[[str], str], dict[str, Any]]] = [
        (lambda key: f"file {path}", file_values),
        (lambda key: f"environment variable PRORCH_{key.upper()}", _environment()),
        (lambda key: f"flag {names.get(key) or '--' + key.replace('_', '-')}", flag_values),
    ]
    merged: dict[str, Any] = {}
    origins = {name: "default" for name in Settings.model_fields}
    for where, values in layers:
        _validate_layer(where, values)
        for key, value in values.items():
            if key in ("pipelines", "steps", "api_tokens") and isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
            origins[key] = where(key)
    settings = Settings.model_validate(merged)
    return LoadedSettings(settings=settings, origins=origins, config_file=path, warnings=unknown_variables())


KNOWN_VARIABLES = {f"PRORCH_{name.upper()}" for name in SettingsFields.model_fields} | {"PRORCH_CONFIG"}


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``PRORCH_*`` variable that is no setting, with the closest known name:
    a typo there would otherwise be ignored without a word."""
    found = os.environ if environ is None else environ
    return [
        f"environment variable {name} is not a prorch setting; ignored{closest(name, KNOWN_VARIABLES)}"
        for name in sorted(found)
        if name.startswith("PRORCH_") and name not in KNOWN_VARIABLES
    ]


def closest(name: str, known: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the known name closest to ``name``, or ``""``."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _environment() -> dict[str, Any]:
    """The ``PRORCH_*`` variables, parsed by pydantic-settings; a value that does not parse
    (``PRORCH_STEPS='{bad'``) is one error naming the variable."""
    try:
        return dict(EnvSettingsSource(Settings)())
    except SettingsError as exc:
        field = str(exc).split('field "', 1)[-1].split('"', 1)[0]
        raise ConfigurationError(
            f"invalid environment variable PRORCH_{field.upper()}: not valid JSON ({exc.__cause__ or exc}); "
            'per-name tables are JSON there, e.g. PRORCH_STEPS=\'{"Charge": {"timeout": 120}}\''
        ) from exc


def _validate_layer(where: Callable[[str], str], values: dict[str, Any]) -> None:
    try:
        SettingsFields.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        source = where(str(first["loc"][0]))
        if first["type"] == "extra_forbidden":
            known = ", ".join(SettingsFields.model_fields)
            raise ConfigurationError(f"unknown setting {key!r} in {source} (known: {known})") from exc
        raise ConfigurationError(f"invalid setting {key!r} in {source}: {first['msg']}") from exc
