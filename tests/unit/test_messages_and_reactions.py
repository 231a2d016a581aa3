"""Messages (send/receive) and reactions, on the in-memory backend with a fake clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from prorch import (
    EventRecord,
    InvalidMessageError,
    InvalidStateError,
    NotRegisteredError,
    OnContinueMixin,
    OnStartMixin,
    Pipeline,
    ReactionContext,
    RegistrationError,
    Status,
    Step,
    on_event,
    register_pipeline,
    register_step,
)
from prorch.features.reactions import reactions_of
from prorch.model.records import MessageRecord, new_uuid
from prorch.model.registry import Registry
from prorch.pipeline import pipeline_class
from prorch.testing import Harness
from tests.support.builders import pipeline_of, step_of

SEEN: list[Any] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    SEEN.clear()


def approval_pipeline() -> type[Pipeline]:
    class AwaitApproval(OnContinueMixin, Step):
        name = "AwaitApproval"

        def on_continue(self) -> None:
            decision = self.receive("approval")
            SEEN.append(decision)
            if decision is None:
                self.wait(seconds=24 * 3600)
            else:
                self.finish({"approved_by": decision["by"]})

    register_step(AwaitApproval)
    return register_pipeline(type("Expense", (Pipeline,), {"name": "Expense", "steps": [AwaitApproval]}))


def test_a_message_wakes_a_waiting_pipeline_and_is_consumed_once(harness: Harness, registry: Registry) -> None:
    run = harness.create(approval_pipeline())
    harness.run_pass()
    assert SEEN == [None] and harness.run_pass().claimed == 0  # waiting a day
    harness.orchestrator.send(run.uuid, "approval", {"by": "alice"})
    harness.orchestrator.send(run.uuid, "unrelated", 1)
    summary = harness.run_pass()  # woken at once, not in a day
    assert summary.finished == 1
    assert SEEN == [None, {"by": "alice"}]
    assert harness.orchestrator.get(run.uuid).steps[0].output == {"approved_by": "alice"}
    messages = harness.orchestrator.store.messages_of(run.uuid)
    assert [(m.name, m.consumed_at is not None) for m in messages] == [("approval", True), ("unrelated", False)]
    assert harness.event_types(run.uuid).count("message.received") == 1


def test_receive_takes_the_oldest_and_a_failed_hook_leaves_the_message(harness: Harness, registry: Registry) -> None:
    class Picky(OnContinueMixin, Step):
        name = "Picky"
        max_attempts = 2

        def on_continue(self) -> None:
            got = self.receive("n")
            SEEN.append(got)
            if got == 1 and SEEN.count(1) == 1:
                raise RuntimeError("crash after receive: the message must stay unread")
            if got == 2:
                self.finish()
            else:
                self.wait(seconds=10)

    register_step(Picky)
    run = harness.create(register_pipeline(type("Q", (Pipeline,), {"name": "Q", "steps": [Picky]})))
    for n in (1, 2):
        harness.orchestrator.send(run.uuid, "n", n)
    assert harness.run_until_done(run.uuid) == "finished"
    assert SEEN == [1, 1, 2]  # oldest first; 1 again after the failed attempt


def test_send_rejects_bad_input_and_ended_pipelines(harness: Harness, registry: Registry) -> None:
    run = harness.create(approval_pipeline())
    with pytest.raises(InvalidMessageError, match=r"payload\['when'\]: object is not a JSON value"):
        harness.orchestrator.send(run.uuid, "approval", {"when": object()})
    with pytest.raises(InvalidMessageError, match="non-empty name"):
        harness.orchestrator.send(run.uuid, "")
    assert harness.orchestrator.store.messages_of(run.uuid) == []
    harness.orchestrator.cancel(run.uuid)
    with pytest.raises(InvalidStateError, match="would never be read"):
        harness.orchestrator.send(run.uuid, "approval", {"by": "bob"})


def test_send_refuses_a_name_no_store_could_hold(harness: Harness, registry: Registry) -> None:
    """A message's name goes in a 200-character text column: on PostgreSQL a longer one, or one
    with a NUL, was the database's refusal ("value too long for type character varying(200)"),
    while SQLite, TinyDB and the memory store kept it. One clear error now, on every store."""
    run = harness.create(approval_pipeline())
    with pytest.raises(InvalidMessageError, match="at most 200 characters, got 201"):
        harness.orchestrator.send(run.uuid, "n" * 201)
    with pytest.raises(InvalidMessageError, match="NUL"):
        harness.orchestrator.send(run.uuid, "approval\x00")
    assert harness.orchestrator.store.messages_of(run.uuid) == []
    harness.orchestrator.send(run.uuid, "n" * 200)
    assert len(harness.orchestrator.store.messages_of(run.uuid)) == 1


def test_a_message_without_a_payload_is_told_apart_from_no_message(harness: Harness, registry: Registry) -> None:
    """Issue #25: a message sent without a payload stored None, which ``receive()`` returned
    as if no message waited; it was consumed, and the step waited another day."""

    class AwaitSignal(OnContinueMixin, Step):
        name = "AwaitSignal"

        def on_continue(self) -> None:
            signal = self.receive("go")
            SEEN.append(signal)
            self.wait(seconds=86400) if signal is None else self.finish()

    register_step(AwaitSignal)
    signal = register_pipeline(type("Signal", (Pipeline,), {"name": "Signal", "steps": [AwaitSignal]}))
    first, second = harness.create(signal), harness.create(signal)
    harness.run_pass()
    with pytest.raises(InvalidMessageError, match=r"payload None.*leave the payload out"):
        harness.orchestrator.send(first.uuid, "go", None)
    assert harness.orchestrator.store.messages_of(first.uuid) == []  # nothing stored
    harness.orchestrator.send(first.uuid, "go")
    old = MessageRecord(uuid=new_uuid(), pipeline_uuid=second.uuid, name="go", payload=None,
                        sent_at=harness.orchestrator.clock.now())  # fmt: skip
    harness.orchestrator.store.insert_all([old])  # stored with None by an earlier prorch
    harness.orchestrator.send(second.uuid, "wake", {})
    assert harness.run_pass().finished == 2
    assert SEEN == [None, None, True, True]
    assert [m.payload for m in harness.orchestrator.store.messages_of(first.uuid)] == [True]


def test_a_message_sent_while_a_worker_holds_the_pipeline_is_merged(registry: Registry) -> None:
    harness = Harness(registry=registry)

    class SendsToItself(OnContinueMixin, Step):
        name = "SendsToItself"

        def on_continue(self) -> None:
            got = self.receive("ping")
            SEEN.append(got)
            if got is None:
                if len(SEEN) == 1:  # someone sends while this hook runs
                    harness.orchestrator.send(self.pipeline_uuid, "ping", "pong")
                self.wait(seconds=3600)
            else:
                self.finish()

    register_step(SendsToItself)
    run = harness.create(register_pipeline(type("S", (Pipeline,), {"name": "S", "steps": [SendsToItself]})))
    summary = harness.run_pass()
    assert summary.errors == {}  # the holder's write was not lost: the wake-up was merged
    assert harness.orchestrator.get(run.uuid).pipeline.next_run_at == harness.clock.now()
    harness.run_pass()
    assert SEEN == [None, "pong"] and harness.status(run.uuid) == "finished"


# --- reactions ----------------------------------------------------------------------------------


def shipping(registry: Registry) -> tuple[type[Pipeline], type[Pipeline]]:
    class Pack(OnStartMixin, Step):
        name = "Pack"

        def on_start(self) -> None:
            self.finish({"box": self.params["order"]})

    class Email(OnStartMixin, Step):
        name = "Email"

        def on_start(self) -> None:
            SEEN.append(("email", self.params["order"]))

    register_step(Pack)
    register_step(Email)
    order = register_pipeline(type("Order", (Pipeline,), {"name": "Order", "steps": [Pack]}))
    notify = register_pipeline(type("Notify", (Pipeline,), {"name": "Notify", "steps": [Email]}))
    return order, notify


def test_a_reaction_starts_a_pipeline_once_per_event(harness: Harness, registry: Registry) -> None:
    order, notify = shipping(registry)

    @on_event("pipeline.finished", pipeline="Order")
    def email_customer(event: EventRecord, ctx: ReactionContext) -> None:
        SEEN.append(("reaction", event.pipeline_uuid[:8]))
        ctx.start(notify, {"order": event.pipeline_uuid})

    @on_event("step.finished", step="Pack")
    def count_boxes(event: EventRecord, ctx: ReactionContext) -> None:
        SEEN.append(("box", ctx.pipeline))

    runs = [harness.create(order, {"order": n}) for n in range(3)]
    for _ in range(5):
        harness.run_pass()
    notifications = harness.orchestrator.list_pipelines(name="Notify")
    assert len(notifications) == 3 and all(p.status == Status.FINISHED for p in notifications)
    assert sorted(p.params["order"] for p in notifications) == sorted(r.uuid for r in runs)
    assert SEEN.count(("box", "Order")) == 3
    assert len([s for s in SEEN if s[0] == "reaction"]) == 3
    tasks = harness.orchestrator.list_pipelines(name="prorch.Reaction")
    assert len(tasks) == 6 and all(t.status == Status.FINISHED for t in tasks)


def test_a_reaction_run_again_starts_nothing_twice(harness: Harness, registry: Registry) -> None:
    order, notify = shipping(registry)
    attempts: list[int] = []

    @on_event("pipeline.finished", pipeline="Order")
    def flaky(event: EventRecord, ctx: ReactionContext) -> None:
        ctx.start(notify, {"order": "o"})
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("crashed after starting the pipeline")

    harness.create(order, {"order": "o"})
    harness.run_pass()
    (task,) = harness.orchestrator.list_pipelines(name="prorch.Reaction")
    assert harness.run_until_done(task.uuid) == "finished"
    assert len(attempts) == 2  # the reaction ran twice (retried after raising)...
    assert len(harness.orchestrator.list_pipelines(name="Notify")) == 1  # ...and started it once


def test_reactions_are_validated_at_registration(registry: Registry) -> None:
    with pytest.raises(RegistrationError, match=r"unknown event type 'pipeline\.done'"):
        on_event("pipeline.done")
    with pytest.raises(RegistrationError, match=r"must take \(event, ctx\)"):

        @on_event("pipeline.finished")
        def one_argument(event: EventRecord) -> None:
            pass


def test_a_reaction_task_waits_on_a_worker_that_lacks_the_reaction(registry: Registry) -> None:
    """The orchestrator installs the reaction feature on its registry, so a worker whose code
    has no reactions still knows prorch.Reaction: the task waits for a worker that has the
    reaction, rather than being blocked as unknown code or failed."""
    order, _ = shipping(registry)
    on_event("pipeline.finished", pipeline="Order", name="later.email")(lambda event, ctx: None)
    harness = Harness(registry=registry)
    harness.create(order, {"order": "o"})
    harness.run_pass()  # the order finishes; its reaction task is stored
    (task,) = harness.orchestrator.list_pipelines(name="prorch.Reaction")

    elsewhere = Registry()  # a worker deployed without the reaction's module
    summary = Harness(harness.repository, clock=harness.clock, registry=elsewhere).run_pass()
    assert summary.claimed == 1 and summary.blocked == {} and summary.errors == {}
    state = harness.orchestrator.get(task.uuid)
    assert state.pipeline.status == Status.PENDING
    assert state.steps[0].next_run_at == harness.clock.now() + timedelta(seconds=60)


def test_reactions_are_one_extension_of_the_registry_seen_by_an_orchestrator_built_before(
    harness: Harness, registry: Registry
) -> None:
    (book,) = registry.extensions  # installed once, by the orchestrator, before any reaction
    assert "prorch.Reaction" in registry.pipelines and book in harness.orchestrator.extensions
    on_event("pipeline.finished", name="first")(lambda event, ctx: None)
    on_event("pipeline.failed", name="second")(lambda event, ctx: None)
    assert registry.extensions == [book] and Harness(harness.repository, registry=registry).orchestrator.extensions
    assert [r.name for r in reactions_of(registry)] == ["first", "second"]
    flow = pipeline_of(step_of("Quick", lambda self: None), name="Quick")
    harness.run_until_done(harness.create(flow).uuid)
    assert len(harness.orchestrator.list_pipelines(name="prorch.Reaction")) == 1


def test_a_reaction_can_start_another_version_of_a_pipeline(harness: Harness, registry: Registry) -> None:
    order, _ = shipping(registry)

    class Email2(OnStartMixin, Step):
        name = "Email"
        version = 2

        def on_start(self) -> None:
            pass

    register_step(Email2)
    register_pipeline(type("Notify2", (Pipeline,), {"name": "Notify", "version": 2, "steps": [Email2]}))

    @on_event("pipeline.finished", pipeline="Order")
    def notify_old_version(event: EventRecord, ctx: ReactionContext) -> None:
        ctx.start("Notify", {"order": "o"}, version=1)

    harness.create(order, {"order": "o"})
    for _ in range(3):
        harness.run_pass()
    (notification,) = harness.orchestrator.list_pipelines(name="Notify")
    assert notification.version == 1


def test_prorchs_own_pipelines_cannot_be_started_by_name(harness: Harness, registry: Registry) -> None:
    with pytest.raises(NotRegisteredError, match="prorch's own and cannot be started by hand"):
        pipeline_class(registry, "prorch.Reaction")
