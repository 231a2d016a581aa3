"""Who may call the HTTP API for other services (``/api/v1/``): bearer tokens from the
``api_tokens`` setting, each with scopes (read, act, start) and optionally the pipeline names it
may touch. Tokens are compared in constant time and never logged: the logs name a token's label."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prorch.config import ApiToken
from prorch.dashboard.security import same
from prorch.model.exceptions import ProrchError

SCOPES = ("read", "act", "start")


class ApiAuthError(ProrchError):
    """A request the API refuses before it reads or stores anything: ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Caller:
    """The token a request carried, by its label, with what it may do."""

    label: str
    scopes: frozenset[str]
    names: frozenset[str] | None

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise ApiAuthError(
                f"token {self.label!r} lacks the {scope!r} scope (it has {', '.join(sorted(self.scopes))}): "
                f"add {scope!r} to its scopes in api_tokens",
                403,
            )

    def require_name(self, name: str) -> None:
        if self.names is not None and name not in self.names:
            raise ApiAuthError(
                f"token {self.label!r} may not touch pipelines named {name!r} (only {', '.join(sorted(self.names))})",
                403,
            )


@dataclass(frozen=True)
class Tokens:
    """The configured tokens; ``caller`` finds the one an ``Authorization`` header carries."""

    tokens: Mapping[str, ApiToken]

    def caller(self, header: str | None) -> Caller:
        if not self.tokens:
            raise ApiAuthError(
                "the HTTP API has no tokens: set api_tokens in prorch.toml or PRORCH_API_TOKENS (docs/api.md)", 401
            )
        scheme, _, offered = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not offered.strip():
            raise ApiAuthError("send the API token as Authorization: Bearer TOKEN", 401)
        found = None
        for label, token in self.tokens.items():  # every one compared, in constant time each
            if same(offered.strip(), token.token.get_secret_value()) and found is None:
                found = Caller(label, frozenset(token.scopes), frozenset(token.names) if token.names else None)
        if found is None:
            raise ApiAuthError("wrong API token: send one of api_tokens as Authorization: Bearer TOKEN", 401)
        return found
