"""Prometheus metrics of one app: requests, latencies, queue depth and batch sizes.

Each app owns its registry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The app's collectors, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gradindex_requests", "HTTP requests by route, method and status.",
            ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            "gradindex_request_seconds", "HTTP request latency by route.",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge(
            "gradindex_queue_depth", "Requests waiting for a device worker.", ["model"],
            registry=self.registry)
        self.batch_examples = Histogram(
            "gradindex_batch_examples", "Examples per model pass of a device worker.", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram(
            "gradindex_batch_requests", "Requests served by one model pass.", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.search_queries = Histogram(
            "gradindex_search_queries", "Query vectors per ranking of an index (requests "
            "waiting together are ranked at once).", ["index"], buckets=BATCH_BUCKETS,
            registry=self.registry)
        self.pass_seconds = Histogram(
            "gradindex_pass_seconds", "Duration of one model pass (query gradients).", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.abandoned = Counter(
            "gradindex_abandoned_examples",
            "Examples of requests whose client disconnected, left unprocessed.", ["route"],
            registry=self.registry)
        self.rejected = Counter(
            "gradindex_rejected", "Requests turned away with 503 because a queue was full.",
            ["model"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
