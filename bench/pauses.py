"""The pauses of ingest a retention purge causes, measured in process (part of bench.lifecycle).

64 tasks insert without end into a store (the service's own SQLiteStore, its writer
thread and checkpointer, no HTTP in between), first with no purge, then on a fresh copy of
the same store while Retention purges it. Noted: every insert's completion time. A pause
of ingest is a gap between two consecutive completions: nothing committed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from app.config import Settings
from app.metrics import Metrics
from app.models import Message
from app.retention import Retention
from app.storage.sqlite.store import SQLiteStore
from tests.support.clients import message as body

INSERTERS = 64
WARM_SECONDS = 3.0


@dataclass
class Pauses:
    inserts: int
    seconds: float
    p99_ms: float
    gaps_ms: list[float]  # longest first

    def over(self, ms: float) -> int:
        return sum(gap > ms for gap in self.gaps_ms)

    def line(self, label: str) -> str:
        top = ", ".join(f"{gap:.1f}" for gap in self.gaps_ms[:3])
        return (
            f"{label:<22}{self.inserts / self.seconds:>9,.0f}/s  insert p99 {self.p99_ms:5.1f} ms;"
            f" longest pauses {top} ms; over 30 ms: {self.over(30)}, over 50 ms: {self.over(50)}"
        )


def message(message_id: str) -> Message:
    text = "a message of an ordinary length, " * 3
    return Message.model_validate(body(message_id=message_id, text=text))


async def insert_for(store: SQLiteStore, seconds: float, prefix: str) -> Pauses:
    done: list[tuple[float, float]] = []
    counter = itertools.count()
    stop = time.monotonic() + seconds

    async def inserter() -> None:
        while time.monotonic() < stop:
            began = time.perf_counter()
            await store.insert(message(f"{prefix}-{next(counter)}"))
            ended = time.perf_counter()
            done.append((ended, ended - began))

    await asyncio.gather(*(inserter() for _ in range(INSERTERS)))
    ends = sorted(end for end, _ in done)
    latencies = sorted(took for _, took in done)
    return Pauses(
        inserts=len(done),
        seconds=seconds,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
        gaps_ms=sorted(((b - a) * 1000 for a, b in itertools.pairwise(ends)), reverse=True),
    )


async def measure(db: Path, seconds: float, purging: bool) -> Pauses:
    store = await SQLiteStore.open(str(db))
    try:
        await insert_for(store, WARM_SECONDS, "warm")
        purge = None
        if purging:
            settings = Settings(webhook_secret=SecretStr("bench"), retention_days=30)
            purge = asyncio.ensure_future(Retention(store, settings, Metrics()).run_once())
        try:
            return await insert_for(store, seconds, "load")
        finally:
            if purge is not None:
                purge.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await purge
    finally:
        await store.close()


def ingest_pauses(aged: Path, workdir: Path, seconds: float, passes: int) -> list[str]:
    """Lines for the report: the pauses without a purge, then during one, `passes` times."""
    lines = [f"pauses of ingest, {INSERTERS} inserters in process, {seconds:.0f} s each:"]
    for index in range(passes):
        for purging in (False, True) if index % 2 == 0 else (True, False):
            db = workdir / f"pauses-{index}-{purging}.db"
            shutil.copy(aged, db)
            try:
                pauses = asyncio.run(measure(db, seconds, purging))
            finally:
                for leftover in workdir.glob(db.name + "*"):
                    leftover.unlink()
            label = "  during the purge" if purging else "  without a purge"
            lines.append(pauses.line(label))
    return lines
