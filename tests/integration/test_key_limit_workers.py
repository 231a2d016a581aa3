"""Concurrency per key (#30 item 2) with real `prorch worker` processes on one store, checked
from the hooks' own clocks: four workers never run two pipelines of one customer at once while
customers run beside each other (SQLite, PostgreSQL); a SIGKILLed worker's lease keeps counting
for its key until it expires, and only for its key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator
from prorch.model.registry import isolated_registry
from tests.integration.test_limit_workers import most_at_once
from tests.support.processes import PRORCH, child_env, wait_for

APP = """
    import json
    import os
    import time
    from pathlib import Path
    from pydantic import BaseModel
    from prorch import OnStartMixin, Pipeline, Step, register_pipeline, register_step

    class Visit(BaseModel):
        customer: str
        seconds: float = 0.3

    @register_step
    class Call(OnStartMixin, Step):
        name = "Call"

        def on_start(self):
            started = time.time()
            log = Path(os.environ["KEY_LOG"])
            with log.open("a") as out:
                out.write(json.dumps({"customer": self.params.customer, "pid": os.getpid(), "at": started}) + "\\n")
            hang = log.with_name("hang")
            if hang.exists():  # the first run only: the worker is killed in it
                hang.unlink()
                time.sleep(300)
            time.sleep(self.params.seconds)
            self.finish({"start": started, "end": time.time(), "pid": os.getpid()})

    @register_pipeline
    class PerCustomer(Pipeline):
        name = "PerCustomer"
        steps = [Call]
        Params = Visit
        concurrency_key = "customer"
        max_running_per_key = 1

    @register_pipeline
    class FairCall(Pipeline):
        name = "FairCall"
        steps = [Call]
        Params = Visit
        fair = True  # tenants in turn
"""


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "keyed_app.py").write_text(textwrap.dedent(APP))
    yield tmp_path
    sys.modules.pop("keyed_app", None)


def create(
    url: str, app: Path, customers: list[str], name: str = "PerCustomer", seconds: float = 0.3, **options: Any
) -> list[str]:
    sys.path.insert(0, str(app))
    sys.modules.pop("keyed_app", None)  # imported again: registered in this registry
    try:
        with isolated_registry() as registry:
            import keyed_app  # noqa: F401 - registers the app's pipeline here, to create it

            cls = registry.pipeline(name)
            return [
                cls.create(url, {"customer": customer, "seconds": seconds}, **options).uuid for customer in customers
            ]
    finally:
        sys.path.remove(str(app))


def start_worker(
    url: str, app: Path, processes: list[subprocess.Popen[str]], lease: str = "30", *more: str
) -> subprocess.Popen[str]:
    command = [PRORCH, "-r", url, "--app", "keyed_app", "worker", "--interval", "0.05", "--lease-seconds", lease, *more]
    env = child_env(KEY_LOG=str(app / "log"), PRORCH_PREFETCH="0")  # claims only what it starts
    env["PYTHONPATH"] = os.pathsep.join([str(app), env["PYTHONPATH"]])  # the app, and this prorch
    process = subprocess.Popen(command, cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes.append(process)
    return process


def finished(url: str, uuids: list[str]) -> bool:
    store = Orchestrator(url).store
    records = [store.get_pipeline(uuid) for uuid in uuids]
    return all(record is not None and record.status.value == "finished" for record in records)


def starts(app: Path) -> list[dict[str, Any]]:
    log = app / "log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_max_running_per_key_holds_across_four_workers(
    kind: str, app: Path, request: pytest.FixtureRequest, processes: list[subprocess.Popen[str]]
) -> None:
    url = f"sqlite:///{app / 'keys.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    customers = ["a", "b", "c"] * 4
    uuids = create(url, app, customers)
    for _ in range(4):  # one hook at a time each: running two at once takes two workers
        start_worker(url, app, processes, "30", "--concurrency", "1")
    wait_for(lambda: finished(url, uuids), 90, "the 12 pipelines to finish")
    orchestrator = Orchestrator(url)
    outputs = [
        (customer, orchestrator.get(uuid).steps[0].output) for customer, uuid in zip(customers, uuids, strict=True)
    ]
    for customer in "abc":
        assert most_at_once([(o["start"], o["end"]) for c, o in outputs if c == customer]) == 1
    assert most_at_once([(o["start"], o["end"]) for _, o in outputs]) >= 2  # customers side by side, so
    assert len({o["pid"] for _, o in outputs}) >= 2  # in several workers


@pytest.mark.slow
def test_a_killed_worker_s_lease_counts_for_its_key_until_it_expires(
    app: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """The dead worker's pipeline keeps its key full while its lease lives (a live worker
    cannot tell a dead one from a slow one), another key's pipeline runs meanwhile, and once
    the lease has expired the key's pipelines run again."""
    url = f"sqlite:///{app / 'keys.db'}"
    (app / "hang").write_text("")
    [hung, queued] = create(url, app, ["k", "k"])
    doomed = start_worker(url, app, processes, lease="6")
    wait_for(lambda: len(starts(app)) == 1, 30, "the first hook to start")
    # the rescuer is up before the kill (idle: k is full), so that the other key's pipeline can
    # show that it does not wait for the dead lease even where a worker takes seconds to start
    start_worker(url, app, processes, lease="6")
    store = Orchestrator(url).store
    wait_for(lambda: len(store.workers()) == 2, 60, "the rescuing worker to start")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    killed_at = time.time()
    [other] = create(url, app, ["other"])
    wait_for(lambda: finished(url, [other, queued]), 90, "the other key's and the queued pipeline to finish")
    by_customer = {(entry["customer"], i): entry["at"] for i, entry in enumerate(starts(app))}
    other_start = next(at for (customer, _), at in by_customer.items() if customer == "other")
    later_k = [at for (customer, i), at in by_customer.items() if customer == "k" and i > 0]
    assert later_k, starts(app)
    # no pipeline of k started while the dead lease (6 s, renewed every 2 s) could still be
    # live: at least 2 s after the kill; the other key's did not wait for it
    assert min(later_k) > killed_at + 2 and other_start < min(later_k)
    wait_for(lambda: getattr(store.get_pipeline(hung), "lease_owner", "") is None, 60, "the dead one to be resumed")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_fair_worker_starts_the_second_tenant_s_pipeline_among_its_first_hooks(
    kind: str, app: Path, request: pytest.FixtureRequest, processes: list[subprocess.Popen[str]]
) -> None:
    """From the hooks' own clocks: one tenant's 60 due pipelines, another's one created after
    them; a worker of one slot (claims of one) starts the second tenant's hook second (third at
    worst), not 61st."""
    url = f"sqlite:///{app / 'keys.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    backlog = create(url, app, ["big"] * 60, "FairCall", 0, tenant="big")
    [small] = create(url, app, ["small"], "FairCall", 0, tenant="small")
    start_worker(url, app, processes, "30", "--concurrency", "1")
    wait_for(lambda: finished(url, [*backlog, small]), 90, "the 61 pipelines to finish")
    order = [entry["customer"] for entry in sorted(starts(app), key=lambda entry: entry["at"])]
    assert len(order) == 61 and order.index("small") <= 2, order[:5]  # the first, second or third claim
