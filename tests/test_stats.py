"""GET /stats (SPEC section 4)."""

from __future__ import annotations

from tests.support.clients import AppClient, message


def test_empty_store(client: AppClient) -> None:
    response = client.get("/stats")
    assert response.status_code == 200
    assert response.json() == {
        "total_messages": 0,
        "senders_count": 0,
        "messages_per_sender": [],
        "first_message_ts": None,
        "last_message_ts": None,
    }


def test_counts_senders_and_ties_by_sender(client: AppClient) -> None:
    senders = ["+300000000003"] * 2 + ["+100000000001"] * 2 + ["+200000000002"] * 3
    for index, sender in enumerate(senders):
        assert (
            client.post_signed(message(message_id=f"m{index}", **{"from": sender})).status_code
            == 200
        )
    body = client.get("/stats").json()
    assert body["total_messages"] == 7
    assert body["senders_count"] == 3
    assert body["messages_per_sender"] == [
        {"from": "+200000000002", "count": 3},
        {"from": "+100000000001", "count": 2},
        {"from": "+300000000003", "count": 2},
    ]


def test_duplicates_do_not_count(client: AppClient) -> None:
    for _ in range(3):
        client.post_signed(message())
    body = client.get("/stats").json()
    assert body["total_messages"] == 1
    assert body["messages_per_sender"] == [{"from": "+919876543210", "count": 1}]


def test_top_ten_cut(client: AppClient) -> None:
    # Sender i sends i+1 messages: the ten busiest are senders 11 down to 2.
    n = 0
    for i in range(12):
        for _ in range(i + 1):
            client.post_signed(message(message_id=f"m{n}", **{"from": f"+1555000{i:04}"}))
            n += 1
    body = client.get("/stats").json()
    assert body["total_messages"] == n
    assert body["senders_count"] == 12
    top = body["messages_per_sender"]
    assert len(top) == 10
    assert [row["count"] for row in top] == list(range(12, 2, -1))
    assert top[0]["from"] == "+15550000011"


def test_first_and_last_are_instants_echoed_as_received(client: AppClient) -> None:
    for mid, ts in [
        ("a", "2025-01-15T10:00:00.5Z"),
        ("b", "2025-01-15T10:00:00Z"),
        ("c", "2025-01-15T10:00:00.05Z"),
        ("d", "2025-01-14T23:59:59.999999999Z"),
        ("e", "2025-01-15T10:00:00.50001Z"),
    ]:
        client.post_signed(message(message_id=mid, ts=ts))
    body = client.get("/stats").json()
    assert body["first_message_ts"] == "2025-01-14T23:59:59.999999999Z"
    assert body["last_message_ts"] == "2025-01-15T10:00:00.50001Z"
