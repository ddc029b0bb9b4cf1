"""Races: many concurrent deliveries of one id, round after round, store one row and all get 200.

A build that checks for the id before inserting (read, then write) must fail the same check.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.battery import Connection, signed
from tests.support.servers import BROKEN, SERVE, running_server
from tests.support.tiers import TIER, record

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


@dataclass
class RaceReport:
    # Per round: the statuses the concurrent deliveries got.
    statuses: list[list[int]]
    # Per round id: rows stored.
    rows: dict[str, int]
    # Per round id: access lines that said "created".
    created: dict[str, int]

    def violations(self) -> list[str]:
        found = []
        for index, statuses in enumerate(self.statuses):
            message_id = f"race-{index}"
            if statuses != [200] * len(statuses):
                found.append(f"{message_id}: statuses {sorted(Counter(statuses).items())}")
            if self.rows.get(message_id, 0) != 1:
                found.append(f"{message_id}: {self.rows.get(message_id, 0)} rows")
            if self.created.get(message_id, 0) != 1:
                found.append(f"{message_id}: created {self.created.get(message_id, 0)} times")
        return found


def deliver(
    client: Connection, body: bytes, signature: str, barrier: threading.Barrier, got: list[int]
) -> None:
    barrier.wait()
    try:
        got.append(client.post_webhook(body, signature).status)
    except OSError:
        got.append(0)


def race(tmp_path: Path, command: tuple[str, ...], env: dict[str, str] | None = None) -> RaceReport:
    width, rounds = TIER.race_width, TIER.race_rounds
    statuses: list[list[int]] = []
    with running_server(tmp_path, command=command, env=env) as server:
        clients = [Connection(server.base_url) for _ in range(width)]
        for client in clients:  # connected before the race, so the barrier is the start line
            assert client.request("GET", "/health/live").status == 200
        for index in range(rounds):
            body, signature = signed(f"race-{index}")
            barrier = threading.Barrier(width)
            got: list[int] = []

            threads = [
                threading.Thread(target=deliver, args=(c, body, signature, barrier, got))
                for c in clients
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            statuses.append(got)
        for client in clients:
            client.close()
        server.stop()
        lines = [json.loads(line) for line in server.log_lines()]
    conn = sqlite3.connect(tmp_path / "app.db")
    try:
        rows = dict(
            conn.execute("SELECT message_id, count(*) FROM messages GROUP BY message_id").fetchall()
        )
    finally:
        conn.close()
    created = Counter(line["message_id"] for line in lines if line.get("result") == "created")
    return RaceReport(statuses, rows, dict(created))


def test_concurrent_deliveries_of_one_id_store_one_row_every_round(tmp_path: Path) -> None:
    report = race(tmp_path, SERVE)
    assert report.violations() == []
    deliveries = TIER.race_rounds * TIER.race_width
    record("races: rounds x concurrent deliveries", f"{TIER.race_rounds} x {TIER.race_width}")
    record("races: deliveries, rows stored", f"{deliveries}, {sum(report.rows.values())}")


def test_a_build_that_reads_before_it_writes_is_caught(tmp_path: Path) -> None:
    report = race(tmp_path, BROKEN, env={"BROKEN_VARIANT": "read_then_write"})
    assert report.violations(), "the race test did not notice a read-then-write build"
    record("races: broken build (read then write) violations", len(report.violations()))
