"""A worker process that SIGKILLs itself right after a write of the store returned, before
prorch reads its answer (as a worker killed between the server's COMMIT and its reply):
``unread_commit_worker.py URL LEASE_SECONDS WHEN NOTE_FILE``, WHEN one of ``claim`` (after the
first claim that leased something), ``finish`` (after the first commit that stores a step's
finish) or ``end`` (after the first commit that ends a pipeline). Before dying it writes to
NOTE_FILE, as JSON, the pipelines and steps that write stored. With FREEZE set it stops
itself (SIGSTOP) there instead, once, and goes on with the answer when the test continues it
(SIGCONT): a worker frozen between the COMMIT and its reply past its lease."""

import json
import os
import signal
import sys
from typing import Any

import lease_app  # noqa: F401  (registers the pipelines)

from prorch import Orchestrator
from prorch.model.records import PipelineRecord

if __name__ == "__main__":
    url, lease, when, note_file = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
    orchestrator = Orchestrator(url, lease_seconds=lease)
    engine: Any = orchestrator.store.engine

    fired = []

    def die(stored: dict[str, list[str]]) -> None:
        if fired:
            return
        fired.append(True)
        with open(note_file, "w") as sink:
            json.dump(stored, sink)
        os.kill(os.getpid(), signal.SIGSTOP if os.environ.get("FREEZE") else signal.SIGKILL)

    claim, commit = engine.claim, engine.commit

    def claiming(request: Any) -> Any:
        rows = claim(request)
        if when == "claim" and rows:
            die({str(row["uuid"]): [] for row in rows})
        return rows

    def committing(writes: Any) -> Any:
        outcomes = commit(writes)
        stored: dict[str, list[str]] = {}
        for write in writes:
            for change in write.changes:
                record = change.record
                if change.fields.get("status") != "finished":
                    continue
                if when == "finish" and not isinstance(record, PipelineRecord):
                    stored.setdefault(record.pipeline_uuid, []).append(record.name)
                if when == "end" and isinstance(record, PipelineRecord):
                    stored.setdefault(record.uuid, [])
        if stored:
            die(stored)
        return outcomes

    engine.claim, engine.commit = claiming, committing
    orchestrator.run_forever(interval=0.02)
