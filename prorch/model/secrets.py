"""Keeping secrets out of what prorch shows: URLs with passwords, and driver errors that quote rows.

Every place that shows a repository URL (errors, logs, ``prorch config``, the worker's banner)
goes through ``redact_url``; every driver error becomes text through ``error_summary``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "key")
"""A query-string parameter whose name contains one of these is hidden."""
MAX_SUMMARY = 500


def redact_url(url: str) -> str:
    """``url`` with the password of its user part and any secret query parameter as ``***``;
    otherwise exactly as given."""
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        credentials, host = authority.rsplit("@", 1)
        if ":" in credentials:
            authority = credentials.split(":", 1)[0] + ":***@" + host
    path, question, query = tail.partition("?")
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        hidden = [(k, "***" if any(word in k.lower() for word in SECRET_WORDS) else v) for k, v in pairs]
        query = urlencode(hidden, safe="*/:")
    return f"{scheme}://{authority}{slash}{path}{question}{query}"


def error_summary(exc: BaseException) -> str:
    """The first line of a driver error, cut: drivers append the failing row (PostgreSQL's
    ``DETAIL: Failing row contains ...``), the statement and its parameters on later lines."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    first = lines[0] if lines else type(cause).__name__
    return first if len(first) <= MAX_SUMMARY else first[:MAX_SUMMARY] + " [...]"
