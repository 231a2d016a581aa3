"""An extension of your own: an audit log that appends each transition's events to a file, one
JSON line per event, attached with ``Orchestrator(..., extensions=[AuditLog(path)])``.

Run: python docs/examples/audit_log.py
"""

import json
from pathlib import Path

from prorch import Extension, OnStartMixin, Pipeline, Step, register_pipeline, register_step
from prorch.testing import Harness


class AuditLog(Extension):
    """Appends every event a transition stores to ``path`` (JSON lines)."""

    name = "audit-log"

    def __init__(self, path):
        self.path = Path(path)

    def on_transition(self, pipeline_name, events, now):
        with self.path.open("a") as log:
            for event in events:
                line = {"at": now.isoformat(), "pipeline": pipeline_name, "uuid": event.pipeline_uuid,
                        "event": event.type.value, "step": event.data.get("step")}  # fmt: skip
                log.write(json.dumps(line) + "\n")
        return []  # records to store in the same commit: none


@register_step
class Charge(OnStartMixin, Step):
    name = "Charge"

    def on_start(self):
        self.finish({"charged": self.params["amount"]})


@register_step
class Receipt(OnStartMixin, Step):
    name = "Receipt"

    def on_start(self):
        self.finish({"sent": True})


@register_pipeline
class Payment(Pipeline):
    name = "Payment"
    steps = [Charge, Receipt]


if __name__ == "__main__":
    audit = Path("audit.jsonl")
    audit.unlink(missing_ok=True)
    with Harness(extensions=[AuditLog(audit)]) as harness:
        pipeline = harness.create(Payment, {"amount": 12})
        print("status:", harness.run_until_done(pipeline.uuid))
    for line in audit.read_text().splitlines():
        entry = json.loads(line)
        print("audit:", entry["pipeline"], entry["event"], entry["step"] or "-")
