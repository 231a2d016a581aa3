"""The worker's slots (``prorch.engine.slots``), with hand-made writings on the in-memory store:
a key holds one slot at most, and a writing that raises frees its slot without stopping the others."""

from __future__ import annotations

import pytest

from prorch.engine.slots import Slots
from prorch.engine.state import Writing
from prorch.storage.store import Store
from repositories.memory import MemoryBackend


def slots(concurrency: int) -> Slots[str, str]:
    return Slots(
        Store(MemoryBackend()), concurrency=concurrency, group=1, window=0.0, broken=lambda key, exc: f"broken: {exc}"
    )


def ends(value: str) -> Writing[str]:
    return value
    yield  # pragma: no cover - a generator


def raises() -> Writing[str]:
    raise RuntimeError("an engine bug")
    yield  # pragma: no cover - a generator


def drive(driven: Slots[str, str]) -> dict[str, str]:
    ended: dict[str, str] = {}
    while driven.active:
        ended.update(driven.step(1.0))
    return ended


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_key_that_holds_a_slot_is_refused_a_second_one(concurrency: int) -> None:
    """Regression: a second start of a key overwrote its writing, and the worker died with a
    KeyError when the two ended."""
    driven = slots(concurrency)
    driven.start("a", ends("first"))
    with pytest.raises(ValueError, match="holds a slot already"):
        driven.start("a", ends("second"))
    assert drive(driven) == {"a": "first"}
    driven.start("a", ends("again"))  # free again once its writing ended
    assert drive(driven) == {"a": "again"}


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_writing_that_raises_frees_its_slot_and_the_others_go_on(concurrency: int) -> None:
    driven = slots(concurrency)
    driven.start("bad", raises())
    if concurrency > 1:
        driven.start("good", ends("done"))
    ended = drive(driven)
    assert ended["bad"] == "broken: an engine bug"
    assert driven.free == concurrency
    if concurrency > 1:
        assert ended["good"] == "done"
