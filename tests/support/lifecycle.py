"""What the data-lifecycle tests share: a clock they move, admin tokens, and recounts.

Every aggregate the service keeps (/stats, search, paging) is compared with the same
answer recounted from the stored rows themselves, the slow way.
"""

from __future__ import annotations

import functools
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from app.config import Settings
from app.main import create_app
from app.models import instant_key
from app.storage import open_store
from tests.support.clients import AppClient, make_settings

ADMIN = "alice"
ADMIN_TOKEN = "alice-0123456789abcdef"
OTHER_ADMIN_TOKEN = "ci-fedcba9876543210"
ADMIN_TOKENS = f"{ADMIN}:{ADMIN_TOKEN},ci:{OTHER_ADMIN_TOKEN}"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SENDERS = ["+919876543210", "+14155550100", "+447700900123", "+15550001111", "+33612345678"]
WORDS = ["hello", "Straße", "order", "ship", "ΣΊΣΥΦΟΣ", "refund", "日本語", "late", "ok"]
QUERIES = ["hello", "HELLO", "strasse", "ord", "σίσυφος", "日本", "ok", "zzz", "e"]
T0 = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    """The store's clock in a test: it moves only when told."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def lifecycle_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "admin_tokens": ADMIN_TOKENS,
        # The background task runs once at start-up; the tests run it when they want to.
        "retention_interval_seconds": 86400,
        **overrides,
    }
    return make_settings(database_url, **values)


def clocked_client(settings: Settings, clock: FakeClock) -> AppClient:
    """A client (not yet entered) on `settings`, its store on `clock`."""
    return AppClient(create_app(settings, store_opener=functools.partial(open_store, clock=clock)))


def corpus(count: int, seed: int = 5, prefix: str = "m") -> list[dict[str, Any]]:
    """Messages with a few senders, recipients, texts (some null) and instants."""
    rng = random.Random(seed)
    messages = []
    for i in range(count):
        sender, recipient = rng.sample(SENDERS, 2)
        text = None if i % 7 == 0 else " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        second = rng.randrange(86400 * 3)
        fraction = rng.choice(["", ".5", ".123456789", ".1"])
        ts = (T0 - timedelta(days=30, seconds=second)).strftime("%Y-%m-%dT%H:%M:%S")
        messages.append(
            {
                "message_id": f"{prefix}{i:05d}",
                "from": sender,
                "to": recipient,
                "ts": f"{ts}{fraction}Z",
                "text": text,
            }
        )
    return messages


def post_all(client: AppClient, messages: list[dict[str, Any]]) -> None:
    for body in messages:
        response = client.post_signed(body)
        assert response.status_code == 200, response.text


ROWS = "SELECT message_id, from_msisdn, to_msisdn, ts, text, ts_key FROM messages"


def stored(client: AppClient) -> list[tuple[Any, ...]]:
    return sorted(client.rows(ROWS), key=lambda row: (row[5], row[0]))


def recount_stats(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[1]] = counts.get(row[1], 0) + 1
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:10]
    return {
        "total_messages": len(rows),
        "senders_count": len(counts),
        "messages_per_sender": [{"from": sender, "count": count} for sender, count in top],
        "first_message_ts": rows[0][3] if rows else None,
        "last_message_ts": rows[-1][3] if rows else None,
    }


def all_pages(client: AppClient, **params: str) -> tuple[list[str], int]:
    """Every id /messages lists for `params`, page by page (cursor), and its total."""
    ids: list[str] = []
    query: dict[str, Any] = {"limit": 100, **params}
    total = -1
    while True:
        page = client.get("/messages", params=query).json()
        total = page["total"] if total < 0 else total
        ids += [row["message_id"] for row in page["data"]]
        if page["next_cursor"] is None:
            return ids, total
        query["cursor"] = page["next_cursor"]


def assert_exact(client: AppClient) -> None:
    """/stats, the listing, search and the filters agree with a recount of the rows."""
    rows = stored(client)
    assert client.get("/stats").json() == recount_stats(rows)
    assert all_pages(client) == ([row[0] for row in rows], len(rows))
    for q in QUERIES:
        folded = q.casefold()
        expected = [row[0] for row in rows if row[4] is not None and folded in row[4].casefold()]
        assert all_pages(client, q=q) == (expected, len(expected)), q
    for sender in SENDERS[:2]:
        expected = [row[0] for row in rows if row[1] == sender]
        assert all_pages(client, **{"from": sender}) == (expected, len(expected))
    since = "2029-12-02T12:00:00Z"
    expected = [row[0] for row in rows if row[5] >= instant_key(since)]
    assert all_pages(client, since=since) == (expected, len(expected))
    assert_feed_exact(client)
    assert_console_exact(client, rows)


def assert_feed_exact(client: AppClient) -> None:
    """The feed lists every stored row once, in position order, and nothing else."""
    expected = [
        (row[0], row[1])
        for row in client.rows("SELECT message_id, position FROM messages ORDER BY position")
    ]
    seen: list[tuple[str, int]] = []
    after = 0
    while True:
        page = client.get("/feed", params={"after": after, "limit": 1000}).json()
        seen += [(item["message_id"], item["position"]) for item in page["data"]]
        if not page["data"]:
            break
        after = page["next_after"]
    assert seen == expected


def assert_console_exact(client: AppClient, rows: list[tuple[Any, ...]]) -> None:
    """/conversations and /stats/timeline agree with a recount of `rows` (stored())."""
    senders: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:  # in (ts_key, message_id) order
        senders.setdefault(row[1], []).append(row)
    expected = sorted(
        (
            {
                "from": sender,
                "count": len(own),
                "first_ts": own[0][3],
                "last_ts": own[-1][3],
                "last_message": {
                    "message_id": own[-1][0],
                    "from": sender,
                    "to": own[-1][2],
                    "ts": own[-1][3],
                    "text": own[-1][4],
                },
            }
            for sender, own in senders.items()
        ),
        key=lambda c: (instant_key(c["last_ts"]), c["last_message"]["message_id"]),
        reverse=True,
    )
    listed: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = client.get("/conversations", params=params).json()
        listed += page["data"]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert listed == expected
    since, until = "2029-11-25T00:00:00Z", "2029-12-05T00:00:00Z"
    days: dict[str, int] = {}
    for row in rows:
        if instant_key(since) <= row[5] < instant_key(until):
            days[row[5][:10]] = days.get(row[5][:10], 0) + 1
    timeline = client.get(
        "/stats/timeline", params={"bucket": "day", "since": since, "until": until}
    ).json()
    assert {b["start"][:10]: b["count"] for b in timeline["data"] if b["count"]} == days
    assert timeline["total"] == sum(days.values())


def export_lines(client: AppClient, **params: str) -> list[dict[str, Any]]:
    response = client.get("/messages/export", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]
