"""One message by id, and erasure (ADMIN_TOKENS, tombstones, audit lines), on both backends."""

from __future__ import annotations

import json

import pytest

from app.storage.lifecycle import tombstone_hash
from tests.support.clients import AppClient, MakeClient, json_lines, message
from tests.support.lifecycle import (
    ADMIN,
    ADMIN_HEADERS,
    ADMIN_TOKENS,
    OTHER_ADMIN_TOKEN,
    assert_exact,
    corpus,
    lifecycle_settings,
    post_all,
)

ALICE = "+919876543210"
BOB = "+14155550100"
CAROL = "+447700900123"


@pytest.fixture
def admin_client(make_client: MakeClient, database_url: str) -> AppClient:
    return make_client(lifecycle_settings(database_url))


@pytest.fixture
def seeded(admin_client: AppClient) -> AppClient:
    post_all(admin_client, corpus(120))
    return admin_client


def lifecycle_key(client: AppClient) -> bytes:
    key: bytes = client.rows("SELECT key FROM lifecycle_key")[0][0]
    return bytes(key)


def test_get_one_message_by_id(client: AppClient) -> None:
    client.post_signed(message(message_id="m1", text=None))
    response = client.get("/messages/m1")
    assert response.status_code == 200
    body = response.json()
    received = body.pop("received_at")
    assert body == {
        "message_id": "m1",
        "from": ALICE,
        "to": BOB,
        "ts": "2025-01-15T10:00:00Z",
        "text": None,
    }
    assert received == client.rows("SELECT created_at FROM messages")[0][0]
    assert client.get("/messages/m2").status_code == 404
    assert client.get("/messages/m2").json() == {"detail": "message not found"}


@pytest.mark.parametrize(
    ("message_id", "path"),
    [
        ("a/b", "/messages/a/b"),
        ("a/b", "/messages/a%2Fb"),
        ("wamid.HBg/LMTIz==", "/messages/wamid.HBg/LMTIz%3D%3D"),
        ("sp ace", "/messages/sp%20ace"),
        ("?", "/messages/%3F"),
        ("+919876543210", "/messages/+919876543210"),
        ("日本", "/messages/%E6%97%A5%E6%9C%AC"),
        ("trailing/", "/messages/trailing/"),
    ],
)
def test_ids_with_slashes_and_reserved_characters_are_reachable(
    make_client: MakeClient, message_id: str, path: str
) -> None:
    client = make_client(lifecycle_settings("sqlite:///:memory:"))
    client.post_signed(message(message_id=message_id))
    client.post_signed(message(message_id="other"))
    assert client.get(path).json()["message_id"] == message_id
    assert client.delete(path, headers=ADMIN_HEADERS).json() == {"deleted": 1, "tombstones": 1}
    assert client.rows() == [("other",)]


def test_an_id_named_export_is_exported_and_erasable_but_not_got_by_id(
    admin_client: AppClient,
) -> None:
    admin_client.post_signed(message(message_id="export"))
    response = admin_client.get("/messages/export")
    assert response.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line)["message_id"] for line in response.text.splitlines()] == ["export"]
    assert admin_client.delete("/messages/export", headers=ADMIN_HEADERS).status_code == 200
    assert admin_client.rows() == []


@pytest.mark.parametrize("path", ["/messages/", "/messages/" + "x" * 257])
def test_ids_that_cannot_exist_are_404(admin_client: AppClient, path: str) -> None:
    assert admin_client.get(path).status_code == 404
    assert admin_client.delete(path, headers=ADMIN_HEADERS).status_code == 404


def test_a_nul_in_the_id_is_404_on_every_backend(admin_client: AppClient) -> None:
    assert admin_client.get("/messages/a%00b").status_code == 404
    assert admin_client.delete("/messages/a%00b", headers=ADMIN_HEADERS).status_code == 404


def test_without_admin_tokens_the_erasure_endpoints_do_not_exist(client: AppClient) -> None:
    client.post_signed(message(message_id="m1"))
    for path in ["/messages/m1", f"/numbers/{ALICE}", "/numbers/not-a-number"]:
        response = client.delete(path, headers=ADMIN_HEADERS)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "Not Found"}
    assert client.rows() == [("m1",)]
    paths = client.get("/openapi.json").json()["paths"]
    assert "/messages/{message_id}" in paths
    assert "/numbers/{e164}" in paths  # documented, with when it answers 404


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "PATCH", "POST"])
def test_another_method_on_one_message_names_both_of_its_methods(
    admin_client: AppClient, method: str
) -> None:
    # Two routes share the path: the 405 must not name only the first one's GET.
    admin_client.post_signed(message(message_id="m1"))
    response = admin_client.request(method, "/messages/m1", headers=ADMIN_HEADERS)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, DELETE"
    # The export's path documents GET alone.
    response = admin_client.request(method, "/messages/export", headers=ADMIN_HEADERS)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert admin_client.rows() == [("m1",)]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic YWxpY2U6eA==",
        "Bearer alice-0123456789abcdeX",
        "bearer alice-0123456789abcde",
        f"Bearer {ADMIN_TOKENS}",
    ],
)
def test_erasure_needs_an_admin_token(admin_client: AppClient, authorization: str | None) -> None:
    admin_client.post_signed(message(message_id="m1"))
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ["/messages/m1", f"/numbers/{ALICE}", "/numbers/garbage"]:
        response = admin_client.delete(path, headers=headers)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == 'Bearer realm="webhook-receiver"'
    assert admin_client.rows() == [("m1",)]


def test_two_authorization_headers_are_refused(admin_client: AppClient) -> None:
    admin_client.post_signed(message(message_id="m1"))
    response = admin_client.delete(
        "/messages/m1",
        headers=[("Authorization", f"Bearer {OTHER_ADMIN_TOKEN}"), ("Authorization", "x")],
    )
    assert response.status_code == 401


def test_erasing_a_message_leaves_a_tombstone_that_refuses_its_redelivery(
    seeded: AppClient,
) -> None:
    body = seeded.get("/messages/m00007").json()
    response = seeded.delete("/messages/m00007", headers=ADMIN_HEADERS)
    assert response.status_code == 200
    assert response.json() == {"deleted": 1, "tombstones": 1}
    assert seeded.get("/messages/m00007").status_code == 404
    assert_exact(seeded)
    hashed = tombstone_hash(lifecycle_key(seeded), "m00007")
    assert seeded.rows("SELECT hash, expires_at FROM tombstones") == [(hashed, None)]

    duplicates = seeded.metric("webhook_requests_total", result="duplicate")
    body.pop("received_at")
    replay = seeded.post_signed(body)
    assert replay.status_code == 200
    assert replay.json() == {"status": "ok"}
    assert seeded.get("/messages/m00007").status_code == 404
    assert seeded.metric("webhook_requests_total", result="duplicate") == duplicates + 1
    assert seeded.metric("webhook_messages_erased_total", kind="message") == 1

    # Erasing it again finds nothing, and says so.
    again = seeded.delete("/messages/m00007", headers=ADMIN_HEADERS)
    assert again.status_code == 404
    assert seeded.metric("webhook_messages_erased_total", kind="message") == 1


def test_each_erasure_writes_one_audit_line_without_the_target_in_clear(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient, database_url: str
) -> None:
    # The client is built here, once capsys captures: its log handler writes there.
    seeded = make_client(lifecycle_settings(database_url))
    post_all(seeded, corpus(120))
    capsys.readouterr()
    seeded.delete("/messages/m00003", headers={"X-Request-ID": "erase-1", **ADMIN_HEADERS})
    seeded.delete(f"/numbers/{CAROL}", headers={"X-Request-ID": "erase-2", **ADMIN_HEADERS})
    seeded.delete("/messages/never-was", headers={"Authorization": f"Bearer {OTHER_ADMIN_TOKEN}"})
    captured = capsys.readouterr().out
    lines = json_lines(captured)
    audits = [line for line in lines if line.get("logger") == "app.audit"]
    key = lifecycle_key(seeded)
    assert [
        {k: v for k, v in line.items() if k not in ("ts", "deleted", "tombstones")}
        for line in audits
    ] == [
        {
            "level": "WARNING",
            "logger": "app.audit",
            "msg": "erasure",
            "event": "erasure",
            "actor": ADMIN,
            "kind": "message",
            "target": tombstone_hash(key, "m00003").hex(),
            "request_id": "erase-1",
        },
        {
            "level": "WARNING",
            "logger": "app.audit",
            "msg": "erasure",
            "event": "erasure",
            "actor": ADMIN,
            "kind": "number",
            "target": audits[1]["target"],
            "request_id": "erase-2",
        },
        {
            "level": "WARNING",
            "logger": "app.audit",
            "msg": "erasure",
            "event": "erasure",
            "actor": "ci",
            "kind": "message",
            "target": tombstone_hash(key, "never-was").hex(),
            "request_id": audits[2]["request_id"],
        },
    ]
    assert (audits[0]["deleted"], audits[0]["tombstones"]) == (1, 1)
    assert audits[1]["deleted"] == audits[1]["tombstones"] > 0
    assert (audits[2]["deleted"], audits[2]["tombstones"]) == (0, 0)
    # Neither the number nor an erased id, in any line; nor a token.
    for secret in [CAROL, CAROL[1:], "m00003", "never-was", ADMIN_TOKENS.split(":")[1]]:
        assert secret not in captured
    access = [line for line in lines if line.get("logger") == "app.access"]
    assert {line["path"] for line in access} == {"/messages/{message_id:path}", "/numbers/{e164}"}


def test_erasing_a_number_removes_it_as_sender_and_as_recipient(seeded: AppClient) -> None:
    rows = seeded.rows("SELECT message_id, from_msisdn, to_msisdn FROM messages")
    gone = sorted(r[0] for r in rows if CAROL in (r[1], r[2]))
    assert any(r[1] == CAROL for r in rows)
    assert any(r[2] == CAROL for r in rows)
    response = seeded.delete(f"/numbers/{CAROL}", headers=ADMIN_HEADERS)
    assert response.status_code == 200
    assert response.json() == {"deleted": len(gone), "tombstones": len(gone)}
    left = seeded.rows(
        f"SELECT message_id FROM messages WHERE from_msisdn = '{CAROL}' OR to_msisdn = '{CAROL}'"
    )
    assert left == []
    assert len(seeded.rows()) == len(rows) - len(gone)
    assert_exact(seeded)
    assert seeded.metric("webhook_messages_erased_total", kind="number") == len(gone)
    # Every erased id is refused from now on; a new message with the number is not.
    for message_id in gone[:5]:
        seeded.post_signed(message(message_id=message_id, **{"from": CAROL}))
    seeded.post_signed(message(message_id="new-after", **{"from": CAROL}))
    assert [r[0] for r in seeded.rows() if r[0] in gone] == []
    assert seeded.get("/messages/new-after").status_code == 200
    # Again: nothing left to erase but the new one.
    assert seeded.delete(f"/numbers/{CAROL}", headers=ADMIN_HEADERS).json() == {
        "deleted": 1,
        "tombstones": 1,
    }


@pytest.mark.parametrize("path", ["/numbers/%2B447700900123", "/numbers/%20447700900123"])
def test_a_number_may_come_percent_encoded(admin_client: AppClient, path: str) -> None:
    admin_client.post_signed(message(message_id="m1", to=CAROL))
    assert admin_client.delete(path, headers=ADMIN_HEADERS).json()["deleted"] == 1


@pytest.mark.parametrize(
    "number", ["447700900123", "+0447700900123", "+1", "+1234567890123456", "+44 7700", "x"]
)
def test_an_admin_gets_422_for_a_malformed_number(admin_client: AppClient, number: str) -> None:
    response = admin_client.delete(f"/numbers/{number}", headers=ADMIN_HEADERS)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "e164"]
    assert number not in response.text


def test_read_endpoints_of_the_lifecycle_are_documented(client: AppClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/messages/{message_id}"]) == {"get", "delete"}
    assert "get" in paths["/messages/export"]


def test_the_lifecycle_counters_exist_from_start_up(client: AppClient) -> None:
    text = client.get("/metrics").text
    for line in [
        "webhook_messages_purged_total 0.0",
        'webhook_messages_erased_total{kind="message"} 0.0',
        'webhook_messages_erased_total{kind="number"} 0.0',
        "webhook_tombstones_expired_total 0.0",
    ]:
        assert line in text.splitlines()


def test_an_erased_message_leaves_no_refused_delivery_behind(admin_client: AppClient) -> None:
    admin_client.post_signed(message(message_id="m1", text="first"))
    admin_client.post_signed(message(message_id="m1", text="second"))  # a conflict
    admin_client.post_signed(message(message_id="m2", to=CAROL))
    admin_client.post_signed(message(message_id="m2", to=CAROL, text="other"))
    assert admin_client.portal is not None
    recorder = admin_client.app_state["recorder"]
    admin_client.portal.call(recorder.flush, admin_client.store)
    assert sorted(admin_client.rows("SELECT message_id FROM rejections")) == [("m1",), ("m2",)]
    assert admin_client.delete("/messages/m1", headers=ADMIN_HEADERS).status_code == 200
    assert admin_client.rows("SELECT message_id FROM rejections") == [("m2",)]
    assert admin_client.delete(f"/numbers/{CAROL}", headers=ADMIN_HEADERS).status_code == 200
    assert admin_client.rows("SELECT message_id FROM rejections") == []
