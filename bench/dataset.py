"""Realistic messages for the benchmarks: signed bodies for wrk, and pre-filled stores."""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from app.models import instant_key
from app.storage.migrations import apply_postgres_schema, apply_sqlite_schema
from app.storage.rows import utc_now
from app.storage.sqlite.connection import connect_sqlite

SENDERS = 10_000
# One message in ten thousand carries it: a "selective" search term.
RARE_WORD = "quetzalcoatl"
WORDS = (  # noqa: SIM905 - a word list reads best as words
    "hello hi ok thanks yes no maybe tomorrow today tonight meeting call later soon "
    "please order delivery payment invoice shipped arrived confirm cancel refund price "
    "offer deal address photo video location sent received where when what who how why "
    "great good sure perfect lunch dinner coffee weekend monday friday office home train "
    "flight hotel ticket booking reminder appointment doctor school kids birthday party "
    "gift happy congratulations sorry late traffic rain sunny weather news update check "
    "link code otp verify account password login support help issue problem fixed done "
    "working test"
).split()
START = datetime(2025, 1, 1, tzinfo=UTC)
LIVE_START = datetime(2025, 2, 1, tzinfo=UTC)


def sender(rng: random.Random) -> str:
    # Skewed, as real traffic is (a few senders send much), with a long tail of them all.
    if rng.random() < 0.6:
        index = rng.randrange(SENDERS)
    else:
        index = min(int(rng.paretovariate(1.0)) - 1, SENDERS - 1)
    return f"+1555{index:07d}"


def message(
    rng: random.Random, message_id: str, moment: datetime | None = None, span_days: int = 30
) -> dict[str, object]:
    if moment is None:
        moment = START + timedelta(seconds=rng.uniform(0, span_days * 86400))
    ts = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if rng.random() < 0.3:
        ts += "." + f"{moment.microsecond:06d}"[: rng.randint(1, 6)]
    ts += "Z"
    text: str | None = " ".join(rng.choices(WORDS, k=rng.randint(2, 25)))
    if rng.random() < 0.0001:
        text = f"{text} {RARE_WORD}"
    if rng.random() < 0.05:
        text = None
    return {
        "message_id": message_id,
        "from": sender(rng),
        "to": "+14155550100",
        "ts": ts,
        "text": text,
    }


def messages(
    prefix: str, count: int, seed: int = 1, span_days: int = 30
) -> Iterator[dict[str, object]]:
    """Stored history: timestamps anywhere in `span_days` (a month), in no particular order."""
    rng = random.Random(seed)
    for index in range(count):
        yield message(rng, f"{prefix}{index}", span_days=span_days)


def live_messages(prefix: str, count: int, seed: int = 1) -> Iterator[dict[str, object]]:
    """Live traffic: message ids as opaque as a provider's, timestamps close to "now",
    mostly in order (a delivery can lag a few seconds behind the next one)."""
    rng = random.Random(seed)
    for index in range(count):
        moment = LIVE_START + timedelta(milliseconds=index, seconds=-rng.uniform(0, 3))
        yield message(rng, f"{prefix}{rng.getrandbits(64):016x}", moment)


def write_signed_bodies(path: Path, prefix: str, count: int, secret: bytes) -> None:
    """Lines of `<hex signature> <message_id> <body>` for bench/post.lua."""
    with open(path, "w", encoding="utf-8") as out:
        for body in live_messages(prefix, count, seed=hash(prefix) & 0xFFFF):
            raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            signature = hmac.digest(secret, raw, "sha256").hex()
            out.write(f"{signature} {body['message_id']} {raw.decode()}\n")


def prefill_service(path: Path, count: int, prefix: str = "p", span_days: int = 30) -> None:
    """A store in the service's schema with `count` messages, aggregates and index built.

    Rows go in with the search and aggregate triggers off, which are rebuilt once at the
    end: the same final state as `count` webhooks, in a fraction of the time.
    """
    conn = connect_sqlite(str(path), busy_timeout_ms=5000)
    apply_sqlite_schema(conn)
    conn.execute("PRAGMA synchronous = OFF")
    saved = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'messages'"
    ).fetchall()
    conn.execute("BEGIN")
    for name, _ in saved:
        conn.execute(f"DROP TRIGGER {name}")
    now = utc_now()
    conn.executemany(
        "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, text, ts_key,"
        " text_folded, created_at, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (message_id) DO NOTHING",
        (
            (
                m["message_id"],
                m["from"],
                m["to"],
                m["ts"],
                m["text"],
                instant_key(str(m["ts"])),
                None if m["text"] is None else str(m["text"]).casefold(),
                now,
                position,
            )
            for position, m in enumerate(messages(prefix, count, span_days=span_days), start=1)
        ),
    )
    conn.execute("DELETE FROM sender_counts")
    # Each sender's last message: the greatest (ts_key, message_id), as the triggers keep it.
    conn.execute(
        "INSERT INTO sender_counts (from_msisdn, count, last_ts_key, last_message_id)"
        " SELECT from_msisdn, count(*), max(ts_key), NULL FROM messages GROUP BY from_msisdn"
    )
    conn.execute(
        "UPDATE sender_counts SET last_message_id = (SELECT max(message_id) FROM messages m"
        " WHERE m.from_msisdn = sender_counts.from_msisdn AND m.ts_key = sender_counts.last_ts_key)"
    )
    conn.execute("DELETE FROM message_hours")
    conn.execute(
        "INSERT INTO message_hours (hour, count)"
        " SELECT substr(ts_key, 1, 13), count(*) FROM messages GROUP BY 1"
    )
    conn.execute(
        "UPDATE message_totals SET total = (SELECT count(*) FROM messages),"
        " senders = (SELECT count(*) FROM sender_counts)"
    )
    conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")
    conn.execute(
        "UPDATE search_progress"
        " SET indexed_through = (SELECT coalesce(max(rowid), 0) FROM messages)"
    )
    for _, sql in saved:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def prefill_naive(path: Path, count: int, prefix: str = "p") -> None:
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS messages (message_id TEXT PRIMARY KEY, from_msisdn TEXT"
        " NOT NULL, to_msisdn TEXT NOT NULL, ts TEXT NOT NULL, text TEXT, created_at TEXT"
        " NOT NULL)"
    )
    now = utc_now()
    conn.executemany(
        "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?)",
        (
            (m["message_id"], m["from"], m["to"], m["ts"], m["text"], now)
            for m in messages(prefix, count)
        ),
    )
    conn.commit()
    conn.close()


def prefill_postgres(url: str, count: int, prefix: str = "p") -> None:
    """The same store on PostgreSQL: COPY, counts folded, trigram index rebuilt, ANALYZE."""
    asyncio.run(_prefill_postgres(url, count, prefix))


async def _prefill_postgres(url: str, count: int, prefix: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await apply_postgres_schema(conn)
        # Building the trigram index once, afterwards, is many times faster than
        # maintaining it row by row.
        trigram = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'messages_text_trgm'"
        )
        if trigram:
            await conn.execute("DROP INDEX messages_text_trgm")
        now = utc_now()
        rows = (
            (
                m["message_id"],
                m["from"],
                m["to"],
                m["ts"],
                m["text"],
                instant_key(str(m["ts"])),
                None if m["text"] is None else str(m["text"]).casefold(),
                now,
                position,
            )
            # Positions 1..N, as schema 2 numbers the rows it finds: below every
            # transaction's own (app/storage/schema/postgres/0002_feed.sql).
            for position, m in enumerate(messages(prefix, count), start=1)
        )
        await conn.copy_records_to_table(
            "messages",
            records=rows,
            columns=[
                "message_id",
                "from_msisdn",
                "to_msisdn",
                "ts",
                "text",
                "ts_key",
                "text_folded",
                "created_at",
                "position",
            ],
        )
        await conn.execute("SELECT fold_message_counts()")
        if trigram:
            await conn.execute(trigram)
        await conn.execute("VACUUM ANALYZE messages")
    finally:
        await conn.close()
