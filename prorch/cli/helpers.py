"""What every command shares: the settings context, error reporting with exit codes, and
the options and arguments several commands take (as rq's ``cli/helpers.py``)."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import click

from prorch.config import LoadedSettings, Settings, closest, load_settings
from prorch.features import tenant_plugins
from prorch.model import attributes as search_attributes
from prorch.model import logs
from prorch.model.exceptions import (
    ConfigurationError,
    InvalidMessageError,
    InvalidParamsError,
    KeyConflictError,
    NotRegisteredError,
    ProrchError,
)
from prorch.model.registry import current_registry
from prorch.model.status import Status
from prorch.orchestrator import Orchestrator
from prorch.storage.listing import filter_value, parse_age
from prorch.storage.repository import RepositoryLike

USAGE_ERRORS = (ConfigurationError, NotRegisteredError, InvalidParamsError, InvalidMessageError, KeyConflictError)


STATUSES = [status.value for status in Status]
FLAG_NAMES = {"dashboard_host": "--host", "dashboard_port": "--port", "dashboard_allowed_hosts": "--allowed-host"}
"""Settings whose command-line flag is not ``--`` + the setting's name (``prorch dashboard --port``)."""
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
"""``module:attribute``: a repository of your own, where a URL would be (a URL has ``://``)."""
F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What every command needs: the flags given to the group, loaded into settings on demand."""

    def __init__(self, flags: dict[str, Any], config_file: str | None, verbose: bool) -> None:
        self.flags = flags
        self.config_file = config_file
        self.verbose = verbose
        self._loaded: LoadedSettings | None = None

    def loaded(self, **more_flags: Any) -> LoadedSettings:
        if self._loaded is None or more_flags:
            self._loaded = load_settings(
                {**self.flags, **more_flags}, config_file=self.config_file, flag_names=FLAG_NAMES
            )
            settings = self._loaded.settings
            logs.configure("DEBUG" if self.verbose else settings.log_level, settings.log_format)
            for warning in self._loaded.warnings:
                click.echo(f"warning: {warning}", err=True)
        return self._loaded

    @property
    def settings(self) -> Settings:
        return self.loaded().settings

    def has_app(self) -> bool:
        """Whether the user's code is loaded here (``--app``), as the workers have it: only then
        does code missing here mean a pipeline no worker can run."""
        return bool(self.settings.app)

    def import_apps(self) -> None:
        """Import the user's modules, so that their pipelines register (cwd is importable, as
        with ``python -m``)."""
        wanted = [*self.settings.app, *self.settings.plugins]
        if wanted and str(Path.cwd()) not in sys.path:
            sys.path.append(str(Path.cwd()))  # after the installed packages: a stray ./sqlite3.py shadows nothing
        for module in self.settings.app:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                if shadowed_name(exc) is None:
                    raise ConfigurationError(f"cannot import app module {module!r}: ImportError: {exc}") from exc
                raise ConfigurationError(f"app module {module!r}: {shadowed_explanation(exc)}") from exc
            except ProrchError as exc:  # e.g. two steps registered under one name
                raise ConfigurationError(f"app module {module!r} failed to import: {exc}") from exc
            except Exception as exc:  # a SyntaxError or an exception at import: one line, -v for the traceback
                raise ConfigurationError(f"cannot import app module {module!r}: {type(exc).__name__}: {exc}") from exc
        tenant_plugins.discover(self.settings.plugins)
        self.warn_unknown_overrides()

    def warn_unknown_overrides(self) -> None:
        """A ``[steps.X]`` or ``[pipelines.X]`` table naming nothing registered is a typo to report."""
        if not self.settings.app:
            return  # without the user's code loaded, nothing can be judged
        registry = current_registry()
        for kind, names, known in (
            ("steps", self.settings.steps, registry.steps),
            ("pipelines", self.settings.pipelines, registry.pipelines),
        ):
            for name in names:
                if name not in known:
                    hint = closest(name, known)
                    click.echo(f"warning: [{kind}.{name}] names no registered {kind[:-1]}; ignored{hint}", err=True)

    def repository(self) -> RepositoryLike:
        """The configured repository: a URL, or the object that ``module:attribute`` names."""
        setting = self.settings.repository
        if not FACTORY.match(setting):
            refuse_transient(setting)
            return setting
        return load_repository(setting)

    def orchestrator(self, **more_flags: Any) -> Orchestrator:
        settings = self.loaded(**more_flags).settings
        repository = self.repository()
        self.import_apps()
        orchestrator = Orchestrator(
            repository,
            concurrency=settings.concurrency,
            batch_size=settings.batch_size,
            group_commit=settings.group_commit,
            group_window=settings.group_window,
            prefetch=settings.prefetch,
            lease_seconds=settings.lease_seconds,
            max_crashes=settings.max_crashes,
            step_overrides=settings.steps,
            hook_timeout=settings.hook_timeout,
            max_abandoned_hooks=settings.max_abandoned_hooks,
            shutdown_grace=settings.shutdown_grace,
            step_log_lines=settings.step_log_lines,
            capture_logging=settings.capture_logging,
            retention=parse_age(settings.retention, "retention") if settings.retention else None,
        )
        orchestrator.app_version = self.app_version()
        return orchestrator

    def app_version(self) -> str | None:
        """The first ``--app`` module's ``__version__`` that is set (after ``import_apps``), else None."""
        for module in self.settings.app:
            found = getattr(sys.modules.get(module), "__version__", None)
            if found is not None:
                return str(found)
        return None


def load_repository(setting: str) -> RepositoryLike:
    """``module:attribute`` (``-r myapp.store:make_repository``): the attribute is what
    ``Orchestrator`` takes (an ``IRepository`` subclass or a backend), or a function of no
    arguments that returns one. The current directory is importable, as for ``--app``."""
    module_name, _, attribute = setting.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except ImportError as exc:
        raise ConfigurationError(f"repository {setting!r}: cannot import module {module_name!r}: {exc}") from exc
    except AttributeError:
        raise ConfigurationError(
            f"repository {setting!r}: module {module_name!r} has no attribute {attribute!r}; "
            "give module:attribute naming an IRepository subclass, a backend, or a function returning one"
        ) from None
    if inspect.isfunction(found):
        try:
            found = found()
        except ProrchError:
            raise
        except Exception as exc:
            raise ConfigurationError(
                f"repository {setting!r}: {attribute}() raised {type(exc).__name__}: {exc}"
            ) from exc
    return cast(RepositoryLike, found)  # Orchestrator checks it, with one clear error


def shadowed_name(exc: ImportError) -> str | None:
    """The name an app looked up in prorch's ``repositories`` package, when that is what failed:
    the app has a package of that name, which prorch's (imported first) hides."""
    if exc.name != "repositories" or not exc.path:
        return None
    expected = Path(__file__).resolve().parents[2] / "repositories"
    if Path(exc.path).resolve().parent != expected:
        return None
    match = re.search(r"cannot import name '([^']+)'", str(exc))
    return match.group(1) if match else None


def shadowed_explanation(exc: ImportError) -> str:
    return (
        f"it imports {shadowed_name(exc)!r} from 'repositories', but that name found prorch's own "
        f"'repositories' package ({exc.path}), not your application's package of the same name: "
        "rename your package (e.g. 'app_repositories') and its imports (docs/migration.md)"
    )


def refuse_transient(url: str) -> None:
    """A command's store must outlive the command: an in-memory one would keep nothing."""
    if url.rstrip("/") in ("sqlite:", "sqlite:///:memory:", "memory:") or url.startswith("memory://"):
        raise ConfigurationError(
            f"repository {url!r} lives in memory and keeps nothing after this command exits; "
            "use a file, e.g. sqlite:///prorch.db"
        )


@contextmanager
def reported(ctx: Context) -> Iterator[None]:
    """One clear line per error (the traceback with --verbose) and a meaningful exit code."""
    try:
        yield
    except ProrchError as exc:
        if ctx.verbose:
            raise
        fail(str(exc), 2 if isinstance(exc, USAGE_ERRORS) else 1)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def worker_options(command: Any) -> Any:
    """The pass settings, shared by ``run`` and ``worker``."""
    for option in reversed(
        [
            click.option("--concurrency", type=int, help="Hooks run at once by this process."),
            click.option("--batch-size", type=int, help="Pipelines claimed per pass."),
            click.option("--group-commit", type=int, help="Transitions stored per commit (1: one each)."),
            click.option("--lease-seconds", type=float, help="How long a claim lasts unrenewed."),
            click.option("--hook-timeout", type=float, help="Seconds a hook call may take when its step sets none."),
        ]
    ):
        command = option(command)
    return command


def params_options(changes: bool = False) -> Callable[[F], F]:
    """``--param/-p KEY=VALUE`` (repeatable, into ``pairs``) and ``--params-json``, read
    together by ``parse_params``: a new pipeline's params (``start``), or with ``changes``
    the ones a rerun changes."""
    what, json_help = ("A parameter", "All parameters as one JSON object.")
    if changes:
        what, json_help = ("A parameter to change", "The parameters to change, as one JSON object.")
    others = " the others are the original's." if changes else ""
    pair_help = f"{what} (repeatable);{others} VALUE is read as JSON when it parses, else as text."

    def decorate(command: F) -> F:
        command = click.option("--params-json", help=json_help)(command)
        return click.option("--param", "-p", "pairs", multiple=True, metavar="KEY=VALUE", help=pair_help)(command)

    return decorate


def parse_params(pairs: tuple[str, ...], params_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_json is not None:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise InvalidParamsError(f"--params-json is not valid JSON: {exc}") from exc
        except RecursionError:
            raise InvalidParamsError("--params-json is nested too deeply (at most 100 levels)") from None
        if not isinstance(loaded, dict):
            raise InvalidParamsError('--params-json must be a JSON object, e.g. \'{"path": "/data"}\'')
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidParamsError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
        except RecursionError:
            raise InvalidParamsError(f"--param {key}: nested too deeply (at most 100 levels)") from None
    return params


def parse_attributes(pairs: tuple[str, ...] | None) -> dict[str, str] | None:
    """``--attr name=value`` (repeatable): search attributes to give a pipeline or to filter by."""
    return dict(search_attributes.parse_pair(pair) for pair in pairs) if pairs else None


def parse_param_filter(pair: str) -> tuple[str, Any]:
    """``--param name=value`` of ``prorch list``: VALUE is read as JSON when it parses (``3``,
    ``true``), else as text."""
    field, sep, text = pair.partition("=")
    if not sep or not field:
        raise InvalidParamsError(f"--param {pair!r}: expected NAME=VALUE")
    return field, filter_value(text)
