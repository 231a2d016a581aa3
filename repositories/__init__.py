"""Ready repository backends for prorch, chosen by URL with ``from_url``.

A backend is a callable ``model -> IRepository`` that shares one store (file, pool, dict) between
the models; pass it wherever prorch takes a repository. Drivers are imported only for the URL
that needs them.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

from prorch.model.exceptions import ConfigurationError
from prorch.model.secrets import redact_url
from prorch.storage.repository import RepositoryFactory
from repositories.memory import MemoryBackend, MemoryRepository
from repositories.schemes import SUPPORTED_SCHEMES

DEFAULT_URL = "sqlite:///prorch.db"


_backends: dict[tuple[str, int], RepositoryFactory] = {}
_backends_lock = threading.Lock()


def from_url(url: str) -> RepositoryFactory:
    """The backend for ``url``: ``sqlite:///path.db``, ``postgresql://...``,
    ``tinydb:///path.json``, ``memory://`` (or ``memory://name``), or another SQLAlchemy URL.

    One backend per URL per process: ``Pipeline.create(url)`` and ``Orchestrator(url)`` share its
    engine, file lock or dict; a forked child makes its own. Raises ``ConfigurationError`` naming
    what is supported."""
    key = (url, os.getpid()) if isinstance(url, str) else None
    if key is not None and key in _backends:
        return _backends[key]
    with _backends_lock:
        if key is not None and key in _backends:
            return _backends[key]
        backend = _make_backend(url)
        if key is not None:
            _backends[key] = backend
        return backend


def _make_backend(url: str) -> RepositoryFactory:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"malformed repository URL {redact_url(url)!r}: expected scheme://..., e.g. {', '.join(SUPPORTED_SCHEMES)}"
        )
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryBackend()
    if scheme == "tinydb":
        path = url.split("://", 1)[1]
        if not path.startswith("/") or path == "/":
            raise ConfigurationError(
                f"malformed TinyDB URL {url!r}: use tinydb:///relative.json or tinydb:////abs.json"
            )
        from repositories.tinydb import TinyDBBackend

        return TinyDBBackend(path[1:])
    if not scheme:
        raise ConfigurationError(
            f"malformed repository URL {redact_url(url)!r}: no scheme; supported: {', '.join(SUPPORTED_SCHEMES)}"
        )
    from repositories.sql import SQLBackend

    return SQLBackend(url)


__all__ = ["DEFAULT_URL", "SUPPORTED_SCHEMES", "MemoryBackend", "MemoryRepository", "from_url"]
