"""Retention in the background: old messages purged, expired tombstones dropped.

Every RETENTION_INTERVAL_SECONDS (and once at start-up) the task deletes the messages
received more than RETENTION_DAYS ago, oldest first, a batch per transaction with a pause
between transactions, so that inserts queued behind one batch wait for that batch alone
(each batch sized to take about 15 ms);
then the tombstones whose TOMBSTONE_DAYS have passed. On PostgreSQL one replica purges at
a time (the others find the batch taken and wait for the next round).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from app.config import Settings
from app.metrics import Metrics
from app.storage import MessageStore, StorageUnavailable

logger = logging.getLogger("app.retention")

# Rows in the first purge transaction. A deleted row costs its five index entries, its
# sender's count and its tombstone, at random places in a big file: 0.15 to 0.3 ms at a
# million rows (bench/lifecycle.py), more on a busy disk. So each next batch is sized
# from the last one's time to take about BATCH_TARGET_SECONDS, which is how long an insert
# queued behind it waits; it at most doubles from one batch to the next.
PURGE_BATCH = 100
BATCH_TARGET_SECONDS = 0.015
PURGE_BATCH_MIN = 10
PURGE_BATCH_MAX = 1000
# Between two batches: long enough for the inserts that queued behind one to commit.
BATCH_PAUSE_SECONDS = 0.02
TOMBSTONE_BATCH = 5000


def next_batch(size: int, seconds: float) -> int:
    """The size of the batch after one of `size` rows that took `seconds`."""
    fitted = int(size * BATCH_TARGET_SECONDS / max(seconds, 1e-6))
    return max(PURGE_BATCH_MIN, min(fitted, 2 * size, PURGE_BATCH_MAX))


class Retention:
    def __init__(
        self,
        store: MessageStore,
        settings: Settings,
        metrics: Metrics,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.timer = timer
        # Carried from round to round: the size that last took about the target.
        self.batch = PURGE_BATCH
        days = settings.retention_days
        self.older_than = None if days is None else timedelta(days=days)
        self.tombstone_for = timedelta(days=settings.tombstone_days)
        self.interval = settings.retention_interval_seconds
        self.pause = BATCH_PAUSE_SECONDS
        self._failing = False

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except StorageUnavailable as exc:
                if not self._failing:
                    logger.warning("retention postponed", extra={"reason": str(exc)})
                self._failing = True
            else:
                if self._failing:
                    logger.info("retention running again")
                self._failing = False
            await asyncio.sleep(self.interval)

    async def run_once(self) -> tuple[int, int]:
        """Purge everything due now, then expire tombstones; (purged, expired)."""
        lifecycle = self.store.lifecycle
        started = time.monotonic()
        purged = expired = 0
        if self.older_than is not None:
            while True:
                size = self.batch
                began = self.timer()
                count = await lifecycle.purge(self.older_than, self.tombstone_for, size)
                purged += count
                self.metrics.purged.inc(count)
                if count < size:
                    break
                self.batch = next_batch(size, self.timer() - began)
                await asyncio.sleep(self.pause)
        while True:
            count = await lifecycle.expire_tombstones(TOMBSTONE_BATCH)
            expired += count
            self.metrics.tombstones_expired.inc(count)
            if count < TOMBSTONE_BATCH:
                break
            await asyncio.sleep(self.pause)
        if purged or expired:
            logger.info(
                "retention purge",
                extra={
                    "purged": purged,
                    "tombstones_expired": expired,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
        return purged, expired
