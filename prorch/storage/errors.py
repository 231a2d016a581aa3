"""How a store's failures reach the engine: one ``RepositoryError`` per failed call, naming the
action, with the driver's first line only (the next ones quote rows and parameters: secrets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prorch.exceptions import ConcurrentUpdateError, ProrchError, RepositoryError
from prorch.secrets import error_summary

T = TypeVar("T")


def call(action: str, func: Callable[..., T], *args: Any) -> T:
    """Run one store call, wrapping a driver's exception in RepositoryError."""
    try:
        return func(*args)
    except ProrchError:
        raise
    except Exception as exc:
        raise RepositoryError(f"repository failed to {action}: {type(exc).__name__}: {error_summary(exc)}") from exc


def conflict(model: str, uuid: str, expected: int) -> ConcurrentUpdateError:
    """The error of a refused compare-and-set."""
    return ConcurrentUpdateError(
        f"{model} {uuid} changed since it was read (revision {expected}); "
        "another orchestrator holds it or it was cancelled",
        uuid=uuid,
    )
