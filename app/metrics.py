"""Prometheus metrics, on a registry owned by one app instance."""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

WEBHOOK_RESULTS = (
    "created",
    "duplicate",
    "invalid_signature",
    "validation_error",
    "payload_too_large",
    "unsupported_media_type",
    "storage_unavailable",
    "client_disconnected",
    "overloaded",
)
SIGNATURE_KEYS = ("current", "previous")
# Why a delivery to /webhook or /webhook/whatsapp was refused (or, for `conflict`,
# accepted but found to reuse a message_id with different content): see app/rejections.py.
REJECTION_REASONS = (
    "missing_signature",
    "malformed_signature",
    "no_key_matched",
    "timestamp_too_old",
    "timestamp_in_future",
    "body_too_large",
    "unsupported_media_type",
    "invalid_json",
    "invalid_field",
    "conflict",
)
WHATSAPP_RESULTS = (
    "accepted",
    "invalid_signature",
    "invalid_payload",
    "payload_too_large",
    "storage_unavailable",
    "client_disconnected",
    "overloaded",
)
WHATSAPP_MESSAGE_RESULTS = ("created", "duplicate", "invalid")
ERASURE_KINDS = ("message", "number")
# Meta's status values; anything else (a new one, a malformed one) counts as "other".
WHATSAPP_STATUSES = ("sent", "delivered", "read", "failed", "other")
# Requests refused before any route saw them (app/access.py's results).
REFUSAL_REASONS = ("invalid_host", "missing_token", "invalid_token")
# Why a read was stopped before it answered (docs/limits.md).
READ_STOPS = ("deadline", "client_disconnected")
# What the server did at its connection limit: closed an idle connection to make room,
# or refused the new one.
CONNECTION_LIMIT_ACTIONS = ("evicted", "refused")
# The label for requests that matched no route: a scanner must not grow the label set.
UNMATCHED_PATH = "unmatched"
LATENCY_BUCKETS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# The same bounds in seconds, for http_request_duration_seconds (Prometheus' convention).
LATENCY_BUCKETS_SECONDS = tuple(bound / 1000 for bound in LATENCY_BUCKETS_MS)
# Methods get their own label value; anything else is "other", so the label set is bounded.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _RequestCounts(Collector):
    """The metrics every request moves, as plain numbers, turned into families on scrape.

    prometheus_client's Counter and Histogram take a lock for each increment, and a
    webhook made four of them. These numbers are only ever changed on the event loop's
    thread, one change at a time, so they need no lock; a scrape reads them as they are.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.results = dict.fromkeys(WEBHOOK_RESULTS, 0)
        self.keys = [0] * len(SIGNATURE_KEYS)
        self.rejections = dict.fromkeys(REJECTION_REASONS, 0)
        self.rejections_dropped = 0
        self.refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        # Per bucket, not cumulative: observing adds to one; the +Inf bucket is last.
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum = 0.0
        # The same, per (route template, method), for http_request_duration_seconds;
        # the sums in milliseconds, as observed.
        self.durations: dict[tuple[str, str], list[int]] = {}
        self.duration_sums: dict[tuple[str, str], float] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "http_requests",
            "HTTP requests by route template and status code.",
            labels=["path", "status"],
        )
        for (path, status), count in self.requests.items():
            requests.add_metric([path, str(status)], count)
        yield requests
        results = CounterMetricFamily(
            "webhook_requests", "POST /webhook outcomes.", labels=["result"]
        )
        for result, count in self.results.items():
            results.add_metric([result], count)
        yield results
        cumulative = 0
        buckets = []
        for bound, count in zip(
            [*map(floatToGoString, LATENCY_BUCKETS_MS), "+Inf"], self.latency_counts, strict=True
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "request_latency_ms",
            "Time from request start to the end of the response, in milliseconds.",
            buckets=buckets,
            sum_value=self.latency_sum,
        )
        durations = HistogramMetricFamily(
            "http_request_duration_seconds",
            "Time from request start to the end of the response, by route template and method.",
            labels=["route", "method"],
        )
        bounds = [*map(floatToGoString, LATENCY_BUCKETS_SECONDS), "+Inf"]
        for route, counts in self.durations.items():
            durations.add_metric(
                list(route),
                buckets=list(zip(bounds, itertools.accumulate(counts), strict=True)),
                sum_value=self.duration_sums[route] / 1000,
            )
        yield durations
        keys = CounterMetricFamily(
            "webhook_signature_key",
            "Accepted webhook signatures by the key that verified them.",
            labels=["key"],
        )
        for key, count in zip(SIGNATURE_KEYS, self.keys, strict=True):
            keys.add_metric([key], count)
        yield keys
        rejections = CounterMetricFamily(
            "webhook_rejections",
            "Refused deliveries to /webhook and /webhook/whatsapp by reason (conflict:"
            " a message_id reused with different content, still answered 200).",
            labels=["reason"],
        )
        for reason, count in self.rejections.items():
            rejections.add_metric([reason], count)
        yield rejections
        yield CounterMetricFamily(
            "webhook_rejections_dropped",
            "Rejections left out of the stored list: the queue was full, or the write failed.",
            value=self.rejections_dropped,
        )
        refusals = CounterMetricFamily(
            "access_refusals",
            "Requests refused before routing: a Host not allowed, a missing or invalid token.",
            labels=["reason"],
        )
        for reason, count in self.refusals.items():
            refusals.add_metric([reason], count)
        yield refusals


class FeedCounts(Protocol):
    """What the feed's fan-out (app/feed_hub.py) counts, read on each scrape."""

    @property
    def streams(self) -> int: ...

    @property
    def dropped_slow(self) -> int: ...


class _FeedCollector(Collector):
    """The feed's stream subscribers, read from the process's hub on each scrape (0 until
    the hub exists: the families are there from start-up)."""

    def __init__(self) -> None:
        self.hub: FeedCounts | None = None

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        yield GaugeMetricFamily(
            "feed_subscribers",
            "Open GET /feed/stream streams, catching up or following the live tail.",
            value=hub.streams if hub is not None else 0,
        )
        yield CounterMetricFamily(
            "feed_subscribers_dropped",
            "Streams ended because their client fell too far behind (4 MiB); they resume"
            " from their last id.",
            value=hub.dropped_slow if hub is not None else 0,
        )


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # `_created` timestamps double the exposition for no use here.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self._counts = _RequestCounts()
        self.registry.register(self._counts)
        self._feed = _FeedCollector()
        self.registry.register(self._feed)
        # Memory, CPU, open files, the interpreter's collections and version: read from
        # /proc and gc on each scrape, nothing on the request path.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
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
        # The data lifecycle (docs/lifecycle.md).
        self.purged = Counter(
            "webhook_messages_purged",
            "Messages deleted by retention (RETENTION_DAYS), by this process.",
            registry=self.registry,
        )
        self.erased = Counter(
            "webhook_messages_erased",
            "Messages deleted by an erasure (DELETE /messages/{id}, DELETE /numbers/{e164}).",
            ["kind"],
            registry=self.registry,
        )
        self.tombstones_expired = Counter(
            "webhook_tombstones_expired",
            "Tombstones of purged messages deleted once TOMBSTONE_DAYS had passed.",
            registry=self.registry,
        )
        # Created now, so that every line exists from start-up at 0.
        for kind in ERASURE_KINDS:
            self.erased.labels(kind=kind)
        self.reads_stopped = Counter(
            "reads_stopped_total",
            "Reads stopped before they answered: past READ_TIMEOUT_SECONDS, or the client left.",
            ["reason"],
            registry=self.registry,
        )
        self.connection_limit = Counter(
            "http_connection_limit_total",
            "Connections closed at HTTP_MAX_CONNECTIONS: an idle one evicted, or a new one"
            " refused.",
            ["action"],
            registry=self.registry,
        )
        # Created now, so that every line exists from start-up at 0.
        for reason in READ_STOPS:
            self.reads_stopped.labels(reason=reason)
        for action in CONNECTION_LIMIT_ACTIONS:
            self.connection_limit.labels(action=action)
        for result in WHATSAPP_RESULTS:
            self.whatsapp_requests.labels(result=result)
        for result in WHATSAPP_MESSAGE_RESULTS:
            self.whatsapp_messages.labels(result=result)
        for status in WHATSAPP_STATUSES:
            self.whatsapp_statuses.labels(status=status)

    def follow_feed(self, hub: FeedCounts) -> None:
        """Report this hub's subscribers from now on (the lifespan creates it)."""
        self._feed.hub = hub

    def observe_request(self, path: str, method: str, status: int, latency_ms: float) -> None:
        counts = self._counts
        key = (path, status)
        counts.requests[key] = counts.requests.get(key, 0) + 1
        bucket = bisect_left(LATENCY_BUCKETS_MS, latency_ms)
        counts.latency_counts[bucket] += 1
        counts.latency_sum += latency_ms
        route = (path, method if method in METHODS else "other")
        per_route = counts.durations.get(route)
        if per_route is None:
            per_route = counts.durations[route] = [0] * (len(LATENCY_BUCKETS_MS) + 1)
            counts.duration_sums[route] = 0.0
        per_route[bucket] += 1
        counts.duration_sums[route] += latency_ms

    def webhook(self, result: str) -> None:
        self._counts.results[result] += 1

    def signature_key(self, index: int) -> None:
        """Count a delivery verified by key `index` (0: current, 1: previous)."""
        self._counts.keys[min(index, len(SIGNATURE_KEYS) - 1)] += 1

    def rejection(self, reason: str) -> None:
        self._counts.rejections[reason] += 1

    def rejections_dropped(self, count: int = 1) -> None:
        self._counts.rejections_dropped += count

    def refusal(self, reason: str) -> None:
        self._counts.refusals[reason] += 1

    def whatsapp(self, result: str) -> None:
        self.whatsapp_requests.labels(result=result).inc()

    def whatsapp_message(self, result: str, count: int = 1) -> None:
        if count:
            self.whatsapp_messages.labels(result=result).inc(count)

    def whatsapp_status(self, status: str, count: int = 1) -> None:
        label = status if status in WHATSAPP_STATUSES else "other"
        self.whatsapp_statuses.labels(status=label).inc(count)

    def read_stopped(self, reason: str) -> None:
        self.reads_stopped.labels(reason=reason).inc()

    def connection_limited(self, action: str) -> None:
        self.connection_limit.labels(action=action).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
