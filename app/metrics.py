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
WHATSAPP_RESULTS = (
    "accepted",
    "invalid_signature",
    "invalid_payload",
    "payload_too_large",
    "storage_unavailable",
    "client_disconnected",
)
WHATSAPP_MESSAGE_RESULTS = ("created", "duplicate", "invalid")
# Meta's status values; anything else (a new one, a malformed one) counts as "other".
WHATSAPP_STATUSES = ("sent", "delivered", "read", "failed", "other")
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
        self.whatsapp_requests = Counter(
            "whatsapp_requests_total",
            "POST /webhook/whatsapp outcomes, one per batch.",
            ["result"],
            registry=self.registry,
        )
        self.whatsapp_messages = Counter(
            "whatsapp_messages_total",
            "Messages in WhatsApp batches: stored, already stored, or skipped as invalid.",
            ["result"],
            registry=self.registry,
        )
        self.whatsapp_statuses = Counter(
            "whatsapp_statuses_total",
            "Status updates in WhatsApp batches, by status.",
            ["status"],
            registry=self.registry,
        )
        # Children looked up once: labels() takes a lock and builds a key every call.
        self._results = {r: self.webhook_requests.labels(result=r) for r in WEBHOOK_RESULTS}
        self._keys = [self.signature_keys.labels(key=k) for k in SIGNATURE_KEYS]
        # Created now, so that every line exists from start-up at 0.
        for result in WHATSAPP_RESULTS:
            self.whatsapp_requests.labels(result=result)
        for result in WHATSAPP_MESSAGE_RESULTS:
            self.whatsapp_messages.labels(result=result)
        for status in WHATSAPP_STATUSES:
            self.whatsapp_statuses.labels(status=status)
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

    def whatsapp(self, result: str) -> None:
        self.whatsapp_requests.labels(result=result).inc()

    def whatsapp_message(self, result: str, count: int = 1) -> None:
        if count:
            self.whatsapp_messages.labels(result=result).inc(count)

    def whatsapp_status(self, status: str) -> None:
        label = status if status in WHATSAPP_STATUSES else "other"
        self.whatsapp_statuses.labels(status=label).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
