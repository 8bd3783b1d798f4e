"""Prometheus metrics: an Observer that counts requests, tokens, loads and unloads, plus a collector
that reads the manager's state at scrape time (model states, leases, queue, memory). One registry
per app; `/metrics` renders it with prometheus-client. Labels stay bounded: no raw keys, no ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.manager import ModelManager
from proxy.observe import RequestRecord
from proxy.records import ModelEvent
from proxy.scheduling import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TOKENS_PER_S = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)
UNLOAD_REASONS = ("idle", "keep_alive_0", "swap", "evicted", "requested", "crashed", "reload", "shutdown")
REJECTIONS = {"model_busy": "queue_full", "server_busy": "overloaded", "rate_limited": "rate_limited",
              "client_closed_request": "client_gone"}  # error code -> rejection reason


class Metrics:
    """The proxy's metrics. An Observer (proxy/observe.py); every method is quick and never raises on its own."""

    def __init__(self, manager: ModelManager, in_progress: Callable[[], int],
                 dropped_rows: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = Counter("proxy_requests", "Finished requests.", ["model", "route", "status", "key"],
                                registry=registry)
        Gauge("proxy_requests_in_progress", "Requests in progress now (waiting ones included).",
              registry=registry).set_function(in_progress)
        self.duration = Histogram("proxy_request_duration_seconds", "From arrival to the last byte sent.",
                                  ["model", "route"], buckets=SECONDS, registry=registry)
        self.waited = Histogram("proxy_model_wait_seconds", "Time a request waited for its model (queue, swap, "
                                "load).", ["model", "route"], buckets=SECONDS, registry=registry)
        self.ttft = Histogram("proxy_time_to_first_token_seconds", "Streams: from the model's grant to the "
                              "first byte of the answer.", ["model", "route"], buckets=SECONDS, registry=registry)
        self.tokens = Counter("proxy_tokens", "Tokens the backends reported in their usage.",
                              ["model", "key", "kind"], registry=registry)
        self.speed = Histogram("proxy_generation_tokens_per_second", "Completion tokens per second of generation.",
                               ["model"], buckets=TOKENS_PER_S, registry=registry)
        self.loads = Counter("proxy_model_loads", "Model loads by result (ok, failed, cancelled).",
                             ["model", "result"], registry=registry)
        self.load_time = Histogram("proxy_model_load_seconds", "From the start of a load to ready.", ["model"],
                                   buckets=LOAD_SECONDS, registry=registry)
        self.unloads = Counter("proxy_model_unloads", "Model unloads by reason: " + ", ".join(UNLOAD_REASONS) + ".",
                               ["model", "reason"], registry=registry)
        self.crashes = Counter("proxy_backend_crashes", "Backends that exited while serving.", ["model"],
                               registry=registry)
        self.rejections = Counter("proxy_rejections", "Requests refused or abandoned, by reason: queue_full, "
                                  "rate_limited, overloaded, client_gone.", ["reason"], registry=registry)
        if dropped_rows is not None:
            Gauge("proxy_request_log_dropped_rows", "Request-log rows dropped because its queue was full.",
                  registry=registry).set_function(dropped_rows)
        registry.register(ManagerCollector(manager))
        self._lock = threading.Lock()
        self._loading: dict[str, float] = {}  # guarded by _lock: model -> monotonic start of its load

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ----- the Observer -------------------------------------------------------------------------------

    def model_event(self, event: ModelEvent) -> None:
        """Count loads, load times, unloads and crashes (called under the manager's lock: only counters)."""
        now = time.monotonic()
        if event.state is State.STARTING:
            with self._lock:
                self._loading[event.model] = now
            return
        if event.previous is State.STARTING:
            with self._lock:
                started = self._loading.pop(event.model, None)
            result = {State.READY: "ok", State.FAILED: "failed"}.get(event.state, "cancelled")
            self.loads.labels(event.model, result).inc()
            if result == "ok" and started is not None:
                self.load_time.labels(event.model).observe(now - started)
        if (event.state is State.STOPPING and event.previous is not State.STOPPING) or event.cause == "crashed":
            self.unloads.labels(event.model, event.cause or "requested").inc()
        if event.cause == "crashed":
            self.crashes.labels(event.model).inc()

    def request_done(self, record: RequestRecord) -> None:
        model, route = record.model or "", record.route
        self.requests.labels(model, route, str(record.status), record.key or "").inc()
        self.duration.labels(model, route).observe(record.duration_s)
        if record.waited_s is not None:
            self.waited.labels(model, route).observe(record.waited_s)
        if record.ttft_s is not None:
            self.ttft.labels(model, route).observe(record.ttft_s)
        if record.prompt_tokens:
            self.tokens.labels(model, record.key or "", "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            self.tokens.labels(model, record.key or "", "completion").inc(record.completion_tokens)
        speed = record.tokens_per_s
        if speed is not None:
            self.speed.labels(model).observe(speed)
        reason = REJECTIONS.get(record.error or "")
        if reason is not None:
            self.rejections.labels(reason).inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()


class ManagerCollector(Collector):
    """Reads the manager's snapshot at scrape time: it takes the lock briefly and never loads a model or
    touches an idle timer."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        statuses = self._manager.snapshot()
        state = GaugeMetricFamily("proxy_model_state", "1 for the state each model is in, 0 for the others.",
                                  labels=["model", "state"])
        leases = GaugeMetricFamily("proxy_model_leases", "Requests running on each model.", labels=["model"])
        queued = GaugeMetricFamily("proxy_queue_depth", "Requests waiting for each model.", labels=["model"])
        memory = GaugeMetricFamily("proxy_model_memory_bytes", "Memory each loaded model takes, per device.",
                                   labels=["model", "device"])
        for status in statuses:
            for each in State:
                state.add_metric([status.name, each.value], 1.0 if status.state == each.value else 0.0)
            leases.add_metric([status.name], status.leases)
            queued.add_metric([status.name], status.queued)
            for device, size in status.holds.items():
                memory.add_metric([status.name, device], size)
        budgets = GaugeMetricFamily("proxy_memory_budget_bytes", "The memory budget of each device.",
                                    labels=["device"])
        for device, size in self._manager.budgets().items():
            budgets.add_metric([device], size)
        yield from (state, leases, queued, memory, budgets)
