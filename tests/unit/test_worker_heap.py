"""``prorch worker`` freezes what it has loaded before its first pass (``gc.freeze``)."""

from __future__ import annotations

import gc
import weakref

from prorch.cli.running import freeze_loaded


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_the_worker_freezes_what_is_loaded_and_no_garbage_with_it() -> None:
    cycle = _Node()
    gone = weakref.ref(cycle)
    del cycle  # a cycle: only a collection frees it
    try:
        freeze_loaded()
        assert gc.get_freeze_count() > 0
        assert gone() is None, "garbage left before the freeze would never be collected"
    finally:
        gc.unfreeze()
