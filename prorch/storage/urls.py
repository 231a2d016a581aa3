"""From what a user passes (a URL, a backend from ``repositories``, a seed-style repository
class) to a ``Backend``: the only place the engine reaches the ``repositories`` package."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

from prorch.model.exceptions import ConfigurationError, RepositoryNotDefinedException
from prorch.storage.backend import Backend
from prorch.storage.repository import IRepository, RepositoryFactory
from prorch.storage.seed_adapter import SeedAdapter


def resolve_backend(repository: object) -> RepositoryFactory:
    """Accept a URL string, a backend from ``repositories``, or a seed-style repository class."""
    if repository is None:
        raise RepositoryNotDefinedException()
    if isinstance(repository, str):
        backend: RepositoryFactory = backends_package().from_url(repository)
        return backend
    if isinstance(repository, IRepository):
        raise ConfigurationError(
            f"got a repository instance ({type(repository).__name__}); pass its class or a "
            "backend (a callable model -> IRepository) or a URL such as 'sqlite:///prorch.db'"
        )
    if not callable(repository):
        raise ConfigurationError(
            f"cannot use {repository!r} as a repository: pass a URL such as 'sqlite:///prorch.db', "
            "a backend from `repositories`, or an IRepository subclass"
        )
    return repository


_ADAPTERS: weakref.WeakKeyDictionary[Any, SeedAdapter] = weakref.WeakKeyDictionary()
_ADAPTERS_LOCK = threading.Lock()


def backend_of(factory: RepositoryFactory) -> Backend:
    """The factory itself where it implements the contract (every shipped backend), else the
    seed adapter around it (a user's four-method repository), made once per factory in a
    process: a seed-style repository often opens its file per instance (TinyDB), and two
    instances of one model in one process (``Pipeline.create`` beside a running orchestrator)
    would each keep their own idea of the file (TinyDB's next document id: "Document with ID 3
    already exists")."""
    if isinstance(factory, Backend) and not isinstance(factory, type):
        return factory
    with _ADAPTERS_LOCK:
        try:
            adapter = _ADAPTERS.get(factory)
        except TypeError:  # not weakly referenceable: one adapter per store, as before
            return SeedAdapter(factory)
        if adapter is None:
            adapter = _ADAPTERS[factory] = SeedAdapter(factory)
        return adapter


def backends_package() -> Any:
    """prorch's own ``repositories`` package, checked: an application's package of the same name
    found first on ``sys.path`` would otherwise fail later with a puzzling error."""
    try:
        import repositories
    except ImportError as exc:  # pragma: no cover - the package ships with prorch
        raise ConfigurationError("the 'repositories' package is missing; reinstall prorch") from exc
    expected = Path(__file__).resolve().parent.parent.parent / "repositories"
    where = getattr(repositories, "__file__", None) or ", ".join(getattr(repositories, "__path__", []))
    if not where or Path(where).resolve().parent != expected or not hasattr(repositories, "from_url"):
        raise ConfigurationError(
            f"the module 'repositories' was imported from {where or 'a namespace package'}, which shadows "
            f"prorch's own 'repositories' package ({expected}): rename your package (e.g. 'app_repositories') "
            "or keep its folder off sys.path ahead of the installed packages (PYTHONPATH, the current "
            "directory of `python -m` or a script)"
        )
    return repositories
