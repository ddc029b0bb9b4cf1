"""Refused deliveries: counted at once, written to the store later, in batches.

A flood of forgeries must not slow ingest or grow the database without bound, so the
request path only counts the refusal and appends it to a bounded queue in memory (O(1),
no I/O; when the queue is full the oldest entry is dropped and counted). A background
task writes what waits in one transaction at most every FLUSH_INTERVAL_SECONDS, and the
store keeps only the newest REJECTIONS_KEPT rows.

Conflicts are found the same way: a duplicate delivery (the store said "already there")
is queued with the message it carried, and the task reads the stored rows back in one
query and compares. A sender reusing a message_id for different content still gets its
`200` (the contract), but the delivery is recorded as a `conflict` and logged at WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.types import Scope

from app.metrics import Metrics
from app.models import InvalidMessage, Message, instant_key_unchecked
from app.records import Refusal, StoredContent
from app.signature import EXPIRED, FUTURE, MALFORMED, MISMATCH, MISSING
from app.storage import MessageStore, StorageUnavailable
from app.tasks import cancel_and_wait

logger = logging.getLogger("app.rejections")

# The verifier's reasons, as the console and the metric name them.
SIGNATURE_REASONS = {
    MISSING: "missing_signature",
    MALFORMED: "malformed_signature",
    MISMATCH: "no_key_matched",
    EXPIRED: "timestamp_too_old",
    FUTURE: "timestamp_in_future",
}
QUEUE_SIZE = 1000
# Each waiting check holds its message (up to 4096 characters of text) until the flush,
# and costs a read back and a comparison: at most this many per flush, so a flood of
# redeliveries costs the service a bounded share of its time (the rest are dropped).
CHECK_QUEUE_SIZE = 500
FLUSH_INTERVAL_SECONDS = 0.5
FIELD_MAX = 200
# The fields a conflict compares, by their names in the API.
COMPARED = ("from", "to", "ts", "text")


@dataclass(slots=True)
class DuplicateCheck:
    """A duplicate delivery, waiting to be compared with the stored row."""

    when: float
    message: Message
    endpoint: str
    remote: str | None
    body_bytes: int
    request_id: str | None


def peer(scope: Scope) -> str | None:
    """The TCP peer's address. Behind a proxy that is the proxy: X-Forwarded-For is
    not read (whoever sends it could write anything there)."""
    client = scope.get("client")
    return str(client[0]) if client else None


def declared_size(content_length: bytes | None, limit: int) -> int:
    """A refused body's size: its Content-Length, else (chunked) the least it had."""
    if content_length is not None and content_length.isdigit():
        return int(content_length)
    return limit + 1


def validation_reason(exc: InvalidMessage) -> tuple[str, str | None]:
    """invalid_json for a body that is not a JSON object at all, else invalid_field."""
    field = exc.first_field()
    if field == "body":
        return "invalid_json", None
    return "invalid_field", field[:FIELD_MAX]


def differing_fields(sent: Message, stored: StoredContent) -> list[str]:
    """The fields of COMPARED that differ; `ts` is compared as an instant."""
    sender, recipient, ts_key, text = stored
    differ = []
    if sent.from_ != sender:
        differ.append("from")
    if sent.to != recipient:
        differ.append("to")
    if instant_key_unchecked(sent.ts) != ts_key:
        differ.append("ts")
    if sent.text != text:
        differ.append("text")
    return differ


def _iso(when: float) -> str:
    return (
        datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )


class RejectionRecorder:
    """The bounded queues and the task that empties them into the store."""

    def __init__(
        self,
        metrics: Metrics,
        keep: int,
        *,
        queue_size: int = QUEUE_SIZE,
        check_queue_size: int = CHECK_QUEUE_SIZE,
        interval: float = FLUSH_INTERVAL_SECONDS,
    ) -> None:
        self.metrics = metrics
        self.keep = keep
        self.interval = interval
        self._refusals: deque[Refusal] = deque(maxlen=queue_size)
        self._checks: deque[DuplicateCheck] = deque(maxlen=check_queue_size)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One flush at a time: the task's, or a caller's (stop(), a test) that must see
        # everything before it written.
        self._flushing = asyncio.Lock()
        self._failing = False

    def refuse(
        self,
        scope: Scope,
        endpoint: str,
        reason: str,
        body_bytes: int,
        *,
        field: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """Count a refused delivery and queue it for the store (the request path)."""
        self.metrics.rejection(reason)
        refusal = Refusal(
            _iso(time.time()), endpoint, reason, field, peer(scope), body_bytes, None, request_id
        )
        self._push(self._refusals, refusal)

    def check_duplicate(
        self,
        scope: Scope,
        endpoint: str,
        message: Message,
        body_bytes: int,
        request_id: str | None = None,
    ) -> None:
        """Queue a duplicate delivery, to be compared with what is stored (the request path)."""
        check = DuplicateCheck(time.time(), message, endpoint, peer(scope), body_bytes, request_id)
        self._push(self._checks, check)

    def _push(self, queue: deque[Refusal] | deque[DuplicateCheck], item: object) -> None:
        if len(queue) == queue.maxlen:
            self.metrics.rejections_dropped()
        queue.append(item)  # type: ignore[arg-type]
        if not self._wake.is_set():
            self._wake.set()

    def start(self, store: MessageStore) -> None:
        self._task = asyncio.create_task(self._run(store), name="record-rejections")

    async def stop(self, store: MessageStore) -> None:
        """Stop the task, then write what still waits (bounded by the store's timeouts)."""
        if self._task is not None:
            # Never in the middle of a write: what it took from the queues would be lost.
            async with self._flushing:
                self._task.cancel()
            await cancel_and_wait(self._task)
            self._task = None
        await self.flush(store)

    async def _run(self, store: MessageStore) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush(store)
            except Exception:  # one bad batch must not end the recording
                logger.exception("recording rejections failed")
            # At most one write per interval, however fast refusals arrive.
            await asyncio.sleep(self.interval)

    async def flush(self, store: MessageStore) -> None:
        """Compare the waiting duplicates, then write every waiting refusal, now."""
        async with self._flushing:
            await self._flush(store)

    async def _flush(self, store: MessageStore) -> None:
        checks = list(self._checks)
        self._checks.clear()
        try:
            if checks:
                await self._compare(store, checks)
            refusals = list(self._refusals)
            self._refusals.clear()
            if refusals:
                try:
                    await store.record_rejections(refusals, self.keep)
                except StorageUnavailable:
                    self.metrics.rejections_dropped(len(refusals))
                    raise
        except StorageUnavailable as exc:
            if not self._failing:
                logger.warning("cannot record rejections", extra={"reason": str(exc)})
            self._failing = True
            return
        if self._failing:
            logger.info("recording rejections again")
            self._failing = False

    async def _compare(self, store: MessageStore, checks: list[DuplicateCheck]) -> None:
        try:
            stored = await store.stored_contents(
                list(dict.fromkeys(c.message.message_id for c in checks))
            )
        except StorageUnavailable:
            self.metrics.rejections_dropped(len(checks))
            raise
        for check in checks:
            original = stored.get(check.message.message_id)
            # Gone (deleted since): nothing to compare with.
            differ = [] if original is None else differing_fields(check.message, original)
            if not differ:
                continue
            fields = ",".join(differ)
            self.metrics.rejection("conflict")
            logger.warning(
                "message_id reused with different content",
                extra={
                    "message_id": check.message.message_id,
                    "fields": fields,
                    "endpoint": check.endpoint,
                    "request_id": check.request_id,
                },
            )
            self._push(
                self._refusals,
                Refusal(
                    _iso(check.when),
                    check.endpoint,
                    "conflict",
                    fields,
                    check.remote,
                    check.body_bytes,
                    check.message.message_id,
                    check.request_id,
                ),
            )
