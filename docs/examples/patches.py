"""Patches: change a hook in place; pipelines created before the deploy keep the old branch.

Each deploy of the code is imported into its own registry here, as it would be in its own
worker process; all of them share one store.

Run: python docs/examples/patches.py
"""

from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import FakeClock, Harness, MemoryBackend, isolated_registry

store, clock = MemoryBackend(), FakeClock()


def before_the_fix():
    @register_step
    class Invoice(OnStartMixin, Step):
        name = "Invoice"

        def on_start(self):
            self.finish({"total": int(10 / 3)})  # truncates: the bug

    @register_pipeline
    class Billing(Pipeline):
        name = "Billing"
        steps = [Invoice]


def with_the_fix():
    @register_step
    class Invoice(OnStartMixin, Step):
        name = "Invoice"

        def on_start(self):
            if self.patched("fix-rounding"):
                self.finish({"total": round(10 / 3, 2)})
            else:  # pipelines created before this deploy
                self.finish({"total": int(10 / 3)})

    @register_pipeline
    class Billing(Pipeline):
        name = "Billing"
        steps = [Invoice]
        patches = ["fix-rounding"]


def old_branch_removed():
    @register_step
    class Invoice(OnStartMixin, Step):
        name = "Invoice"

        def on_start(self):
            self.finish({"total": round(10 / 3, 2)})

    @register_pipeline
    class Billing(Pipeline):
        name = "Billing"
        steps = [Invoice]
        deprecated_patches = ["fix-rounding"]


def deploy(code):
    with isolated_registry() as registry:
        code()
    return Harness(store, registry=registry, clock=clock), registry.pipeline("Billing")


old_worker, OldBilling = deploy(before_the_fix)
before = old_worker.create(OldBilling)  # created before the deploy: no record of the patch

new_worker, NewBilling = deploy(with_the_fix)
after = new_worker.create(NewBilling)  # records "fix-rounding"
new_worker.run_pass()
for label, run in (("before", before), ("after", after)):
    state = new_worker.orchestrator.get(run.uuid)
    print(label, state.pipeline.metadata.get("patches", []), state.steps[0].output)

# a rolling deploy: an old worker still running leaves a patched pipeline to a new one
late = new_worker.create(NewBilling)
old_worker.run_pass()
print("old worker:", old_worker.orchestrator.get(late.uuid).blocked)
clock.advance(60)  # the old worker put it off by a lease
new_worker.run_pass()
print("new worker:", new_worker.orchestrator.get(late.uuid).steps[0].output)

# later, the old branch goes; a pipeline that predates the patch is never run down the new one
stranded = old_worker.create(OldBilling)
final_worker, _ = deploy(old_branch_removed)
final_worker.run_pass()
print("deprecated:", final_worker.orchestrator.get(stranded.uuid).blocked)
for usage in final_worker.orchestrator.versions():
    (patch,) = usage.patches
    print(
        f"versions: {usage.name} v{usage.version}: {usage.live} live, {usage.ended} ended; "
        f"{patch.id}: {patch.live_with} live with it, {patch.live_without} predating it"
    )
