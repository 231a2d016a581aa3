"""The worker's slots (``prorch.engine.slots``), with hand-made writings on the in-memory store:
a key holds one slot at most, and a writing that raises frees its slot without stopping the others."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from prorch.engine.slots import SERIAL_SECONDS, Slots
from prorch.engine.state import Writing
from prorch.storage.store import Store, Write
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


class CountedStore(Store):
    """The in-memory store, with the size of each group commit kept (the writes are stand-ins)."""

    def __init__(self) -> None:
        super().__init__(MemoryBackend())
        self.groups: list[int] = []

    def commit_many(self, writes: Sequence[Write]) -> list[Exception | None]:
        self.groups.append(len(writes))
        return [None] * len(writes)


def two_hooks(name: str, seen: list[str]) -> Writing[str]:
    """A writing of two hooks, each followed by its transition (a stand-in write)."""
    for hook in (1, 2):
        seen.append(f"{name}{hook}")
        yield cast(Write, SimpleNamespace(changes=()))
    return name


def test_quick_hooks_free_their_slot_and_their_transitions_share_one_commit() -> None:
    """#27's W1 through the worker: a slot held its pipeline through its commits, so a commit
    held one transition per slot. One slot (hooks in the calling thread), quick hooks: four
    pipelines' first hooks run, their transitions are stored together, and only then does any
    second hook run."""
    store, seen = CountedStore(), []
    driven: Slots[str, str] = Slots(
        store, concurrency=1, group=4, window=1.0, broken=lambda key, exc: "broken", slowest=lambda: 0.0
    )
    assert driven.free == 4  # a group of 4: each transition waits between two hooks for the others
    for name in "abcd":
        driven.start(name, two_hooks(name, seen))
    assert driven.step(0.0) == [] and store.groups == [4]
    assert seen == ["a1", "b1", "c1", "d1"]
    assert dict(drive(driven)) == {name: name for name in "abcd"}
    assert store.groups == [4, 4] and seen[4:] == ["a2", "b2", "c2", "d2"]


def test_with_slow_hooks_no_more_pipelines_are_in_progress_than_slots() -> None:
    store, seen = CountedStore(), []
    driven: Slots[str, str] = Slots(store, concurrency=1, group=4, window=1.0, broken=lambda key, exc: "broken")
    assert driven.free == 1  # no hook seen yet: as slow
    driven.start("a", two_hooks("a", seen))
    assert driven.free == 0
    assert dict(drive(driven)) == {"a": "a"}
    assert store.groups == [1, 1]


def sleeps(name: str, seconds: float, stored: list[list[str]]) -> Writing[str]:
    """A writing whose one hook sleeps ``seconds`` (in its slot's thread) before its transition."""
    time.sleep(seconds)
    yield cast(Write, SimpleNamespace(changes=(), key=name))
    return name


class NamedStore(CountedStore):
    """A ``CountedStore`` that keeps which writings' transitions each group commit held."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[list[str]] = []

    def commit_many(self, writes: Sequence[Write]) -> list[Exception | None]:
        self.stored.append([cast(SimpleNamespace, write).key for write in writes])
        return super().commit_many(writes)


def test_with_slow_hooks_a_transition_waits_for_its_group_at_most_the_window() -> None:
    """#27's W4: a returned hook's transition waited until every running hook was back whenever
    they returned less than ``group_window`` apart, so 32 slots of 50 ms hooks ran in waves
    (on average half of them busy). Four slots: ``a`` returns at once, the others 0.15 s apart;
    ``a`` is stored once it waited the window (0.2 s), not after the last hook (0.45 s)."""
    store = NamedStore()
    driven: Slots[str, str] = Slots(
        store, concurrency=4, group=10, window=0.2, broken=lambda key, exc: f"broken: {exc}"
    )
    for name, seconds in (("a", 0.0), ("b", 0.15), ("c", 0.3), ("d", 0.45)):
        driven.start(name, sleeps(name, seconds, store.stored))
    try:
        assert sorted(drive(driven)) == ["a", "b", "c", "d"]
    finally:
        driven.close()
    assert "d" not in store.stored[0], store.stored
    assert store.stored[0][0] == "a"


def one_hook(name: str, hook: Callable[[], None], threads: dict[str, int]) -> Writing[str]:
    """A writing of one hook (``hook``, run in the slot's thread) and its transition."""
    threads[name] = threading.get_ident()
    hook()
    yield cast(Write, SimpleNamespace(changes=(), key=name))
    return name


def test_a_slow_hook_in_a_run_gives_the_rest_of_the_run_back_to_the_other_slots() -> None:
    """While hooks are quick a thread takes a run of ready writings (one hand-off for them all);
    a hook of the run that turns out slow must not hold the writings after it in its run. Two
    slots, six writings: runs of three, ``slow`` second in the first. ``slow`` waits (up to
    10 s) for ``c``, third in its run, to start: ``c`` must be taken back and run in the other
    slot while ``slow`` still runs."""
    store, threads = NamedStore(), {}
    c_started = threading.Event()
    waited: list[bool] = []
    driven: Slots[str, str] = Slots(
        store, concurrency=2, group=10, window=0.05, broken=lambda key, exc: f"broken: {exc}", slowest=lambda: 0.0
    )

    def slow() -> None:
        waited.append(c_started.wait(10))

    hooks = {"a": lambda: None, "slow": slow, "c": c_started.set, "d": lambda: None, "e": lambda: None}
    hooks["f"] = lambda: None
    for name, hook in hooks.items():
        driven.start(name, one_hook(name, hook, threads))
    try:
        assert sorted(drive(driven)) == sorted(hooks)
    finally:
        driven.close()
    assert threads["a"] == threads["slow"]  # one run: one thread took both
    assert waited == [True]  # ``c`` started while ``slow`` ran
    assert threads["c"] != threads["slow"]


def test_a_worker_that_stops_on_an_error_starts_no_more_hooks_of_its_runs() -> None:
    """Regression (review of the runs): ``close`` (the worker's loop failed) waits for the
    running hooks only; a run's writings not started yet must not start then (their
    transitions would not be stored: each hook would run again after its lease ran out)."""
    store, threads = NamedStore(), {}
    gate, ran = threading.Event(), []
    driven: Slots[str, str] = Slots(
        store, concurrency=2, group=10, window=5.0, broken=lambda key, exc: f"broken: {exc}", slowest=lambda: 0.0
    )
    hooks = {"a": lambda: gate.wait(10), "b": lambda: ran.append("b"), "c": lambda: ran.append("c")}
    hooks |= {"d": lambda: None, "e": lambda: None, "f": lambda: None}
    for name, hook in hooks.items():
        driven.start(name, one_hook(name, hook, threads))
    driven.step(0.0)  # two runs of three: a (held at the gate), b, c in one
    closing = threading.Thread(target=driven.close)
    closing.start()
    time.sleep(0.2)  # close waits for ``a``
    gate.set()
    closing.join(10)
    assert not closing.is_alive()
    assert "a" in threads and ran == []


def test_a_wait_in_step_ends_when_a_watched_future_ends() -> None:
    """The worker's claim in its own thread (``wake_on``): its end wakes the slots' wait for a
    slow hook, so the worker takes what it claimed without waiting for that hook."""
    driven = slots(2)
    release = threading.Event()

    def slow() -> Writing[str]:
        release.wait(10)
        return "slow"
        yield  # pragma: no cover - a generator

    driven.start("slow", slow())
    claim: Future[int] = Future()
    driven.wake_on(claim)
    threading.Timer(0.05, claim.set_result, (1,)).start()
    started = time.monotonic()
    assert driven.step(5.0) == []  # woken by the claim, not by the hook
    assert time.monotonic() - started < 4 and claim.done()
    release.set()
    assert drive(driven) == {"slow": "slow"}


class OverlappingStore(NamedStore):
    """A ``NamedStore`` whose group commits each wait (up to ``wait`` seconds) until another is
    in flight too, as a server's fsyncs would overlap; ``most``: the most seen in flight at once."""

    def __init__(self, commits_at_once: int, wait: float) -> None:
        super().__init__()
        self.commits_at_once, self.wait = commits_at_once, wait
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.two = threading.Event()

    def commit_many(self, writes: Sequence[Write]) -> list[Exception | None]:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            if self.in_flight >= 2:
                self.two.set()
        self.two.wait(self.wait)
        try:
            return super().commit_many(writes)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.mark.parametrize("commits_at_once", [1, 2])
def test_with_slow_hooks_a_store_that_overlaps_commits_gets_two_groups_at_once(commits_at_once: int) -> None:
    """#27's W4 on PostgreSQL: one commit thread stored one group at a time, so each returned
    hook's transition waited for the group in flight's fsync (about 60% of the run the commit
    thread was busy). A store with ``commits_at_once`` 2 gets a second group while the first
    is in flight; one with 1 never does. Slow hooks: ``a`` returns at once, ``b`` 0.05 s later,
    while ``a``'s group waits in its commit (up to 1 s)."""
    store = OverlappingStore(commits_at_once, wait=1.0)
    driven: Slots[str, str] = Slots(store, concurrency=4, group=10, window=0.05, broken=lambda key, exc: f"{exc}")
    driven.start("a", sleeps("a", 0.0, store.stored))
    driven.start("b", sleeps("b", 0.05, store.stored))
    try:
        assert sorted(drive(driven)) == ["a", "b"]
    finally:
        driven.close()
    assert sorted(store.stored) == [["a"], ["b"]]
    assert store.most == commits_at_once


def test_with_quick_hooks_one_group_is_in_flight_at_a_time() -> None:
    """Quick hooks keep one group in flight (the next fills meanwhile: fewer, larger commits,
    W1's rate), whatever the store allows."""
    store = OverlappingStore(2, wait=0.1)
    driven: Slots[str, str] = Slots(
        store, concurrency=4, group=10, window=0.05, broken=lambda key, exc: f"{exc}", slowest=lambda: 0.0
    )
    for name in "abcdef":
        driven.start(name, sleeps(name, 0.0, store.stored))
    try:
        assert sorted(drive(driven)) == list("abcdef")
    finally:
        driven.close()
    assert store.most == 1


def test_only_postgresql_overlaps_group_commits() -> None:
    """``commits_at_once``: PostgreSQL's server flushes concurrent commits together; SQLite,
    TinyDB and memory writers take one lock."""
    from repositories.postgresql import PostgreSQLBackend
    from repositories.sqlite import SQLiteBackend
    from repositories.tinydb import TinyDBBackend

    assert PostgreSQLBackend.commits_at_once == 2
    assert SQLiteBackend.commits_at_once == TinyDBBackend.commits_at_once == 1
    assert Store(MemoryBackend()).commits_at_once == 1
    assert Slots(CountedStore(), concurrency=4, group=10, window=0.0, broken=lambda key, exc: "").commits == 1
    # no commit threads at all without hook threads
    assert Slots(OverlappingStore(2, 0.0), concurrency=1, group=10, window=0.0, broken=lambda key, exc: "").commits == 1


class HeldStore(NamedStore):
    """A ``NamedStore`` whose group commits wait until ``release`` is set (a slow fsync)."""

    def __init__(self) -> None:
        super().__init__()
        self.committing, self.release = threading.Event(), threading.Event()

    def commit_many(self, writes: Sequence[Write]) -> list[Exception | None]:
        self.committing.set()
        self.release.wait(10)
        return super().commit_many(writes)


def test_with_slow_hooks_a_spare_pipeline_runs_in_a_slot_whose_transition_is_being_stored() -> None:
    """#27's W4 on PostgreSQL: a slot whose hook had returned stayed empty until that hook's
    transition was stored (a group commit's round trip and fsync, 10-15 ms of every 60), since
    with slow hooks no more pipelines were in progress than slots. With ``spare`` (a worker's
    prefetch), a claimed pipeline starts in that slot meanwhile; the bound on pipelines in
    progress is ``concurrency + spare``."""
    store, threads = HeldStore(), {}
    hold = threading.Event()
    driven: Slots[str, str] = Slots(
        store, concurrency=2, group=10, window=0.001, broken=lambda key, exc: f"{exc}", spare=1
    )
    driven.start("quick", one_hook("quick", lambda: None, threads))
    driven.start("long", one_hook("long", lambda: hold.wait(10) and None, threads))
    try:
        deadline = time.monotonic() + 5
        while not store.committing.is_set() and time.monotonic() < deadline:
            driven.step(0.01)
        assert store.committing.is_set()  # ``quick``'s transition is in its commit, ``long`` runs
        assert driven.free == driven.room == 1
        driven.start("spare", one_hook("spare", lambda: None, threads))
        deadline = time.monotonic() + 5
        while "spare" not in threads and time.monotonic() < deadline:
            driven.step(0.01)
        assert "spare" in threads and not store.stored  # it ran while the commit still waited
        assert driven.free == driven.room == 0  # three in progress: concurrency 2 + spare 1
    finally:
        store.release.set()
        hold.set()
        ended = drive(driven)
        driven.close()
    assert sorted(ended) == ["long", "quick", "spare"]


@pytest.mark.parametrize("slowest", [0.0, 0.01])
def test_instant_hooks_run_in_one_thread_and_quick_ones_spread(slowest: float) -> None:
    """W1 through the worker (instant hooks, concurrency 4): the ready writings were split into
    one run per free thread, and four threads contending for the GIL cost the worker twice the
    pass's CPU a transition. Hooks under ``SERIAL_SECONDS`` run in one run; hooks that take
    longer (I/O: a thread waiting is a thread freed) still spread over the free threads."""
    store, threads = NamedStore(), {}
    driven: Slots[str, str] = Slots(
        store, concurrency=4, group=10, window=1.0, broken=lambda key, exc: f"{exc}", slowest=lambda: slowest
    )
    for name in "abcdef":
        driven.start(name, one_hook(name, lambda: time.sleep(slowest), threads))
    try:
        assert sorted(drive(driven)) == list("abcdef")
    finally:
        driven.close()
    if slowest < SERIAL_SECONDS:
        assert len(set(threads.values())) == 1, threads
    else:  # its share of the ready ones per free thread (2, 2, 1, 1), each in a thread of its own
        assert len(set(threads.values())) >= 3 and threads["a"] == threads["b"], threads


@pytest.mark.parametrize(("concurrency", "given", "prefetch"), [(32, None, 8), (4, None, 2), (1, None, 2), (32, 0, 0)])
def test_the_default_prefetch_is_a_quarter_of_the_slots_at_least_two(
    tmp_path: Path, concurrency: int, given: int | None, prefetch: int
) -> None:
    """With many slots, two spares left the slots idle through the commits' round trips (W4 on
    PostgreSQL: 0.75 of the ideal rate, 0.80-0.86 with 8); a prefetch given is kept as given."""
    from prorch import Orchestrator

    worker = Orchestrator(f"sqlite:///{tmp_path}/prefetch.db", concurrency=concurrency, prefetch=given)
    assert worker.prefetch == prefetch
