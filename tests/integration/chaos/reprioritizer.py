"""An operator re-prioritizing pipelines while workers claim them: ``reprioritizer.py URL
LEVELS STOP_FILE UUID...`` sets a random one of the pending UUIDs to a random priority below
LEVELS, as an outside write (read, change, compare-and-set, read again when beaten: as a cancel
request is written), until STOP_FILE exists. Prints "ready" after its first change, and at the
end how many changes it made."""

import os
import random
import sys
from datetime import datetime
from typing import Any

import lease_app  # noqa: F401  (registers the pipelines)

from prorch import Orchestrator
from prorch.model.records import PipelineRecord
from prorch.model.status import Status
from prorch.storage.outside import change_pipeline

if __name__ == "__main__":
    url, levels, stop, uuids = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    orchestrator = Orchestrator(url)
    rng = random.Random(os.getpid())
    stored = 0

    def reprioritize(record: PipelineRecord, now: datetime) -> Any:
        global stored
        if record.status != Status.PENDING:
            return None
        record.priority = rng.randrange(levels)
        stored += 1
        return []

    while not os.path.exists(stop):
        change_pipeline(orchestrator.store, orchestrator.clock, rng.choice(uuids), reprioritize)
        if stored == 1:
            print("ready", flush=True)
    print(stored, flush=True)
