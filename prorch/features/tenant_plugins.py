"""Tenant plugins (from task-catalog-poc): functions registered for a step's plugin point,
optionally for one tenant; ``self.plugins(point, **kwargs)`` in a hook runs the matching ones.

A step declares its points and their keyword arguments (``plugin_points = {"format":
("text",)}``), so a plugin whose signature cannot take them is rejected when it registers, not
when a customer's pipeline first reaches it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from prorch.model.exceptions import ConfigurationError, ProrchError, RegistrationError
from prorch.model.registry import Plugin, Registry, current_registry
from prorch.model.step import Step

logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "prorch.plugins"
F = TypeVar("F", bound=Callable[..., Any])


def register_plugin(
    *, step: type[Step] | str, point: str, tenant: str | None = None, order: int = 0, registry: Registry | None = None
) -> Callable[[F], F]:
    """Decorator: run ``func(step, **kwargs)`` when ``step`` calls ``self.plugins(point, ...)``
    in a pipeline of ``tenant`` (any tenant when None). ``registry``: where to register it
    (default: the global registry)."""

    def decorate(func: F) -> F:
        target = registry or current_registry()
        step_cls = step if isinstance(step, type) else target.step(step)
        if not (isinstance(step_cls, type) and issubclass(step_cls, Step)) or not step_cls.name:
            raise RegistrationError(f"plugin {func.__qualname__}: step must be a registered Step class or name")
        points = step_cls.plugin_points
        if point not in points:
            declared = ", ".join(sorted(points)) or "none"
            raise RegistrationError(
                f"plugin {func.__qualname__}: step {step_cls.name} has no plugin point {point!r} "
                f"(declared: {declared}); declare it in plugin_points"
            )
        check_signature(func, point, points[point])
        target.plugins.append(Plugin(func, step_cls.name, point, tenant, order, sequence=len(target.plugins)))
        return func

    return decorate


def check_signature(func: Callable[..., Any], point: str, arguments: Iterable[str]) -> None:
    """The plugin must accept the step as its first argument and the point's keywords."""
    try:
        inspect.signature(func).bind(object(), **{name: None for name in arguments})
    except TypeError as exc:
        raise RegistrationError(
            f"plugin {func.__qualname__} cannot take point {point!r}'s arguments "
            f"(step, {', '.join(f'{a}=...' for a in arguments)}): {exc}"
        ) from exc


def discover(modules: Iterable[str] = ()) -> list[str]:
    """Import the configured plugin modules, then everything in the ``prorch.plugins``
    entry-point group (an installed package's plugins register on import). Returns their names."""
    loaded = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import plugin module {module!r}: {exc}") from exc
        except ConfigurationError:
            raise
        except ProrchError as exc:  # a plugin that cannot register is a configuration error (exit 2)
            raise ConfigurationError(f"plugin module {module!r} failed to register: {exc}") from exc
        loaded.append(module)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:
            raise ConfigurationError(f"cannot load plugin entry point {entry.name!r} ({entry.value}): {exc}") from exc
        loaded.append(entry.value)
    logger.debug("plugins loaded: %s", loaded)
    return loaded
