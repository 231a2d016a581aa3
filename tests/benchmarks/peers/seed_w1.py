"""W1 on the original prorch 1.0.1 with the TinyDB repository of its README, in its own venv.

python seed_w1.py N     (run in an empty folder: the README's repository writes database.json)
"""

import json
import resource
import sys
import time

from prorch.dataclasses.orchestrator import OrchestratorConfig, SavedItem
from prorch.decorators.decorators import register_pipeline, register_step
from prorch.interfaces.repository import IRepository
from prorch.mixins.on_continue import OnContinueMixin
from prorch.mixins.on_start import OnStartMixin
from prorch.orchestrator.orchestrator import Orchestrator  # the README's path fails on 1.0.1 itself
from prorch.pipeline.pipeline import Pipeline
from prorch.step.step import Step
from prorch.utils.constants import Metadata
from tinydb import TinyDB, where


class TinyDBRepository(IRepository):  # the README's, verbatim
    def __init__(self, model: str):
        super().__init__(model)
        self._db = TinyDB("database.json")
        self._table = self._db.table(Metadata.TABLE_NAMES[model])

    def get(self, uuid: str) -> dict:
        return self._table.get(where("uuid") == uuid)

    def save(self, data: dict) -> SavedItem:
        id = self._table.insert(data)
        return SavedItem(identifier=id)

    def update(self, uuid: str, data: dict) -> None:
        self._table.update(data, where("uuid") == uuid)

    def search(self, filter: list[str | list]) -> list[dict]:
        field, value = filter
        return self._table.search(where(field) == value)


def quick(index):
    def on_start(self):
        pass

    def on_continue(self):
        self.finish()

    attrs = {"name": f"Quick{index}", "on_start": on_start, "on_continue": on_continue}
    return register_step(type(f"Quick{index}", (OnStartMixin, OnContinueMixin, Step), attrs))


Three = register_pipeline(type("Three", (Pipeline,), {"name": "Three", "steps": [quick(i) for i in range(3)]}))

n = int(sys.argv[1])
started = time.perf_counter()
for _ in range(n):
    Three(repository_class=TinyDBRepository).start()  # create, then run the first step
orchestrator = Orchestrator(config=OrchestratorConfig(repository_class=TinyDBRepository))
while TinyDBRepository("PIPELINE").search(["status", "pending"]):
    orchestrator.execute_pipelines()  # one step per pipeline per pass
took = time.perf_counter() - started
print(
    json.dumps(
        {
            "transitions_per_s": 3 * n / took,
            "seconds": took,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
)
