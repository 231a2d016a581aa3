"""Who may act: without a token the dashboard is read-only. With one, a browser logs in once
(the token is checked in constant time, and the session cookie holds an HMAC of it, never the
token), and every form carries a CSRF token tied to that session; API clients send the token as
``Authorization: Bearer ...`` instead, which a cross-site page cannot add."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

SESSION_COOKIE = "prorch_session"


@dataclass
class Guard:
    token: str | None
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def read_only(self) -> bool:
        return not self.token

    def _sign(self, purpose: str, value: str = "") -> str:
        assert self.token is not None
        return hmac.new(self._key, f"{purpose}:{self.token}:{value}".encode(), hashlib.sha256).hexdigest()

    def token_matches(self, offered: str | None) -> bool:
        if self.token is None or not offered:
            return False
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def new_session(self) -> str:
        """A session id and its signature, for the cookie set at login."""
        session = secrets.token_hex(16)
        return f"{session}.{self._sign('session', session)}"

    def session_of(self, cookie: str | None) -> str | None:
        """The session id of a valid cookie, else None (no token set: never a session)."""
        if self.token is None or not cookie or "." not in cookie:
            return None
        session, signature = cookie.split(".", 1)
        return session if hmac.compare_digest(signature, self._sign("session", session)) else None

    def csrf_for(self, session: str | None) -> str:
        return self._sign("csrf", session) if session and self.token else ""

    def csrf_matches(self, session: str | None, offered: str | None) -> bool:
        return bool(session and offered and hmac.compare_digest(offered, self.csrf_for(session)))

    def bearer_matches(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())
