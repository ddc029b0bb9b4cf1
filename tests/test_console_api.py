"""The console's APIs through the real app, on every backend: /messages additions,
/conversations, /stats/timeline, /rejections, conflicts and the new counter."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest

from app.metrics import REJECTION_REASONS, WEBHOOK_RESULTS
from app.rejections import QUEUE_SIZE
from tests.support.clients import SECRET, AppClient, MakeClient, json_lines, message
from tests.support.meta import PATH, batch, change, text_message
from tests.test_whatsapp import enabled
from tests.test_whatsapp import post as post_batch

ALICE = "+919876543210"
BOB = "+14155550100"
CAROL = "+447700900123"


def seed(client: AppClient, *bodies: dict[str, Any]) -> None:
    for body in bodies:
        assert client.post_signed(body).status_code == 200, body


def ids(response: Any) -> list[str]:
    return [row["message_id"] for row in response.json()["data"]]


def rejections(client: AppClient) -> list[dict[str, Any]]:
    """What /rejections lists once the recorder has written what waits."""
    assert client.portal is not None
    client.portal.call(client.app_state["recorder"].flush, client.store)
    response = client.get("/rejections")
    assert response.status_code == 200
    data: list[dict[str, Any]] = response.json()["data"]
    return data


@pytest.fixture
def thread(client: AppClient) -> AppClient:
    seed(
        client,
        message(message_id="m1", ts="2025-01-15T10:00:00Z", text="Hello Bob"),
        message(message_id="m2", ts="2025-01-15T09:00:00Z", text="Earlier"),
        message(message_id="m3", **{"from": BOB, "to": ALICE}, ts="2025-01-15T11:00:00Z"),
        message(
            message_id="m4", **{"from": CAROL, "to": "+14155550199"}, ts="2025-01-16T08:00:00Z"
        ),
        message(message_id="m5", ts="2025-01-16T09:30:00.5Z", text="later"),
        message(message_id="m6", ts="2025-01-16T09:30:00.5Z", text="same instant"),
    )
    return client


# GET /messages: to, until, order


def test_to_filters_by_recipient_with_the_leading_space_rule(thread: AppClient) -> None:
    assert ids(thread.get("/messages?to=%2B14155550199")) == ["m4"]
    assert ids(thread.get("/messages", params={"to": " 919876543210"})) == ["m3"]
    response = thread.get("/messages?to=+14155550100&from=+919876543210")
    assert ids(response) == ["m2", "m1", "m5", "m6"]
    assert response.json()["total"] == 4


def test_until_is_exclusive_and_compares_instants(thread: AppClient) -> None:
    assert ids(thread.get("/messages?until=2025-01-15T11:00:00Z")) == ["m2", "m1"]
    assert ids(thread.get("/messages?until=2025-01-16T09:30:00.500000001Z"))[-2:] == ["m5", "m6"]
    assert ids(thread.get("/messages?until=2025-01-16T09:30:00.50Z"))[-1] == "m4"
    response = thread.get("/messages?since=2025-01-15T10:00:00Z&until=2025-01-16T00:00:00Z")
    assert (ids(response), response.json()["total"]) == (["m1", "m3"], 2)


def test_order_desc_is_newest_first_and_its_cursors_continue_newest_first(
    thread: AppClient,
) -> None:
    newest = thread.get("/messages?order=desc")
    assert ids(newest) == ["m6", "m5", "m4", "m3", "m1", "m2"]
    seen: list[str] = []
    url = "/messages?order=desc&limit=2"
    while True:
        page = thread.get(url).json()
        assert page["total"] == 6
        seen += [row["message_id"] for row in page["data"]]
        if page["next_cursor"] is None:
            break
        url = f"/messages?order=desc&limit=2&cursor={page['next_cursor']}"
    assert seen == ids(newest)
    # The default is the contract's order, and its cursors still work.
    assert ids(thread.get("/messages?order=asc")) == ids(thread.get("/messages"))
    cursor = thread.get("/messages?limit=2").json()["next_cursor"]
    assert ids(thread.get(f"/messages?limit=2&cursor={cursor}")) == ["m3", "m4"]


def test_order_desc_combines_with_filters(thread: AppClient) -> None:
    response = thread.get(f"/messages?order=desc&from={ALICE}&until=2025-01-16T00:00:00Z&limit=1")
    assert ids(response) == ["m1"]
    cursor = response.json()["next_cursor"]
    more = thread.get(
        f"/messages?order=desc&from={ALICE}&until=2025-01-16T00:00:00Z&limit=1&cursor={cursor}"
    )
    assert (ids(more), more.json()["next_cursor"]) == (["m2"], None)


def test_a_cursor_is_bound_to_its_order(thread: AppClient) -> None:
    desc = thread.get("/messages?order=desc&limit=1").json()["next_cursor"]
    asc = thread.get("/messages?limit=1").json()["next_cursor"]
    for url in (f"/messages?cursor={desc}", f"/messages?order=desc&cursor={asc}"):
        response = thread.get(url)
        assert response.status_code == 422
        (error,) = response.json()["detail"]
        assert error["loc"] == ["query", "cursor"]
        assert "order=" in error["msg"]


@pytest.mark.parametrize(
    "query",
    [
        "to=14155550100",
        "to=%2B0123",
        "until=2025-02-30T00:00:00Z",
        "until=yesterday",
        "order=newest",
        "order=DESC",
    ],
)
def test_bad_new_parameters_are_422(client: AppClient, query: str) -> None:
    response = client.get(f"/messages?{query}")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "query"


# GET /conversations


def test_conversations_most_recent_first_with_their_last_message(thread: AppClient) -> None:
    body = thread.get("/conversations").json()
    assert body["next_cursor"] is None
    assert [(c["from"], c["count"]) for c in body["data"]] == [(ALICE, 4), (CAROL, 1), (BOB, 1)]
    alice = body["data"][0]
    assert alice["first_ts"] == "2025-01-15T09:00:00Z"
    assert alice["last_ts"] == "2025-01-16T09:30:00.5Z"
    # Equal instants: the greater message_id is the last, as /messages lists them.
    assert alice["last_message"] == {
        "message_id": "m6",
        "from": ALICE,
        "to": BOB,
        "ts": "2025-01-16T09:30:00.5Z",
        "text": "same instant",
    }


def test_conversations_page_by_cursor_and_reorder_on_arrival(thread: AppClient) -> None:
    first = thread.get("/conversations?limit=2").json()
    rest = thread.get(f"/conversations?limit=2&cursor={first['next_cursor']}").json()
    assert [c["from"] for c in first["data"] + rest["data"]] == [ALICE, CAROL, BOB]
    assert rest["next_cursor"] is None
    seed(thread, message(message_id="m9", **{"from": BOB}, ts="2025-01-17T00:00:00Z"))
    assert [c["from"] for c in thread.get("/conversations").json()["data"]] == [BOB, ALICE, CAROL]


def test_conversations_refuse_a_cursor_they_did_not_issue(thread: AppClient) -> None:
    asc = thread.get("/messages?limit=1").json()["next_cursor"]
    for cursor in (asc, "nonsense!", "x" * 2000):
        assert thread.get(f"/conversations?cursor={cursor}").status_code == 422
    assert thread.get("/conversations?limit=0").status_code == 422
    assert thread.get("/conversations?limit=101").status_code == 422


def test_conversations_on_an_empty_store(client: AppClient) -> None:
    assert client.get("/conversations").json() == {"data": [], "limit": 50, "next_cursor": None}


# GET /stats/timeline


def test_timeline_by_hour_has_every_bucket(thread: AppClient) -> None:
    response = thread.get(
        "/stats/timeline?bucket=hour&since=2025-01-15T08:30:00Z&until=2025-01-15T11:00:00Z"
    )
    assert response.status_code == 200
    assert response.json() == {
        "bucket": "hour",
        "since": "2025-01-15T08:00:00Z",
        "until": "2025-01-15T11:00:00Z",
        "total": 2,
        "data": [
            {"start": "2025-01-15T08:00:00Z", "count": 0},
            {"start": "2025-01-15T09:00:00Z", "count": 1},
            {"start": "2025-01-15T10:00:00Z", "count": 1},
        ],
    }


def test_timeline_by_day_sums_the_hours(thread: AppClient) -> None:
    body = thread.get(
        "/stats/timeline?bucket=day&since=2025-01-14T12:00:00Z&until=2025-01-16T00:00:01Z"
    ).json()
    assert [(d["start"], d["count"]) for d in body["data"]] == [
        ("2025-01-14T00:00:00Z", 0),
        ("2025-01-15T00:00:00Z", 3),
        ("2025-01-16T00:00:00Z", 3),
    ]
    assert body["total"] == 6


def test_timeline_defaults_end_now(client: AppClient) -> None:
    body = client.get("/stats/timeline").json()
    assert (body["bucket"], len(body["data"]), body["total"]) == ("day", 30, 0)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert body["data"][-1]["start"] == f"{today}T00:00:00Z"
    assert len(client.get("/stats/timeline?bucket=hour").json()["data"]) == 48


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ("bucket=week", "bucket"),
        ("since=2025-01-15T10:00:00Z&until=2025-01-15T10:00:00Z", "since"),
        ("since=2025-01-16T00:00:00Z&until=2025-01-15T00:00:00Z", "since"),
        ("bucket=hour&since=2024-01-01T00:00:00Z&until=2025-06-01T00:00:00Z", "since"),
        ("since=2025-13-01T00:00:00Z", "since"),
        ("until=not-a-date", "until"),
    ],
)
def test_timeline_refuses_what_it_cannot_serve(client: AppClient, query: str, loc: str) -> None:
    response = client.get(f"/stats/timeline?{query}")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", loc]


def test_a_year_of_days_is_allowed(client: AppClient) -> None:
    body = client.get(
        "/stats/timeline?bucket=day&since=2024-01-01T00:00:00Z&until=2025-01-01T00:00:00Z"
    ).json()
    assert len(body["data"]) == 366


# GET /rejections: every reason, from real requests


def standard_headers(sent_at: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "webhook-id": "msg_1",
        "webhook-timestamp": str(sent_at),
        "webhook-signature": "v1," + base64.b64encode(bytes(32)).decode(),
    }


def test_every_refusal_is_listed_with_its_reason(client: AppClient) -> None:
    body = json.dumps(message()).encode()
    signed = {"X-Signature": "sha256=" + "0" * 64}
    client.post("/webhook", content=body)
    client.post("/webhook", content=body, headers={"X-Signature": "not hex"})
    client.post("/webhook", content=body, headers=signed)
    client.post("/webhook", content=body, headers=standard_headers(int(time.time()) - 3600))
    client.post("/webhook", content=body, headers=standard_headers(int(time.time()) + 3600))
    client.post("/webhook", content=b"x" * 70_000, headers=signed)
    client.post_signed(body, headers={"Content-Type": "text/plain"})
    client.post_signed(b"{not json")
    client.post_signed(message(ts="2025-01-15 10:00:00"))
    listed = rejections(client)
    assert [r["reason"] for r in reversed(listed)] == [
        "missing_signature",
        "malformed_signature",
        "no_key_matched",
        "timestamp_too_old",
        "timestamp_in_future",
        "body_too_large",
        "unsupported_media_type",
        "invalid_json",
        "invalid_field",
    ]
    assert listed[0]["field"] == "ts"
    assert {r["endpoint"] for r in listed} == {"/webhook"}
    assert {r["remote"] for r in listed} == {"testclient"}
    assert listed[3]["body_bytes"] == 70_000
    assert listed[-1]["body_bytes"] == len(body)
    for reason in REJECTION_REASONS[:-1]:
        assert client.metric("webhook_rejections_total", reason=reason) == 1
    assert client.metric("webhook_rejections_total", reason="conflict") == 0
    # Nothing of the body, the headers or the secret.
    dumped = json.dumps(listed)
    for secret_or_value in (SECRET, "Hello", "not hex", "v1,", "0" * 64, ALICE):
        assert secret_or_value not in dumped


def test_each_refusal_names_its_request(client: AppClient) -> None:
    response = client.post("/webhook", content=b"{}", headers={"X-Request-ID": "trace-me-1"})
    assert response.status_code == 401
    (listed,) = rejections(client)
    assert listed["request_id"] == "trace-me-1"
    assert listed["at"].endswith("Z")


def test_every_reason_and_the_result_lines_exist_at_zero_from_start_up(client: AppClient) -> None:
    text = client.get("/metrics").text
    for reason in REJECTION_REASONS:
        assert f'webhook_rejections_total{{reason="{reason}"}} 0.0' in text
    for result in WEBHOOK_RESULTS:
        assert f'webhook_requests_total{{result="{result}"}} 0.0' in text
    assert "webhook_rejections_dropped_total 0.0" in text


def test_only_the_newest_rejections_are_kept(make_client: MakeClient) -> None:
    client = make_client(rejections_kept=3)
    for index in range(7):
        client.post("/webhook", content=b"{}", headers={"X-Request-ID": f"r{index}"})
        rejections(client)
    assert [r["request_id"] for r in rejections(client)] == ["r6", "r5", "r4"]
    assert client.metric("webhook_rejections_total", reason="missing_signature") == 7


def test_rejections_page_by_cursor(client: AppClient) -> None:
    for index in range(5):
        client.post("/webhook", content=b"{}", headers={"X-Request-ID": f"p{index}"})
    rejections(client)
    first = client.get("/rejections?limit=2").json()
    second = client.get(f"/rejections?limit=2&cursor={first['next_cursor']}").json()
    third = client.get(f"/rejections?limit=2&cursor={second['next_cursor']}").json()
    pages = [first, second, third]
    assert [r["request_id"] for p in pages for r in p["data"]] == [
        f"p{i}" for i in range(4, -1, -1)
    ]
    assert third["next_cursor"] is None
    for bad in ("0", "-1", "abc", "1" * 30):
        assert client.get(f"/rejections?cursor={bad}").status_code == 422


# Conflicts: a message_id reused with different content


def test_a_conflicting_redelivery_is_200_but_recorded_and_logged(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient, database_url: str
) -> None:
    # Built here, after capsys: the app's log handler writes to the stdout of its start.
    client = make_client(database_url=database_url)
    seed(client, message(message_id="c1", text="original"))
    capsys.readouterr()
    response = client.post_signed(message(message_id="c1", text="rewritten", to=CAROL))
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    (listed,) = rejections(client)
    assert (listed["reason"], listed["field"], listed["message_id"]) == (
        "conflict",
        "to,text",
        "c1",
    )
    assert listed["request_id"] == response.headers["x-request-id"]
    assert client.get("/messages").json()["data"][0]["text"] == "original"
    assert client.metric("webhook_requests_total", result="duplicate") == 1
    assert client.metric("webhook_rejections_total", reason="conflict") == 1
    (line,) = [
        line for line in json_lines(capsys.readouterr().out) if line["logger"] == "app.rejections"
    ]
    assert (line["level"], line["message_id"], line["fields"]) == ("WARNING", "c1", "to,text")
    assert "rewritten" not in json.dumps(line)
    assert "original" not in json.dumps(line)


def test_a_faithful_redelivery_is_no_conflict(client: AppClient) -> None:
    seed(client, message(message_id="c1", ts="2025-01-15T10:00:00.5Z"))
    # The same instant written another way is the same ts.
    for ts in ("2025-01-15T10:00:00.5Z", "2025-01-15T10:00:00.500Z"):
        assert client.post_signed(message(message_id="c1", ts=ts)).status_code == 200
    assert rejections(client) == []
    assert client.metric("webhook_rejections_total", reason="conflict") == 0


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"from": CAROL}, "from"),
        ({"ts": "2025-01-15T10:00:01Z"}, "ts"),
        ({"text": None}, "text"),
        ({"text": "hello"}, "text"),
    ],
)
def test_each_compared_field_is_named(
    client: AppClient, change: dict[str, Any], fields: str
) -> None:
    seed(client, message(message_id="c1"))
    client.post_signed(message(message_id="c1", **change))
    assert [(r["reason"], r["field"]) for r in rejections(client)] == [("conflict", fields)]


# WhatsApp: the same reasons


def test_whatsapp_refusals_and_skipped_messages_are_listed(make_client: MakeClient) -> None:
    wa = enabled(make_client)
    assert post_batch(wa, batch(change([])), signature="sha256=" + "0" * 64).status_code == 401
    assert post_batch(wa, b"[1]").status_code == 422
    bad = text_message("wamid.bad", sender="0123")
    assert post_batch(wa, batch(change([text_message("wamid.ok"), bad]))).status_code == 200
    listed = rejections(wa)
    assert [(r["reason"], r["field"]) for r in reversed(listed)] == [
        ("no_key_matched", None),
        ("invalid_json", None),
        ("invalid_field", "entry[0].changes[0].value.messages[1].from"),
    ]
    assert {r["endpoint"] for r in listed} == {PATH}


# The pages


def test_the_console_page_has_a_strict_policy(client: AppClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self';" in policy
    assert "style-src 'self';" in policy
    assert "frame-ancestors 'none'" in policy
    assert "<script" in response.text
    assert "http" not in response.text.split("<body", 1)[1]


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_load_only_local_assets(client: AppClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert "script-src 'self';" in response.headers["content-security-policy"]
    sources = [part.split('"')[1] for part in response.text.split("src=")[1:]]
    assert sources
    assert all(src.startswith("static/") for src in sources)
    for src in sources:
        assert client.get("/" + src).status_code == 200


def test_pages_can_be_turned_off(make_client: MakeClient) -> None:
    client = make_client(console_enabled=False, docs_enabled=False)
    for path in ("/", "/docs", "/redoc", "/openapi.json", "/static/console/console.js"):
        assert client.get(path).status_code == 404
    assert client.get("/conversations").status_code == 200


def test_the_new_operations_are_documented(client: AppClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/conversations", "/stats/timeline", "/rejections"} <= set(paths)
    params = {p["name"] for p in paths["/messages"]["get"]["parameters"]}
    assert {"to", "until", "order", "cursor"} <= params


# The recorder: bounded, off the request path


def test_a_full_queue_drops_the_oldest_and_counts_them(client: AppClient) -> None:
    recorder = client.app_state["recorder"]
    rejections(client)
    # Hold the task off, so that everything waits in the queue.
    assert client.portal is not None
    client.portal.call(recorder._flushing.acquire)
    try:
        for index in range(1, QUEUE_SIZE + 6):
            client.post("/webhook", content=b"{}", headers={"X-Request-ID": f"q{index}"})
    finally:
        recorder._flushing.release()
    listed = [r["request_id"] for r in rejections(client)]
    assert listed[0] == f"q{QUEUE_SIZE + 5}"
    assert client.metric("webhook_rejections_dropped_total") == 5
    assert client.metric("webhook_rejections_total", reason="missing_signature") == QUEUE_SIZE + 5
    # The oldest kept is the first that was not dropped.
    page = client.get("/rejections?limit=100").json()
    kept = page["data"]
    while page["next_cursor"]:
        page = client.get(f"/rejections?limit=100&cursor={page['next_cursor']}").json()
        kept += page["data"]
    assert [r["request_id"] for r in kept][-1] == "q6"
    assert len(kept) == QUEUE_SIZE


def test_a_stuck_rejection_write_does_not_hold_up_deliveries(client: AppClient) -> None:
    store = client.store
    written = store.record_rejections
    assert client.portal is not None
    release = client.portal.call(anyio_event)

    async def stuck(refusals: Any, keep: int) -> None:
        await release.wait()
        await written(refusals, keep)

    store.record_rejections = stuck  # type: ignore[method-assign]
    try:
        for _ in range(20):
            assert client.post("/webhook", content=b"{}").status_code == 401
        assert client.post_signed(message()).status_code == 200
        assert not release.is_set()  # every answer came while the write was stuck
    finally:
        client.portal.call(release.set)
        store.record_rejections = written  # type: ignore[method-assign]
    assert len(rejections(client)) == 20


async def anyio_event() -> asyncio.Event:
    return asyncio.Event()
