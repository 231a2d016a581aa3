"""The worker's HTTP endpoint: ``/metrics`` (the Prometheus text format) and ``/healthz``
(200 while the worker's loop has run within 3 x its interval, 503 otherwise: a hung or wedged
worker fails its liveness probe). A daemon thread; it stops with the process."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prorch.observability.metrics import WorkerMetrics
from prorch.orchestrator import Orchestrator

HEALTHY_INTERVALS = 3


def serve(orchestrator: Orchestrator, port: int, interval: float, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Attach metrics to ``orchestrator`` and serve them with its health on ``host:port``."""
    metrics = WorkerMetrics(orchestrator).attach()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path.split("?")[0] == "/healthz":
                age, limit = time.monotonic() - orchestrator.last_loop, HEALTHY_INTERVALS * interval
                healthy = age <= limit
                body = f"{'ok' if healthy else 'stalled'}: last loop {age:.1f}s ago (limit {limit:g}s)\n"
                self._send(200 if healthy else 503, body.encode(), "text/plain; charset=utf-8")
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
    return server
