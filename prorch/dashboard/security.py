"""Who may act: without a token the dashboard is read-only. With one, a browser logs in once
(the token is checked in constant time, and the session cookie holds an HMAC of it, never the
token), and every form carries a CSRF token tied to that session; API clients send the token as
``Authorization: Bearer ...`` instead, which a cross-site page cannot add.

Sessions live in the dashboard's memory, so logging out ends one for good (a copied cookie is
refused after it); wrong tokens are counted per client, which is refused for a while after a
few (``Throttle``); and only requests that name this dashboard's own host are answered
(``HostCheck``), so a page on another site cannot reach it through DNS rebinding."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SESSION_COOKIE = "prorch_session"
SESSION_SECONDS = 12 * 3600.0
"""How long a login lasts, at most (a restart of the dashboard ends every session too)."""
MAX_SESSIONS = 1000
"""Sessions kept at once; logging in beyond that ends the oldest."""
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def same(offered: str, expected: str) -> bool:
    """Equal, in constant time; any text (``hmac.compare_digest`` refuses non-ASCII ``str``)."""
    return hmac.compare_digest(offered.encode(), expected.encode())


@dataclass
class Guard:
    token: str | None
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _sessions: dict[str, float] = field(default_factory=dict)  # session id -> when it began (monotonic)

    @property
    def read_only(self) -> bool:
        return not self.token

    def _sign(self, purpose: str, value: str = "") -> str:
        assert self.token is not None
        return hmac.new(self._key, f"{purpose}:{self.token}:{value}".encode(), hashlib.sha256).hexdigest()

    def token_matches(self, offered: str | None) -> bool:
        if self.token is None or not offered:
            return False
        return same(offered, self.token)

    def new_session(self) -> str:
        """A session id and its signature, for the cookie set at login."""
        session = secrets.token_hex(16)
        self._sessions[session] = time.monotonic()
        while len(self._sessions) > MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        return f"{session}.{self._sign('session', session)}"

    def session_of(self, cookie: str | None) -> str | None:
        """The session id of a valid cookie of a session that has not ended, else None (no token
        set: never a session)."""
        if self.token is None or not cookie or "." not in cookie:
            return None
        session, signature = cookie.split(".", 1)
        began = self._sessions.get(session)
        if began is None or not same(signature, self._sign("session", session)):
            return None
        if time.monotonic() - began > SESSION_SECONDS:
            del self._sessions[session]
            return None
        return session

    def end_session(self, cookie: str | None) -> None:
        """Log out: the session's cookie is refused from now on, wherever a copy of it is."""
        session = self.session_of(cookie)
        if session is not None:
            del self._sessions[session]

    def csrf_for(self, session: str | None) -> str:
        return self._sign("csrf", session) if session and self.token else ""

    def csrf_matches(self, session: str | None, offered: str | None) -> bool:
        return bool(session and offered and same(offered, self.csrf_for(session)))

    def bearer_matches(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())


@dataclass
class Throttle:
    """Wrong tokens (at the login form or as a bearer token) counted per client: after ``limit``
    within ``window`` seconds the client is refused, even with the right token, until the oldest
    of them is that old. ``overall`` caps the wrong tokens of all clients together, for clients
    that change their address."""

    limit: int = 5
    window: float = 60.0
    overall: int = 50
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    ALL = "*"

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        now = self.clock()
        waits = [self._wait(key, limit, now) for key, limit in ((client, self.limit), (self.ALL, self.overall))]
        longest = max((wait for wait in waits if wait is not None), default=None)
        return None if longest is None else max(1, math.ceil(longest))

    def failed(self, client: str) -> None:
        now = self.clock()
        for key in (client, self.ALL):
            self._recent(key, now).append(now)
        if len(self._failures) > 10_000:  # many clients: forget the ones with nothing recent
            for key in [key for key, times in self._failures.items() if not self._recent(key, now)]:
                del self._failures[key]

    def _wait(self, key: str, limit: int, now: float) -> float | None:
        times = self._recent(key, now)
        return times[-limit] + self.window - now if len(times) >= limit else None

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        return times


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> list[str]:
    """The names a request may give as its ``Host``: the address the dashboard is bound to, the
    loopback names, and the ones configured (``dashboard_allowed_hosts``)."""
    names: list[str] = []
    for name in map(_plain, (bound, *LOCAL_HOSTS, *extra)):
        if name and name not in names:
            names.append(name)
    return names


def _plain(name: str) -> str:
    """A configured host name as ``host_of`` reads a header: lower case, IPv6 without brackets."""
    return name.strip().lower().removeprefix("[").removesuffix("]")


def host_of(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``[::1]:8181`` is ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, colon, port = header.rpartition(":")
    return name.rstrip(".") if colon and port.isdigit() else header.rstrip(".")


class HostCheck:
    """Answers only requests whose ``Host`` is an allowed name (``*`` allows any, ``*.example.com``
    its subdomains): a DNS-rebinding page's requests carry its own name, so they get a 400. As
    Starlette's ``TrustedHostMiddleware``, with IPv6 literals and an error that says what to set."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = [_plain(name) for name in allowed]

    def allows(self, host: str) -> bool:
        return any(
            pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
            for pattern in self.allowed
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host")
        if header is not None and self.allows(host_of(header)):
            await self.app(scope, receive, send)
            return
        named = f"Host {header!r} is not" if header is not None else "a request without a Host header is"
        message = (
            f"{named} allowed by this dashboard (it answers only to {', '.join(self.allowed)}, so that other "
            "sites' pages cannot reach it through DNS rebinding): open it by one of those names, or allow "
            "yours with --allowed-host NAME or PRORCH_DASHBOARD_ALLOWED_HOSTS\n"
        )
        await PlainTextResponse(message, status_code=400)(scope, receive, send)
