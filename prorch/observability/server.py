"""The worker's HTTP endpoint: ``/metrics`` (the Prometheus text format) and ``/healthz``
(200 while the worker's loop is alive and its heartbeat stored its row within 3 beats, 503
otherwise: a dead loop, or a worker whose database is away, fails its probe; so does a worker
still waiting for its database to open). A hook that runs long, even past its timeout, does not
make the worker unhealthy: the metrics report it. A daemon thread; it stops with the process."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from prorch.engine.outage import Outage
from prorch.observability.metrics import WorkerMetrics
from prorch.orchestrator import Orchestrator

HEALTHY_INTERVALS = 3


class Endpoint:
    """What the endpoint reports: nothing but 503 until ``attach`` gives it the orchestrator
    (a worker waiting for its store to open has none yet)."""

    def __init__(self, interval: float, opening: Outage | None = None) -> None:
        self.interval = interval
        self.opening = opening
        self.orchestrator: Orchestrator | None = None
        self.registry = CollectorRegistry()

    def attach(self, orchestrator: Orchestrator) -> None:
        self.registry = WorkerMetrics(orchestrator).attach().registry
        self.orchestrator = orchestrator

    def health(self) -> tuple[bool, str]:
        orchestrator = self.orchestrator
        if orchestrator is None:
            waiting = f": {self.opening.describe()}" if self.opening is not None else ""
            return False, f"starting: opening the store{waiting}"
        if orchestrator.outage.down:
            return False, f"unhealthy: {orchestrator.outage.describe()}"
        if orchestrator.heartbeat is not None:
            return orchestrator.heartbeat.health()
        # run_forever has not started yet: it is about to
        age, limit = time.monotonic() - orchestrator.last_loop, HEALTHY_INTERVALS * self.interval
        healthy = age <= limit
        return healthy, f"{'ok' if healthy else 'stalled'}: last loop {age:.1f}s ago (limit {limit:g}s)"


def serve(
    orchestrator: Orchestrator | None, port: int, interval: float, host: str = "0.0.0.0", opening: Outage | None = None
) -> Endpoint:
    """Serve the metrics and health of ``orchestrator`` (or, if None, of the one given later
    to the returned endpoint's ``attach``; ``opening`` says why it is not there yet) on ``host:port``."""
    endpoint = Endpoint(interval, opening)
    if orchestrator is not None:
        endpoint.attach(orchestrator)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                self._send(200, generate_latest(endpoint.registry), CONTENT_TYPE_LATEST)
            elif self.path.split("?")[0] == "/healthz":
                healthy, text = endpoint.health()
                self._send(200 if healthy else 503, f"{text}\n".encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            return  # scrapes every few seconds would drown the worker's own log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="prorch-metrics", daemon=True).start()
    return endpoint
