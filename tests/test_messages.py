"""GET /messages: paging, filters, ordering and bounds (SPEC section 3)."""

from __future__ import annotations

from typing import Any

import pytest

from app.models import ISO_UTC
from tests.support.clients import AppClient, MakeClient, message

ALICE = "+919876543210"
BOB = "+14155550100"
CAROL = "+447700900123"


def seed(client: AppClient, *messages: dict[str, Any]) -> None:
    for body in messages:
        assert client.post_signed(body).status_code == 200, body


def ids(response: Any) -> list[str]:
    return [row["message_id"] for row in response.json()["data"]]


@pytest.fixture
def conversation(client: AppClient) -> AppClient:
    seed(
        client,
        message(message_id="m1", ts="2025-01-15T10:00:00Z", text="Hello Bob"),
        message(message_id="m2", ts="2025-01-15T09:00:00Z", text="Earlier"),
        message(
            message_id="m3",
            **{"from": BOB, "to": ALICE},
            ts="2025-01-15T11:00:00Z",
            text="hello back",
        ),
        message(message_id="m4", **{"from": CAROL}, ts="2025-01-16T08:00:00Z", text=None),
        message(message_id="m5", ts="2025-01-16T09:30:00Z", text="100% sure_thing"),
    )
    return client


def test_default_page_shape(conversation: AppClient) -> None:
    response = conversation.get("/messages")
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 5
    assert body["limit"] == 50
    assert body["offset"] == 0
    assert body["next_cursor"] is None
    first = body["data"][0]
    assert ISO_UTC.fullmatch(first.pop("received_at"))  # the server's, in ts form
    assert first == {
        "message_id": "m2",
        "from": ALICE,
        "to": BOB,
        "ts": "2025-01-15T09:00:00Z",
        "text": "Earlier",
    }
    assert ids(response) == ["m2", "m1", "m3", "m4", "m5"]


def test_null_text_comes_back_as_null(conversation: AppClient) -> None:
    rows = {row["message_id"]: row for row in conversation.get("/messages").json()["data"]}
    assert rows["m4"]["text"] is None


def test_limit_and_offset_page_through_in_order(conversation: AppClient) -> None:
    seen = []
    for offset in range(0, 6, 2):
        response = conversation.get("/messages", params={"limit": 2, "offset": offset})
        body = response.json()
        assert body["limit"] == 2
        assert body["offset"] == offset
        assert body["total"] == 5
        seen += ids(response)
    assert seen == ["m2", "m1", "m3", "m4", "m5"]


def test_offset_past_the_end_is_an_empty_page(conversation: AppClient) -> None:
    body = conversation.get("/messages", params={"offset": 10}).json()
    assert body["data"] == []
    assert body["total"] == 5


def test_filter_by_sender_with_encoded_plus(conversation: AppClient) -> None:
    response = conversation.get(f"/messages?from=%2B{ALICE[1:]}")
    assert ids(response) == ["m2", "m1", "m5"]
    assert response.json()["total"] == 3


def test_filter_by_sender_with_literal_plus(conversation: AppClient) -> None:
    # An unencoded '+' arrives as a space; it still means the E.164 plus.
    response = conversation.get(f"/messages?from=+{ALICE[1:]}")
    assert response.status_code == 200
    assert ids(response) == ["m2", "m1", "m5"]


def test_filter_by_sender_matches_exactly(conversation: AppClient) -> None:
    assert conversation.get("/messages", params={"from": "+91987654321"}).json()["total"] == 0
    assert conversation.get("/messages", params={"from": "+447700900123"}).json()["total"] == 1


def test_filter_since_is_inclusive(conversation: AppClient) -> None:
    response = conversation.get("/messages", params={"since": "2025-01-15T11:00:00Z"})
    assert ids(response) == ["m3", "m4", "m5"]
    assert response.json()["total"] == 3


def test_since_compares_instants_not_strings(conversation: AppClient) -> None:
    # "...11:00:00.000Z" is the same instant as "...11:00:00Z", though it sorts after it
    # as a string.
    response = conversation.get("/messages", params={"since": "2025-01-15T11:00:00.000Z"})
    assert ids(response) == ["m3", "m4", "m5"]


def test_filter_q_is_a_case_insensitive_substring(conversation: AppClient) -> None:
    assert ids(conversation.get("/messages", params={"q": "HELLO"})) == ["m1", "m3"]
    assert ids(conversation.get("/messages", params={"q": "llo b"})) == ["m1", "m3"]
    assert ids(conversation.get("/messages", params={"q": "lo"})) == ["m1", "m3"]
    assert ids(conversation.get("/messages", params={"q": "nothing like it"})) == []


@pytest.mark.parametrize(
    ("q", "expected"), [("%", ["m5"]), ("_", ["m5"]), ("0% s", ["m5"]), ("o_b", []), ("H%o", [])]
)
def test_percent_and_underscore_in_q_are_literal(
    conversation: AppClient, q: str, expected: list[str]
) -> None:
    assert ids(conversation.get("/messages", params={"q": q})) == expected


def test_q_matches_non_ascii_case_insensitively(client: AppClient) -> None:
    seed(
        client,
        message(message_id="a", text="ПРИВЕТ мир"),
        message(message_id="b", text="Straße"),
        message(message_id="c", text="ΣΊΣΥΦΟΣ"),
    )
    assert ids(client.get("/messages", params={"q": "привет"})) == ["a"]
    assert ids(client.get("/messages", params={"q": "STRASSE"})) == ["b"]
    assert ids(client.get("/messages", params={"q": "σίσυφος"})) == ["c"]


def test_filters_combine(conversation: AppClient) -> None:
    params: dict[str, str | int] = {
        "from": ALICE,
        "since": "2025-01-15T10:00:00Z",
        "q": "e",
        "limit": 1,
    }
    response = conversation.get("/messages", params=params)
    body = response.json()
    assert ids(response) == ["m1"]
    assert body["total"] == 2
    params["offset"] = 1
    assert ids(conversation.get("/messages", params=params)) == ["m5"]


def test_equal_ts_orders_by_message_id(client: AppClient) -> None:
    seed(client, *(message(message_id=mid) for mid in ["b", "c", "a"]))
    assert ids(client.get("/messages")) == ["a", "b", "c"]


def test_fractional_seconds_order_as_instants(client: AppClient) -> None:
    seed(
        client,
        message(message_id="a", ts="2025-01-15T10:00:00.5Z"),
        message(message_id="b", ts="2025-01-15T10:00:00.123456789Z"),
        message(message_id="c", ts="2025-01-15T10:00:00Z"),
        message(message_id="d", ts="2025-01-15T10:00:00.05Z"),
        message(message_id="e", ts="2025-01-15T09:59:59.999999999Z"),
    )
    assert ids(client.get("/messages")) == ["e", "c", "d", "b", "a"]


def test_ts_and_text_come_back_exactly_as_received(client: AppClient) -> None:
    seed(client, message(ts="2025-01-15T10:00:00.100Z", text="  spaced\nnewline 👋 "))
    row = client.get("/messages").json()["data"][0]
    assert row["ts"] == "2025-01-15T10:00:00.100Z"
    assert row["text"] == "  spaced\nnewline 👋 "


def test_total_ignores_limit_and_offset(conversation: AppClient) -> None:
    body = conversation.get("/messages", params={"limit": 1, "offset": 3}).json()
    assert body["total"] == 5
    assert len(body["data"]) == 1


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": -1},
        {"limit": "ten"},
        {"limit": "1.5"},
        {"offset": -1},
        {"offset": "x"},
        {"offset": 10**12},
        {"from": "919876543210"},
        {"from": "+0123"},
        {"from": ""},
        {"since": "2025-01-15"},
        {"since": "2025-02-30T00:00:00Z"},
        {"since": "yesterday"},
        {"q": "x" * 257},
        {"cursor": "not a cursor"},
        {"cursor": "e30"},
    ],
)
def test_out_of_range_or_malformed_parameters_are_422(
    conversation: AppClient, params: dict[str, Any]
) -> None:
    response = conversation.get("/messages", params=params)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail
    assert all(set(error) == {"loc", "msg", "type"} for error in detail)
    assert detail[0]["loc"][0] == "query"


@pytest.mark.parametrize("limit", [1, 100])
def test_limit_bounds_are_accepted(conversation: AppClient, limit: int) -> None:
    assert conversation.get("/messages", params={"limit": limit}).status_code == 200


def test_cursor_pages_match_offset_pages(client: AppClient) -> None:
    seed(
        client,
        *(message(message_id=f"m{i:02}", ts=f"2025-01-15T10:00:{i % 7:02}Z") for i in range(23)),
    )
    by_offset = [
        ids(client.get("/messages", params={"limit": 5, "offset": offset}))
        for offset in range(0, 25, 5)
    ]
    by_cursor = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor:
            params["cursor"] = cursor
        body = client.get("/messages", params=params).json()
        assert body["total"] == 23
        by_cursor.append([row["message_id"] for row in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert by_cursor == by_offset


def test_cursor_respects_filters(conversation: AppClient) -> None:
    first = conversation.get("/messages", params={"from": ALICE, "limit": 1}).json()
    second = conversation.get(
        "/messages", params={"from": ALICE, "limit": 5, "cursor": first["next_cursor"]}
    ).json()
    assert [row["message_id"] for row in second["data"]] == ["m1", "m5"]
    assert second["next_cursor"] is None


def test_next_cursor_is_null_on_an_exact_last_page(conversation: AppClient) -> None:
    assert conversation.get("/messages", params={"limit": 5}).json()["next_cursor"] is None
    assert conversation.get("/messages", params={"limit": 4}).json()["next_cursor"] is not None


def test_file_database_lists_through_reader_connections(
    make_client: MakeClient, db_path: Any
) -> None:
    client = make_client(database_url=f"sqlite:///{db_path}")
    seed(client, message(message_id="x"), message(message_id="y", ts="2025-01-15T09:00:00Z"))
    assert ids(client.get("/messages")) == ["y", "x"]
    assert client.get("/messages", params={"q": "hello"}).json()["total"] == 2
