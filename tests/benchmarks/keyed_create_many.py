"""A keyed ``create_many`` of N new keys, by hand, never in the test suite:

    PYTHONPATH=$PWD python tests/benchmarks/keyed_create_many.py --sizes 5000 20000 --output /tmp/keyed.json

For each store (a SQLite file, WAL, ``synchronous=FULL``; a durable PostgreSQL server, fsync on,
started here unless ``--postgres-url`` names one: each measure gets a database of its own) and
each N, on a fresh store: ``Pipeline.create_many`` of N params with N new keys ("keyed"), the
same call again ("repeat": every key stored, every pipeline returned with ``created`` False,
nothing written), and a ``create_many`` of N params without keys ("keyless", the floor: the
same inserts, no look-up). Each is timed (wall) and its SELECTs counted (SQLAlchemy's
``before_cursor_execute`` and, on SQLite, the driver's trace callback: the fast path's reads do
not go through SQLAlchemy). Checked: N pipelines created, none by the repeat, 2N stored.
Prints one line per measure and writes JSON to ``--output`` (never docs/). The code measured
is the one on ``PYTHONPATH``: run it from two checkouts in turn to compare them interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from prorch import OnStartMixin, Orchestrator, Pipeline, Step, register_pipeline, register_step  # noqa: E402
from repositories import from_url  # noqa: E402


@register_step
class KeyedStep(OnStartMixin, Step):
    name = "KeyedStep"

    def on_start(self) -> None:
        self.finish({})


@register_pipeline
class KeyedPipeline(Pipeline):
    name = "KeyedPipeline"
    steps = [KeyedStep]


@contextlib.contextmanager
def counting_selects(backend: Any) -> Iterator[list[str]]:
    """The SELECTs run inside the block, through SQLAlchemy and through SQLite's driver."""
    statements: list[str] = []

    def through_sqlalchemy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    def through_the_driver(dbapi_connection: Any, *args: Any) -> None:
        if hasattr(dbapi_connection, "set_trace_callback"):
            dbapi_connection.set_trace_callback(statements.append)

    event.listen(backend.engine, "before_cursor_execute", through_sqlalchemy)
    event.listen(backend.engine, "checkout", through_the_driver)
    selects: list[str] = []
    try:
        yield selects
    finally:
        event.remove(backend.engine, "checkout", through_the_driver)
        event.remove(backend.engine, "before_cursor_execute", through_sqlalchemy)
        selects.extend(s for s in statements if s.lstrip().upper().startswith("SELECT"))


def timed(backend: Any, call: Callable[[], list[Pipeline]]) -> tuple[float, int, list[Pipeline]]:
    with counting_selects(backend) as selects:
        started = time.perf_counter()
        made = call()
        seconds = time.perf_counter() - started
    return seconds, len(selects), made


def measure(url: str, n: int) -> dict[str, Any]:
    backend = from_url(url)
    KeyedPipeline.create(backend, {"i": -1}, key="warm-up")  # the schema and a connection made
    params = [{"i": i} for i in range(n)]
    keys = [f"order-{i}" for i in range(n)]
    result: dict[str, Any] = {}
    for label, call in (
        ("keyed", lambda: KeyedPipeline.create_many(backend, params, keys=keys)),
        ("repeat", lambda: KeyedPipeline.create_many(backend, params, keys=keys)),
        ("keyless", lambda: KeyedPipeline.create_many(backend, params)),
    ):
        seconds, selects, made = timed(backend, call)
        created = sum(p.created for p in made)
        assert len(made) == n and created == (0 if label == "repeat" else n), (label, created)
        result[label] = {"seconds": round(seconds, 3), "selects": selects}
    total = Orchestrator(backend).query(name="KeyedPipeline", limit=1, count=True).total
    assert total == 2 * n + 1, total
    if hasattr(backend, "dispose"):
        backend.dispose()
    return result


@contextlib.contextmanager
def postgres_database(server_url: str | None) -> Iterator[str]:
    """A fresh database on the given server, or on a durable one started (and removed) here."""
    with contextlib.ExitStack() as stack:
        if server_url is None:
            from tests.support.postgres import remove, start_server

            server = start_server(durable=True)
            stack.callback(remove, server)
            server_url = server.url
        name = f"keyed_{uuid.uuid4().hex[:12]}"
        admin = create_engine(
            server_url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
        try:
            yield server_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as connection:
                connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[5_000, 20_000])
    parser.add_argument("--postgres-url", help="A server to make the databases on (else one is started here).")
    parser.add_argument("--output", required=True, help="JSON results (a file outside docs/).")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for kind in args.backends:
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
                if kind == "sqlite":
                    url = f"sqlite:///{Path(folder) / 'keyed.db'}"
                else:
                    url = stack.enter_context(postgres_database(args.postgres_url))
                row = {"backend": kind, "n": n, **measure(url, n)}
            results.append(row)
            shown = ", ".join(
                f"{k} {row[k]['seconds']:.2f} s ({row[k]['selects']} SELECTs)" for k in ("keyed", "repeat", "keyless")
            )
            print(f"{kind} N={n}: {shown}", flush=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
