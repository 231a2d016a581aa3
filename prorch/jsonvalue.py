"""The one check of what may be stored as a value: params, context, metadata, outputs and message
payloads are JSON values, checked the same way for every backend before anything is written.

Nothing is converted: ``json.dumps`` would turn a tuple into a list, an int key into a string,
NaN into invalid JSON (or, through pydantic, into null) and PostgreSQL refuses a NUL character.
A value that would not come back from the store exactly as it went in is refused instead, with
the key path and the type, so the caller can fix it before any side effect is lost.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from prorch.exceptions import UnstorableValueError

MAX_DEPTH = 100
"""Deepest nesting accepted: deeper data is almost always a bug, and some drivers recurse."""

_SCALARS = (str, int, float, bool, type(None))


def check_json(value: Any, where: str) -> None:
    """Raise ``UnstorableValueError`` naming the first offending path under ``where`` (for
    example ``metadata['job'][2]``) unless ``value`` is a JSON value: None, bool, int, finite
    float, str without NUL, list, or dict with str keys, nested at most ``MAX_DEPTH`` deep."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        kind = type(item)
        if kind is str:
            if "\x00" in item:
                raise UnstorableValueError(f"{path}: a string with a NUL character (\\x00) cannot be stored")
        elif kind is float:
            if not math.isfinite(item):
                raise UnstorableValueError(f"{path}: {item!r} is not a JSON number (NaN and infinity are refused)")
        elif kind in _SCALARS:
            continue
        elif kind is list or kind is dict:
            if depth >= MAX_DEPTH:
                raise UnstorableValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
            if kind is list:
                stack.extend((element, f"{path}[{index}]", depth + 1) for index, element in enumerate(item))
                continue
            for key, element in item.items():
                if type(key) is not str:
                    raise UnstorableValueError(
                        f"{path}: key {key!r} is a {type(key).__name__}; JSON object keys must be str"
                    )
                if "\x00" in key:
                    raise UnstorableValueError(f"{path}: key {key!r} has a NUL character (\\x00)")
                stack.append((element, f"{path}[{key!r}]", depth + 1))
        else:
            hint = " (use a list)" if kind in (tuple, set, frozenset) else ""
            raise UnstorableValueError(f"{path}: {kind.__name__} is not a JSON value{hint}; store JSON values only")


def checked_copy(value: Any, where: str) -> Any:
    """``value`` checked by ``check_json`` and copied, ready to store: what a caller keeps
    changing afterwards changes nothing stored."""
    check_json(value, where)
    return copy_json(value)


def copy_json(value: Any) -> Any:
    """A deep copy of a checked JSON value (cheaper than ``copy.deepcopy``)."""
    kind = type(value)
    if kind is dict:
        return {key: copy_json(element) for key, element in value.items()}
    if kind is list:
        return [copy_json(element) for element in value]
    return value


def dumps(value: Any) -> str:
    """JSON text of a checked value, compact, fast (orjson: the hot path writes several per
    transition); an int beyond 64 bits, which orjson refuses, through the standard library."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_LONG_NUMBER = re.compile(r"[0-9]{20}")
_LONG_NUMBER_BYTES = re.compile(rb"[0-9]{20}")
"""20 digits in a row: maybe an int beyond 64 bits, which orjson reads as a float (wrong)."""


def loads(text: str | bytes) -> Any:
    """A value from its JSON text (orjson); one that may hold an int beyond 64 bits through the
    standard library, which reads it exactly."""
    long_number = _LONG_NUMBER.search(text) if isinstance(text, str) else _LONG_NUMBER_BYTES.search(text)
    if long_number is not None:
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
