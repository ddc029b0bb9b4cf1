"""GET /feed through the app on both backends: order, paging, filters, bounds (docs/feed.md)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest

from app.models import ISO_UTC
from tests.support.clients import AppClient, MakeClient, message

ALICE = "+919876543210"
BOB = "+14155550100"


def post(client: AppClient, message_id: str, **fields: Any) -> None:
    assert client.post_signed(message(message_id=message_id, **fields)).status_code == 200


def feed(client: AppClient, query: str = "") -> dict[str, Any]:
    response = client.get("/feed" + query)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def follow(client: AppClient, query: str = "", limit: int = 2) -> list[dict[str, Any]]:
    """Every item, by looping on after = next_after as a consumer does."""
    seen: list[dict[str, Any]] = []
    after = 0
    while True:
        page = feed(client, f"?after={after}&limit={limit}{query}")
        if not page["data"]:
            assert page["next_after"] == after
            return seen
        assert page["next_after"] == page["data"][-1]["position"]
        seen += page["data"]
        after = page["next_after"]


def test_items_come_in_arrival_order_whatever_their_ts(client: AppClient) -> None:
    post(client, "late", ts="2025-01-15T12:00:00Z")
    post(client, "early", ts="2020-01-01T00:00:00Z")  # an old ts, arriving last
    post(client, "late", ts="2025-01-15T12:00:00Z")  # a redelivery gets no position
    post(client, "mid", **{"from": BOB, "to": ALICE, "text": None})
    items = follow(client)
    assert [item["message_id"] for item in items] == ["late", "early", "mid"]
    positions = [item["position"] for item in items]
    assert positions == sorted(set(positions))
    assert positions[0] >= 1
    last = items[-1]
    assert ISO_UTC.fullmatch(last.pop("received_at"))
    assert last == {
        "position": positions[-1],
        "message_id": "mid",
        "from": BOB,
        "to": ALICE,
        "ts": "2025-01-15T10:00:00Z",
        "text": None,
    }


def test_received_at_is_the_commit_time_on_messages_too(client: AppClient) -> None:
    before = time.time()
    post(client, "m1")
    after = time.time()
    listed = client.get("/messages").json()["data"][0]
    followed = feed(client)["data"][0]
    assert listed["received_at"] == followed["received_at"]
    stamp = datetime.fromisoformat(listed["received_at"].replace("Z", "+00:00")).timestamp()
    assert before - 1 <= stamp <= after + 1


def test_next_after_of_an_empty_page_is_after(client: AppClient) -> None:
    assert feed(client) == {"data": [], "next_after": 0}
    assert feed(client, "?after=12345") == {"data": [], "next_after": 12345}
    post(client, "m1")
    position = feed(client)["data"][0]["position"]
    assert feed(client, f"?after={position}") == {"data": [], "next_after": position}


def test_limit_pages_and_defaults_to_100(client: AppClient) -> None:
    for i in range(105):
        post(client, f"m{i:03d}")
    first = feed(client)
    assert len(first["data"]) == 100
    rest = feed(client, f"?after={first['next_after']}&limit=1000")
    assert [item["message_id"] for item in rest["data"]] == [f"m{i:03d}" for i in range(100, 105)]


def test_from_follows_one_sender(client: AppClient) -> None:
    for i in range(6):
        post(client, f"m{i}", **{"from": ALICE if i % 2 else BOB})
    # An unencoded '+' arrives as a space, as on /messages.
    mine = follow(client, "&from=+919876543210")
    assert [item["message_id"] for item in mine] == ["m1", "m3", "m5"]
    assert [item["message_id"] for item in follow(client, "&from=%2B14155550100")] == [
        "m0",
        "m2",
        "m4",
    ]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?after=-1", "after"),
        ("?after=x", "after"),
        ("?after=1.5", "after"),
        ("?after=9223372036854775808", "after"),
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?from=12345", "from"),
        ("?from=%2B0123", "from"),
        ("?wait=-1", "wait"),
        ("?wait=8.5", "wait"),
    ],
)
def test_bad_parameters_are_422_in_the_usual_shape(
    client: AppClient, query: str, field: str
) -> None:
    response = client.get("/feed" + query)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", field]
    assert set(error) == {"loc", "msg", "type"}


def test_a_long_poll_answers_at_once_when_there_is_something(client: AppClient) -> None:
    post(client, "m1")
    started = time.monotonic()
    assert len(feed(client, "?wait=8")["data"]) == 1
    assert time.monotonic() - started < 5


def test_a_long_poll_waits_then_answers_empty(client: AppClient) -> None:
    started = time.monotonic()
    assert feed(client, "?wait=0.3") == {"data": [], "next_after": 0}
    assert time.monotonic() - started >= 0.3


def test_the_stream_refuses_a_bad_last_event_id(client: AppClient) -> None:
    for value in ("abc", "-1", "1.5"):
        response = client.get("/feed/stream", headers={"Last-Event-ID": value})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]
    assert client.get("/feed/stream?after=-1").status_code == 422


def test_the_feed_is_in_the_openapi_document(client: AppClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/feed", "/feed/stream"} <= set(paths)


READ = "feed-read-token-0123456789"


def test_the_feed_follows_the_read_access_rule(make_client: MakeClient) -> None:
    client = make_client(read_tokens=READ)
    for path in ("/feed", "/feed?after=0&limit=10", "/feed/stream"):
        assert client.get(path).status_code == 401
    post(client, "m1")  # the senders' path stays open
    response = client.get("/feed", headers={"Authorization": f"Bearer {READ}"})
    assert [item["message_id"] for item in response.json()["data"]] == ["m1"]
