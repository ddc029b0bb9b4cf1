"""Prometheus metrics, on a registry owned by one app instance."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

WEBHOOK_RESULTS = (
    "created",
    "duplicate",
    "invalid_signature",
    "validation_error",
    "payload_too_large",
    "unsupported_media_type",
    "storage_unavailable",
    "client_disconnected",
)
SIGNATURE_KEYS = ("current", "previous")
# The label for requests that matched no route: a scanner must not grow the label set.
UNMATCHED_PATH = "unmatched"
LATENCY_BUCKETS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # `_created` timestamps double the exposition for no use here.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "http_requests_total",
            "HTTP requests by route template and status code.",
            ["path", "status"],
            registry=self.registry,
        )
        self.webhook_requests = Counter(
            "webhook_requests_total",
            "POST /webhook outcomes.",
            ["result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "request_latency_ms",
            "Time from request start to the end of the response, in milliseconds.",
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )
        self.signature_keys = Counter(
            "webhook_signature_key_total",
            "Accepted webhook signatures by the key that verified them.",
            ["key"],
            registry=self.registry,
        )
        # Children looked up once: labels() takes a lock and builds a key every call.
        self._results = {r: self.webhook_requests.labels(result=r) for r in WEBHOOK_RESULTS}
        self._keys = [self.signature_keys.labels(key=k) for k in SIGNATURE_KEYS]
        self._requests: dict[tuple[str, int], Any] = {}

    def observe_request(self, path: str, status: int, latency_ms: float) -> None:
        child = self._requests.get((path, status))
        if child is None:
            child = self._requests[(path, status)] = self.http_requests.labels(
                path=path, status=str(status)
            )
        child.inc()
        self.latency.observe(latency_ms)

    def webhook(self, result: str) -> None:
        self._results[result].inc()

    def signature_key(self, index: int) -> None:
        """Count a delivery verified by key `index` (0: current, 1: previous)."""
        self._keys[min(index, len(self._keys) - 1)].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
