"""The server's metrics in Prometheus' text format (prometheus_client, a registry of the server's own)."""
from __future__ import annotations

import collections
import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric

prometheus_client.disable_created_metrics()  # no *_created series: counters start with the process
QUANTILES = (0.5, 0.9, 0.99)
WINDOW = 2048  # latency percentiles are over the last WINDOW requests


class _LatencySummary:
    """A summary with quantiles: Prometheus histograms give buckets, percentiles need the samples (a window)."""

    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc
        self._window: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._count, self._sum = 0, 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._window.append(seconds)
            self._count += 1
            self._sum += seconds

    def quantiles(self) -> dict[float, float]:
        with self._lock:
            values = sorted(self._window)
        if not values:
            return {}
        return {q: values[min(len(values) - 1, int(q * len(values)))] for q in QUANTILES}

    def collect(self):
        metric = Metric(self.name, self.doc, "summary")
        for q, v in self.quantiles().items():
            metric.add_sample(self.name, {"quantile": str(q)}, v)
        with self._lock:
            metric.add_sample(self.name + "_count", {}, self._count)
            metric.add_sample(self.name + "_sum", {}, self._sum)
        yield metric


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vistune_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.images = Counter("vistune_images", "images predicted, by task", ["task"], registry=r)
        self.rejected = Counter("vistune_rejected_images", "images refused because the queue was full",
                                registry=r)
        self.batches = Histogram("vistune_batch_size", "images per model pass (mixed over tasks)",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_depth = Gauge("vistune_queue_depth", "images admitted and not yet answered", registry=r)
        self.tasks = Gauge("vistune_tasks_loaded", "tasks loaded on the backbone", registry=r)
        self.latency = _LatencySummary("vistune_request_latency_seconds",
                                       f"prediction request latency (quantiles over the last {WINDOW} requests)")
        self.batch_seconds = _LatencySummary("vistune_batch_seconds",
                                             f"model pass time per batch (quantiles over the last {WINDOW})")
        r.register(self.latency)
        r.register(self.batch_seconds)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
