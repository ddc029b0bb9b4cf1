"""A store for the console's browser tests: bulk history plus a few known conversations.

Bulk rows come from bench/dataset.py (random words, January 2025); the known ones are
inserted afterwards with the schema's triggers on, so every aggregate is as live traffic
would leave it. They are dated June 2025, so they head the conversation list.
"""

from __future__ import annotations

from pathlib import Path

from app.models import instant_key
from app.storage.rows import utc_now
from app.storage.sqlite.connection import connect_sqlite
from bench.dataset import prefill_service

BUSINESS = "+14155550100"
# A readable conversation, for the screenshots.
CUSTOMER = "+447700900123"
STORY = [
    "Hi! I ordered the blue kettle on Monday, order #4471. Any news?",
    "It says shipped but the tracking link gives me a 404.",
    "Found it: the courier has it, arriving Thursday.",
    "Can I change the delivery address to my office?",
    "It's 12 Market Street, 2nd floor. Thanks!",
    "Delivered, thank you! The kettle is lovely.",
]
OTHERS = [
    ("+919876543210", "Is the invoice for March ready? Our accounts team needs it today."),
    ("+5511987654321", "Olá! Can I book a table for four on Friday at 8pm?"),
    ("+14155550188", "Your verification code is not arriving, can you resend?"),
    ("+33612345678", "Merci, payment sent. Please confirm when you receive it."),
]
# A sender with more messages than a page: the thread loads older ones on scroll.
LONG_SENDER = "+15551230001"
LONG_COUNT = 130
# Text that would run as markup if the page ever used innerHTML.
HOSTILE_SENDER = "+15551230002"
HOSTILE_TEXT = '<img src=x onerror="window.__xss=1"> </script><script>window.__xss=2</script>'
# Messages that mention this word: more than a page of search results.
SEARCH_WORD = "Zanzibar"
SEARCH_COUNT = 70


def seed_console_store(path: Path, bulk: int = 2000) -> None:
    prefill_service(path, bulk)
    rows: list[tuple[str, str, str, str, str | None]] = []
    for index, text in enumerate(STORY):
        rows.append(
            (f"story{index}", CUSTOMER, BUSINESS, f"2025-06-12T09:{10 + 7 * index}:00Z", text)
        )
    for index, (sender, text) in enumerate(OTHERS):
        rows.append((f"other{index}", sender, BUSINESS, f"2025-06-12T0{8 - index}:30:00Z", text))
    for index in range(LONG_COUNT):
        ts = f"2025-06-10T{index // 60:02}:{index % 60:02}:00Z"
        rows.append((f"long{index:03}", LONG_SENDER, BUSINESS, ts, f"Status update number {index}"))
    rows.append(("hostile", HOSTILE_SENDER, BUSINESS, "2025-06-11T12:00:00Z", HOSTILE_TEXT))
    for index in range(SEARCH_COUNT):
        text = f"Shipment {index} leaves for {SEARCH_WORD} (zanzibar port) tomorrow"
        rows.append(
            (
                f"trip{index:02}",
                "+15551230003",
                BUSINESS,
                f"2025-05-01T10:{index % 60:02}:0{index // 60}Z",
                text,
            )
        )
    conn = connect_sqlite(str(path), busy_timeout_ms=5000)
    try:
        now = utc_now()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, text, ts_key,"
            " text_folded, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    mid,
                    sender,
                    to,
                    ts,
                    text,
                    instant_key(ts),
                    None if text is None else text.casefold(),
                    now,
                )
                for mid, sender, to, ts, text in rows
            ],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
