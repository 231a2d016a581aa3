"""Messages: a pipeline waits for a human approval without holding a thread; sending the
message wakes it at the next pass.

Run: python docs/examples/messages.py
"""

from prorch import OnContinueMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness


@register_step
class AwaitApproval(OnContinueMixin, Step):
    name = "AwaitApproval"

    def on_continue(self):
        decision = self.receive("approval")  # the oldest unread "approval" message, or None
        if decision is None:
            self.wait(seconds=24 * 3600)  # look again tomorrow, unless a message arrives first
        else:
            self.finish({"approved_by": decision["by"]})


@register_pipeline
class Expense(Pipeline):
    name = "Expense"
    steps = [AwaitApproval]


h = Harness()
run = h.create(Expense)
h.run_pass()
print("before:", h.status(run.uuid), "- due again at", h.orchestrator.get(run.uuid).pipeline.next_run_at)
h.orchestrator.send(run.uuid, "approval", {"by": "alice"})  # or: prorch send UUID approval --payload-json ...
h.run_pass()  # the same minute, not tomorrow
print("after:", h.status(run.uuid), h.orchestrator.get(run.uuid).steps[0].output)
