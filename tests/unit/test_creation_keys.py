"""Creation keys (the edges issue, item 3): ``create(key=...)`` stores a pipeline once; a repeat
with equal name and params returns it with ``created`` False; a conflicting repeat is an error
that names both; ``uuid=`` no longer returns another pipeline's record."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import BaseModel

from prorch import (
    InvalidKeyError,
    InvalidParamsError,
    KeyConflictError,
    OnStartMixin,
    Orchestrator,
    Pipeline,
    PipelineNotFoundError,
    Step,
    register_pipeline,
    register_step,
)
from prorch.model.keys import uuid_for_key
from prorch.model.registry import Registry
from repositories.memory import MemoryBackend


@pytest.fixture
def pipelines(registry: Registry) -> tuple[type[Pipeline], type[Pipeline]]:
    @register_step
    class Charge(OnStartMixin, Step):
        name = "Charge"

        def on_start(self) -> None:
            self.finish({"charged": self.params.amount})

    class Amount(BaseModel):
        amount: int
        currency: str = "EUR"

    ship = register_pipeline(type("Ship", (Pipeline,), {"name": "Ship", "steps": [Charge], "Params": Amount}))
    bill = register_pipeline(type("Bill", (Pipeline,), {"name": "Bill", "steps": [Charge], "Params": Amount}))
    return ship, bill


def stored_pipelines(backend: MemoryBackend) -> list[dict[str, Any]]:
    return list(backend.tables["PIPELINE"].values())


def test_a_key_creates_once_and_a_repeat_returns_the_stored_pipeline(pipelines: Any) -> None:
    ship, _ = pipelines
    backend = MemoryBackend()
    first = ship.create(backend, {"amount": 5}, key="order-42")
    again = ship.create(backend, {"amount": 5, "currency": "EUR"}, key="order-42")  # equal once validated
    assert first.created is True and again.created is False
    assert again.uuid == first.uuid == uuid_for_key("order-42")
    assert again.record.key == "order-42"
    assert len(stored_pipelines(backend)) == 1
    state = Orchestrator(backend).get_by_key("order-42")
    assert state.pipeline.uuid == first.uuid and len(state.steps) == 1


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("Ship", {"amount": 6}, r'this create asked for Ship with params \{"amount": 6, "currency": "EUR"\}'),
        ("Bill", {"amount": 5}, r'this create asked for Bill with params \{"amount": 5, "currency": "EUR"\}'),
    ],
)
def test_the_same_key_with_another_name_or_params_is_an_error_naming_both(
    pipelines: Any, name: str, params: dict[str, Any], expected: str
) -> None:
    ship, bill = pipelines
    backend = MemoryBackend()
    first = ship.create(backend, {"amount": 5}, key="order-42")
    other = ship if name == "Ship" else bill
    with pytest.raises(KeyConflictError) as caught:
        other.create(backend, params, key="order-42")
    message = str(caught.value)
    assert message.startswith(
        f'key \'order-42\' already names pipeline Ship {first.uuid} with params {{"amount": 5, "currency": "EUR"}}; '
    )
    assert re.search(expected, message)
    assert len(stored_pipelines(backend)) == 1


def test_create_many_with_keys_creates_the_new_ones_and_returns_the_stored_ones(pipelines: Any) -> None:
    ship, _ = pipelines
    backend = MemoryBackend()
    existing = ship.create(backend, {"amount": 1}, key="a")
    made = ship.create_many(backend, [{"amount": 1}, {"amount": 2}, {"amount": 3}], keys=["a", "b", None])
    assert [p.created for p in made] == [False, True, True]
    assert made[0].uuid == existing.uuid and made[1].uuid == uuid_for_key("b")
    assert len(stored_pipelines(backend)) == 3
    again = ship.create_many(backend, [{"amount": 2}, {"amount": 2}], keys=["b", "b"])  # a key twice in one call
    assert [p.created for p in again] == [False, False] and {p.uuid for p in again} == {made[1].uuid}
    fresh = ship.create_many(backend, [{"amount": 7}, {"amount": 7}], keys=["c", "c"])
    assert [p.created for p in fresh] == [True, False] and fresh[0].uuid == fresh[1].uuid
    assert len(stored_pipelines(backend)) == 4


def test_one_conflict_in_create_many_stores_nothing(pipelines: Any) -> None:
    ship, _ = pipelines
    backend = MemoryBackend()
    ship.create(backend, {"amount": 1}, key="a")
    with pytest.raises(KeyConflictError, match="key 'a' already names pipeline Ship"):
        ship.create_many(backend, [{"amount": 9}, {"amount": 2}], keys=["new", "a"])  # "new" is not stored
    with pytest.raises(KeyConflictError, match="key 'x' already names"):
        ship.create_many(backend, [{"amount": 1}, {"amount": 2}], keys=["x", "x"])  # a conflict inside the batch
    assert len(stored_pipelines(backend)) == 1
    with pytest.raises(InvalidKeyError, match="create_many got 2 params and 1 keys"):
        ship.create_many(backend, [{"amount": 1}, {"amount": 2}], keys=["y"])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "1 to 200 characters long, not 0"),
        ("k" * 201, "1 to 200 characters long, not 201"),
        ("a\x00b", "^a creation key must not contain a NUL character$"),
        (42, "must be a string, not int"),
    ],
)
def test_a_bad_key_is_one_clear_error_and_stores_nothing(pipelines: Any, key: Any, message: str) -> None:
    ship, _ = pipelines
    backend = MemoryBackend()
    with pytest.raises(InvalidKeyError, match=message):
        ship.create(backend, {"amount": 1}, key=key)
    assert isinstance(InvalidKeyError(), InvalidParamsError)
    assert stored_pipelines(backend) == []


def test_any_string_up_to_200_characters_is_a_key(pipelines: Any) -> None:
    ship, _ = pipelines
    backend = MemoryBackend()
    for key in ("k" * 200, "ünïcødé / with spaces & 'quotes'", "😀", "x"):
        made = ship.create(backend, {"amount": 1}, key=key)
        assert made.created and made.record.key == key and len(made.uuid) == 36


def test_uuid_no_longer_returns_another_pipelines_record(pipelines: Any) -> None:
    """Regression: create(uuid=u) returned whatever was stored under u, of any name and params."""
    ship, bill = pipelines
    backend = MemoryBackend()
    first = ship.create(backend, {"amount": 5}, uuid="0d7e3c3e-2b1a-4c8e-9f60-1d2c3b4a5968")
    with pytest.raises(KeyConflictError, match=f"uuid {first.uuid} already names pipeline Ship"):
        bill.create(backend, {"amount": 9}, uuid=first.uuid)
    same = ship.create(backend, {"amount": 5}, uuid=first.uuid)
    assert same.created is False and same.uuid == first.uuid


def test_a_uuid_longer_than_the_column_is_refused_before_anything_is_stored(pipelines: Any) -> None:
    """Regression: a uuid over 36 characters failed inside PostgreSQL's insert."""
    ship, _ = pipelines
    backend = MemoryBackend()
    expected = "at most 36 characters, not 40 characters; for an identifier of your own, pass key="
    with pytest.raises(InvalidKeyError, match=expected):
        ship.create(backend, {"amount": 1}, uuid="u" * 40)
    assert stored_pipelines(backend) == []


@pytest.mark.parametrize(
    ("uuid", "shown"), [("", "0 characters"), ("u" * 37, "37 characters"), ("a\x00b", "3 characters"), (7, "int")]
)
def test_an_unusable_uuid_is_refused_before_anything_is_stored(pipelines: Any, uuid: Any, shown: str) -> None:
    """uuid="" was a gap (no test): it must not fall back to a fresh uuid, nor be stored."""
    ship, _ = pipelines
    backend = MemoryBackend()
    with pytest.raises(InvalidKeyError, match=f"at most 36 characters, not {shown};"):
        ship.create(backend, {"amount": 1}, uuid=uuid)
    assert stored_pipelines(backend) == []


def test_a_uuid_of_1_to_36_characters_is_taken_as_given(pipelines: Any) -> None:
    ship, _ = pipelines
    backend = MemoryBackend()
    assert [ship.create(backend, {"amount": 1}, uuid=u).uuid for u in ("x", "y" * 36)] == ["x", "y" * 36]


def test_a_key_s_uuid_is_the_same_for_ever() -> None:
    assert uuid_for_key("order-1") == "16a77e32-f759-5c0c-8ac8-4768890ad578"  # stored keys depend on it: never change
    assert uuid_for_key("order-1") != uuid_for_key("order-2")


def test_get_by_key_of_an_unknown_key(pipelines: Any) -> None:
    with pytest.raises(PipelineNotFoundError, match="no pipeline was created with key 'nope'"):
        Orchestrator(MemoryBackend()).get_by_key("nope")


def test_a_repeat_after_the_pipeline_ran_returns_it_as_it_is_now(pipelines: Any, registry: Registry) -> None:
    ship, _ = pipelines
    backend = MemoryBackend()
    ship.create(backend, {"amount": 5}, key="k")
    Orchestrator(backend, registry=registry).execute_pipelines()
    again = ship.create(backend, {"amount": 5}, key="k")
    assert again.created is False and again.status == "finished"


def test_key_and_uuid_together_are_refused(pipelines: Any) -> None:
    """Found in review: the uuid won silently, so get_by_key(key) could never find the pipeline."""
    ship, _ = pipelines
    backend = MemoryBackend()
    with pytest.raises(InvalidKeyError, match="give key= or uuid=, not both"):
        ship.create(backend, {"amount": 1}, key="k", uuid="0d7e3c3e-2b1a-4c8e-9f60-1d2c3b4a5968")
    assert stored_pipelines(backend) == []
