"""Ready repository backends for prorch, chosen by URL with ``from_url``.

A backend is a callable ``model -> IRepository`` that shares one store (file, pool, dict) between
the models; pass it wherever prorch takes a repository.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from prorch.exceptions import ConfigurationError
from prorch.repository import RepositoryFactory
from repositories.memory import MemoryBackend, MemoryRepository

SUPPORTED_SCHEMES = ("memory://",)


def from_url(url: str) -> RepositoryFactory:
    """The backend for ``url``; a clear ``ConfigurationError`` for anything else."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"malformed repository URL {url!r}: expected scheme://..., one of {', '.join(SUPPORTED_SCHEMES)}"
        )
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryBackend()
    raise ConfigurationError(
        f"unsupported repository URL scheme {scheme!r} in {url!r}; supported: {', '.join(SUPPORTED_SCHEMES)}"
    )


__all__ = ["SUPPORTED_SCHEMES", "MemoryBackend", "MemoryRepository", "from_url"]
