"""Crash under load: SIGKILL the real server at random moments while senders deliver.

Every id that got a 200 must be stored after the restarts, the database must pass its
integrity check, and deliveries whose outcome was unknown (the connection died) are
delivered again and stored once. The same campaign against a build that acknowledges
before it commits must lose messages: that proves the campaign can fail.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.battery import Connection, Ledger, Senders, signed
from tests.support.servers import BROKEN, SERVE, Server, start_server
from tests.support.tiers import TIER, record

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


@dataclass
class Campaign:
    ledger: Ledger
    stored: set[str]
    kills: int
    integrity: list[str]
    totals_agree: bool
    redelivered: int

    @property
    def lost(self) -> set[str]:
        return self.ledger.acked - self.stored


def integrity_of(db_path: Path) -> str:
    conn = sqlite3.connect(db_path)
    try:
        result: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return result


def verify_database(db_path: Path) -> tuple[set[str], str, bool]:
    with sqlite3.connect(db_path) as conn:
        stored = {row[0] for row in conn.execute("SELECT message_id FROM messages")}
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        total = conn.execute("SELECT total FROM message_totals").fetchone()[0]
        per_sender = conn.execute("SELECT coalesce(sum(count), 0) FROM sender_counts").fetchone()[0]
    conn.close()
    return stored, integrity, total == len(stored) == per_sender


def run_campaign(
    tmp_path: Path,
    *,
    command: Sequence[str],
    kills: int,
    startup_kills: int,
    env: dict[str, str] | None = None,
    seed: int,
) -> Campaign:
    rng = random.Random(seed)
    db_path = tmp_path / "app.db"
    ledger = Ledger()
    senders = Senders(ledger, prefix=f"crash{seed}")
    senders.start()
    integrity: list[str] = []
    server: Server | None = None
    try:
        # Some kills land while the server is still starting (schema, store, first requests).
        plan = ["load"] * kills + ["startup"] * startup_kills
        rng.shuffle(plan)
        for moment in plan:
            if moment == "startup":
                server = start_server(
                    tmp_path, command=command, db_path=db_path, env=env, wait=False
                )
                time.sleep(rng.uniform(0.0, 0.6))
            else:
                server = start_server(tmp_path, command=command, db_path=db_path, env=env)
                senders.base_url = server.base_url
                senders.up.set()
                time.sleep(rng.uniform(0.1, 0.8))
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()
            senders.up.clear()
            integrity.append(integrity_of(db_path))
    finally:
        senders.stop()
        if server is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()

    # Redeliver every outcome the senders could not know, once, to a fresh server.
    again = sorted(ledger.unknown | ledger.refused)
    server = start_server(tmp_path, command=command, db_path=db_path, env=env)
    try:
        with Connection(server.base_url) as client:
            for message_id in again:
                body, signature = signed(message_id, text=f"load {message_id}")
                assert client.post_webhook(body, signature).status == 200
        server.stop()
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    stored, final_integrity, totals_agree = verify_database(db_path)
    integrity.append(final_integrity)
    return Campaign(ledger, stored, kills + startup_kills, integrity, totals_agree, len(again))


def test_no_acknowledged_message_is_lost_across_sigkills(tmp_path: Path) -> None:
    campaign = run_campaign(
        tmp_path, command=SERVE, kills=TIER.kills, startup_kills=TIER.startup_kills, seed=1
    )
    ledger = campaign.ledger
    assert len(ledger.acked) > TIER.kills * 10, "the load never got going"
    assert campaign.lost == set()
    assert set(campaign.integrity) == {"ok"}
    # Every id that was ever sent is stored exactly once (redeliveries included).
    assert campaign.stored == ledger.acked | ledger.unknown | ledger.refused
    assert campaign.totals_agree
    record("crash: SIGKILLs survived", campaign.kills)
    record("crash: acknowledged deliveries", len(ledger.acked))
    record("crash: acknowledged but lost", len(campaign.lost))
    record("crash: deliveries cut off with no answer (redelivered)", len(ledger.unknown))
    record("crash: deliveries answered 503 (redelivered)", len(ledger.refused))


def test_a_build_that_acknowledges_before_commit_is_caught(tmp_path: Path) -> None:
    campaign = run_campaign(
        tmp_path,
        command=BROKEN,
        kills=TIER.broken_kills,
        startup_kills=0,
        env={"BROKEN_VARIANT": "ack_before_commit"},
        seed=2,
    )
    assert campaign.lost, "the crash campaign did not notice acknowledged-but-lost messages"
    record("crash: broken build (ack before commit) lost", len(campaign.lost))
