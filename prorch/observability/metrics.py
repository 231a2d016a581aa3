"""Prometheus metrics of one worker process (prometheus_client), an extension attached to an
orchestrator: counters from the events each transition writes (``on_transition``), hook
durations (``on_hook_end``), pass durations and start lag (``on_pass_end``), lost leases
(``on_lease_lost``), and gauges read from the store at most every ``GAUGE_SECONDS``. Labels
stay bounded: pipeline and step names and kinds, never a uuid, params or a tenant."""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from importlib.metadata import version
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from prorch.engine.extension import Extension, PassReport
from prorch.model.records import EventRecord, Record
from prorch.model.status import EventType
from prorch.model.substates import DUE, LIMITED, PAUSED
from prorch.orchestrator import Orchestrator
from prorch.storage.repository import PipelineStats

GAUGE_SECONDS = 5.0
"""Store-read gauges are reused this long: a scrape every few seconds costs one indexed count."""
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800)

# Each counter and histogram would also export a ``_created`` series (its creation time), which
# doubles the output and which no dashboard reads (also PROMETHEUS_DISABLE_CREATED_SERIES=True).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class WorkerMetrics(Extension):
    """The metrics of one orchestrator, in their own ``CollectorRegistry`` (``registry``)."""

    def __init__(self, orchestrator: Orchestrator, registry: CollectorRegistry | None = None) -> None:
        self.orchestrator = orchestrator
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.transitions = Counter(
            "prorch_transitions", "Step transitions written, by kind (the event type).",
            ["pipeline", "step", "kind"], registry=r,
        )  # fmt: skip
        self.pipeline_transitions = Counter(
            "prorch_pipeline_transitions", "Pipeline-level transitions written (no step), by kind (the event type).",
            ["pipeline", "kind"], registry=r,
        )  # fmt: skip
        Info("prorch_build", "The prorch and Python versions of this worker.", registry=r).info(
            {"version": version("prorch"), "python": platform.python_version()}
        )
        self.hook_failures = Counter(
            "prorch_hook_failures", "Hook calls that raised or failed.", ["pipeline", "step"], registry=r
        )
        self.retries = Counter(
            "prorch_retries", "Steps retried after a failed attempt.", ["pipeline", "step"], registry=r
        )
        self.timeouts = Counter(
            "prorch_timeouts", "Steps or hook calls that ran out of time.", ["pipeline", "step"], registry=r
        )
        self.quarantines = Counter(
            "prorch_quarantines",
            "Pipelines failed because workers kept dying in their hooks.",
            ["pipeline"],
            registry=r,
        )
        self.refused_writes = Counter(
            "prorch_refused_writes", "Transitions refused because another worker held the pipeline.", registry=r
        )
        self.leases_lost = Counter(
            "prorch_leases_lost",
            "Leases this worker lost: a renewal refused, as the lease had run out (a frozen or starved "
            "worker) and another worker claimed the pipeline.",
            ["pipeline"],
            registry=r,
        )
        self.hook_seconds = Histogram(
            "prorch_hook_duration_seconds", "Time one hook call took.", ["pipeline", "step", "hook"],
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.pass_seconds = Histogram(
            "prorch_pass_duration_seconds", "Time one pass took.", buckets=DURATION_BUCKETS, registry=r
        )
        self.start_lag = Histogram(
            "prorch_start_lag_seconds", "From a pipeline's due time to its claim.", buckets=DURATION_BUCKETS, registry=r
        )
        r.register(StoreGauges(orchestrator))
        r.register(SlotGauges(orchestrator))

    def attach(self) -> WorkerMetrics:
        """Attach the counters to the orchestrator, as one of its extensions."""
        self.orchestrator.add_extension(self)
        return self

    def on_transition(self, pipeline_name: str, events: Sequence[EventRecord], now: datetime) -> Sequence[Record]:
        """Counts the transition's events and stores nothing."""
        for event in events:
            if "step" not in event.data:
                self.pipeline_transitions.labels(pipeline_name, event.type.value).inc()
                continue
            step = str(event.data["step"])
            self.transitions.labels(pipeline_name, step, event.type.value).inc()
            if event.type == EventType.STEP_RETRYING:
                self.retries.labels(pipeline_name, step).inc()
                self.hook_failures.labels(pipeline_name, step).inc()
            elif event.type == EventType.STEP_FAILED:
                self.hook_failures.labels(pipeline_name, step).inc()
                if event.data.get("quarantined"):
                    self.quarantines.labels(pipeline_name).inc()
            if event.data.get("timeout"):
                self.timeouts.labels(pipeline_name, step).inc()
        return ()

    def on_hook_end(self, pipeline_name: str, step_name: str, hook: str, seconds: float) -> None:
        self.hook_seconds.labels(pipeline_name, step_name, hook).observe(seconds)

    def on_lease_lost(self, pipeline_name: str) -> None:
        self.leases_lost.labels(pipeline_name).inc()

    def on_pass_end(self, summary: PassReport, lags: Sequence[float], seconds: float) -> None:
        self.pass_seconds.observe(seconds)
        for lag in lags:
            self.start_lag.observe(max(lag, 0.0))
        refused = sum(1 for error in summary.errors.values() if error.startswith("ConcurrentUpdateError"))
        if refused:
            self.refused_writes.inc(refused)


class StoreGauges(Collector):
    """Pipelines by status and name, due now and the oldest due one's age, read from the store's
    indexes (``Store.pipeline_stats``) at most every ``GAUGE_SECONDS``."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._stats: tuple[PipelineStats, datetime, dict[str, int]] | None = None

    def stats(self) -> tuple[PipelineStats, datetime, dict[str, int]]:
        """The counts, and the held states' (``Orchestrator.held_counts``: empty when nothing holds work)."""
        with self._lock:
            if self._stats is None or time.monotonic() - self._read_at > GAUGE_SECONDS:
                now = self.orchestrator.clock.now()
                stats = self.orchestrator.store.pipeline_stats(now, now - timedelta(minutes=1))
                self._stats = (stats, now, self.orchestrator.held_counts())
                self._read_at = time.monotonic()
            return self._stats

    def collect(self) -> Iterator[Any]:
        stats, now, held = self.stats()
        due = held.get(DUE, stats.due)
        pipelines = GaugeMetricFamily(
            "prorch_pipelines", "Stored pipelines by status and name.", labels=["status", "pipeline"]
        )
        totals: dict[tuple[str, str], int] = {}
        for status, name, _version, count in stats.counts:
            totals[(status, name)] = totals.get((status, name), 0) + count
        for (status, name), count in sorted(totals.items()):
            pipelines.add_metric([status, name], count)
        yield pipelines
        yield GaugeMetricFamily(
            "prorch_pipelines_due", "Pending pipelines whose time has come, not leased, paused or limited.", value=due
        )
        states = GaugeMetricFamily(
            "prorch_pipelines_held", "Pending pipelines a pause or their class's limit holds.", labels=["state"]
        )
        for state in (PAUSED, *LIMITED):
            states.add_metric([state], held.get(state, 0))
        yield states
        yield GaugeMetricFamily(
            "prorch_pipelines_running", "Due pipelines leased by a worker now.", value=stats.running
        )
        renamed = (("prorch_due", "prorch_pipelines_due", due),
                   ("prorch_running", "prorch_pipelines_running", stats.running))  # fmt: skip
        for old, new, value in renamed:
            yield GaugeMetricFamily(old, f"Deprecated: use {new} (this name goes in the next release).", value=value)
        lag = (now - stats.oldest_due).total_seconds() if stats.oldest_due else 0.0
        yield GaugeMetricFamily(
            "prorch_oldest_due_age_seconds", "How long the longest-due pipeline no worker holds has waited.", value=lag
        )


class SlotGauges(Collector):
    """What this worker's slots do now, read from its hook caller at each scrape (no store read)."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    def collect(self) -> Iterator[Any]:
        hooks = self.orchestrator.hooks
        in_flight = hooks.in_flight
        yield GaugeMetricFamily("prorch_hooks_in_flight", "Hook calls running in this worker now.", value=in_flight)
        yield GaugeMetricFamily(
            "prorch_free_slots",
            "Slots of this worker running no hook: concurrency minus hooks in flight.",
            value=max(self.orchestrator.concurrency - in_flight, 0),
        )
        yield GaugeMetricFamily(
            "prorch_hooks_overdue",
            "Hooks still running past their step's timeout: given up on (their step timed out, logged as an "
            "error) but their threads or tasks go on. Not a health failure; too many restart the worker.",
            value=hooks.abandoned,
        )
