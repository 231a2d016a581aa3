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
from typing import Any

import msgspec
import orjson

from prorch.model.exceptions import UnstorableValueError

MAX_DEPTH = 100
"""Deepest nesting accepted: deeper data is almost always a bug, and some drivers recurse."""

_SCALARS = (str, int, float, bool, type(None))


class ParamsDict(dict[str, Any]):
    """``self.params`` of a pipeline that declares no ``Params`` model: a plain JSON object,
    whose attribute access (``self.params.email``, the form for a declared model) fails with an
    error that names the form that works."""

    pipeline = ""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"pipeline {self.pipeline} declares no Params model, so self.params is a dict: read "
            f"self.params[{name!r}], or declare `class Params(BaseModel)` on the pipeline to write "
            f"self.params.{name}"
        )


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
            if not item.isascii() and not _is_unicode(item):
                raise UnstorableValueError(f"{path}: {LONE_SURROGATE}")
        elif kind is float:
            if not math.isfinite(item):
                raise UnstorableValueError(f"{path}: {item!r} is not a JSON number (NaN and infinity are refused)")
        elif kind in _SCALARS:
            continue
        elif kind is list or kind is dict or kind is ParamsDict:
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
                if not key.isascii() and not _is_unicode(key):
                    raise UnstorableValueError(f"{path}: key {key!r}: {LONE_SURROGATE}")
                stack.append((element, f"{path}[{key!r}]", depth + 1))
        else:
            hint = " (use a list)" if kind in (tuple, set, frozenset) else ""
            raise UnstorableValueError(f"{path}: {kind.__name__} is not a JSON value{hint}; store JSON values only")


LONE_SURROGATE = (
    "a string with a lone surrogate (such as '\\ud800', from a broken \\u escape or a bad decode) "
    "is not valid Unicode and cannot be stored: send the text as valid UTF-8"
)


def _is_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogate), as every store needs it to."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def checked_copy(value: Any, where: str) -> Any:
    """``value`` checked by ``check_json`` and copied, ready to store: what a caller keeps
    changing afterwards changes nothing stored."""
    check_json(value, where)
    return copy_json(value)


def copy_json(value: Any) -> Any:
    """A deep copy of a checked JSON value (cheaper than ``copy.deepcopy``)."""
    kind = type(value)
    if kind is dict or kind is ParamsDict:
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


def loads(text: str | bytes) -> Any:
    """A value from its JSON text, every int exact: msgspec's decoder (orjson, as fast, turns an
    int beyond 64 bits into a float without a word)."""
    try:
        return _decode(text)
    except msgspec.DecodeError:
        return json.loads(text)  # the standard library's message says what is wrong


_decode = msgspec.json.Decoder().decode
