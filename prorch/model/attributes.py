"""Search attributes: a pipeline's own labels (``{"customer": "acme"}``), set when it is created
or by a hook (``self.set_attribute``), that listings and bulk actions filter by. SQL stores
index them (a ``pipeline_attributes`` row per attribute); the others filter in Python.

Values are strings only: a filter given on the command line (``--attr customer=acme``) then
means one thing, and every store compares them the same way. Put a number in as text
(``str(42)``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from prorch.model.exceptions import InvalidParamsError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
MAX_VALUE = 200
"""Characters of a value at most (the indexed column's width)."""
MAX_ATTRIBUTES = 32
"""Attributes of one pipeline at most."""


def problem(name: Any, value: Any) -> str | None:
    """What is wrong with one attribute, or None when it can be stored."""
    if not isinstance(name, str) or not NAME.match(name):
        return f"attribute name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or '_'"
    if not isinstance(value, str):
        return f"attribute {name}={value!r}: values are strings; pass str(value) (got {type(value).__name__})"
    if len(value) > MAX_VALUE or "\x00" in value:
        return f"attribute {name}: the value must be at most {MAX_VALUE} characters, without NUL"
    return None


def checked(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    """A copy of ``attributes`` when every one can be stored; else ``InvalidParamsError``
    naming the first that cannot (and nothing is stored)."""
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise InvalidParamsError(f"attributes must be a dict of str to str, got {type(attributes).__name__}")
    for name, value in attributes.items():
        found = problem(name, value)
        if found is not None:
            raise InvalidParamsError(found)
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidParamsError(f"{len(attributes)} attributes: a pipeline has at most {MAX_ATTRIBUTES}")
    return dict(attributes)


def parse_pair(text: str, option: str = "--attr") -> tuple[str, str]:
    """``NAME=VALUE`` from the command line or a URL, checked."""
    name, sep, value = text.partition("=")
    if not sep:
        raise InvalidParamsError(f"{option} {text!r}: expected NAME=VALUE, e.g. customer=acme")
    found = problem(name, value)
    if found is not None:
        raise InvalidParamsError(f"{option} {text!r}: {found}")
    return name, value


def matches(stored: Mapping[str, str], wanted: Mapping[str, str] | None) -> bool:
    """Every wanted attribute is stored with that value (what the SQL filter selects)."""
    return not wanted or all(stored.get(name) == value for name, value in wanted.items())
