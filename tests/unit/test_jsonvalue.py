"""What may be stored as a value (prorch/model/jsonvalue.py): the exact bounds of the check."""

from __future__ import annotations

import json
from typing import Any

import pytest

from prorch.model.exceptions import UnstorableValueError
from prorch.model.jsonvalue import MAX_DEPTH, check_json, checked_copy, dumps, loads


def nested(levels: int, kind: str) -> Any:
    """``levels`` containers, one inside the other (lists, dicts, or both in turn)."""
    value: Any = 0
    for level in range(levels):
        as_dict = kind == "dict" or (kind == "mixed" and level % 2)
        value = {"k": value} if as_dict else [value]
    return value


@pytest.mark.parametrize("kind", ["list", "dict", "mixed"])
def test_nesting_up_to_max_depth_is_stored_and_one_more_is_refused(kind: str) -> None:
    check_json(nested(MAX_DEPTH, kind), "params")
    with pytest.raises(UnstorableValueError, match=f"nested deeper than {MAX_DEPTH} levels"):
        check_json(nested(MAX_DEPTH + 1, kind), "params")


def test_depth_is_counted_per_branch_not_per_sibling() -> None:
    check_json([nested(MAX_DEPTH - 1, "list") for _ in range(3)], "params")
    check_json({str(i): nested(MAX_DEPTH - 1, "dict") for i in range(3)}, "params")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a\x00b": 1}, r"^context: key 'a\\x00b' has a NUL character \(\\x00\)$"),
        ({"a": {"b\x00": 1}}, r"^context\['a'\]: key 'b\\x00' has a NUL character"),
        ({1: "x"}, r"^context: key 1 is a int; JSON object keys must be str$"),
        ({"a": [1, "x\x00"]}, r"^context\['a'\]\[1\]: a string with a NUL character"),
        ([float("nan")], r"^context\[0\]: nan is not a JSON number"),
        ([float("nan"), None, 1, True], r"^context\[0\]: nan is not a JSON number"),  # scalars checked go on
        ({"x": float("-inf")}, r"^context\['x'\]: -inf is not a JSON number"),
        ((1, 2), r"^context: tuple is not a JSON value \(use a list\); store JSON values only$"),
        ({"s": {1}}, r"^context\['s'\]: set is not a JSON value \(use a list\)"),
        ([b"x"], r"^context\[0\]: bytes is not a JSON value; store JSON values only$"),
        ({"a": "caf\u00e9 \ud800"}, r"^context\['a'\]: a string with a lone surrogate"),  # every store refuses it
        ({"\udfff": 1}, r"^context: key '\\udfff': a string with a lone surrogate"),
    ],
)
def test_what_is_not_json_is_refused_with_its_path(value: Any, message: str) -> None:
    with pytest.raises(UnstorableValueError, match=message):
        check_json(value, "context")


def test_json_values_are_accepted() -> None:
    check_json({"a": [None, True, 1, 1.5, "x", {}, [], 2**70, "caf\u00e9 \U0001f600"]}, "params")


def test_a_checked_copy_is_not_changed_by_the_caller_afterwards() -> None:
    value = {"a": [1, {"b": 2}]}
    copy = checked_copy(value, "params")
    value["a"][1]["b"] = 3  # type: ignore[index]
    value["a"].append(4)  # type: ignore[attr-defined]
    assert copy == {"a": [1, {"b": 2}]}
    with pytest.raises(UnstorableValueError):
        checked_copy({"a": (1,)}, "params")


def test_dumps_is_compact_and_round_trips_big_ints() -> None:
    assert dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'
    assert dumps({"big": 2**70, "b": [1]}) == '{"big":1180591620717411303424,"b":[1]}'
    assert dumps({"big": 2**70 + 1, "s": "é"}) == '{"big":1180591620717411303425,"s":"é"}'  # the fallback
    assert loads(dumps({"big": 2**70 + 1})) == {"big": 2**70 + 1}  # orjson read it as a float
    assert loads(b'{"big":1180591620717411303425}') == {"big": 2**70 + 1}
    assert loads('{"id":"12345678901234567890","n":1.5}') == {"id": "12345678901234567890", "n": 1.5}
    assert loads(b'{"a":1}') == {"a": 1}


def test_text_that_is_not_json_is_refused_with_the_standard_librarys_message() -> None:
    with pytest.raises(json.JSONDecodeError, match=r"^Expecting property name enclosed in double quotes"):
        loads('{"a": 1, }')
    with pytest.raises(json.JSONDecodeError):
        loads(b"[1, 2")
