"""GET and POST /webhook/whatsapp, with payloads in the shape Meta documents."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from app.metrics import WHATSAPP_MESSAGE_RESULTS, WHATSAPP_RESULTS, WHATSAPP_STATUSES
from tests.support.clients import AppClient, MakeClient, json_lines
from tests.support.meta import (
    APP_SECRET,
    PATH,
    ROWS,
    VERIFY_TOKEN,
    batch,
    change,
    hub_signature,
    image_message,
    meta_bytes,
    status,
    text_message,
)


def enabled(make_client: MakeClient, **overrides: Any) -> AppClient:
    # Reads stay open here, deliberately: these tests read /metrics and the schema
    # freely (tests/test_access.py proves the endpoint refuses to start without a choice).
    settings = {"allow_open_reads": True, **overrides}
    return make_client(
        whatsapp_app_secret=APP_SECRET, whatsapp_verify_token=VERIFY_TOKEN, **settings
    )


@pytest.fixture
def wa(make_client: MakeClient) -> AppClient:
    return enabled(make_client)


def post(
    client: AppClient,
    payload: dict[str, Any] | bytes,
    *,
    signature: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    raw = payload if isinstance(payload, bytes) else meta_bytes(payload)
    sent = {"Content-Type": "application/json", "X-Hub-Signature-256": signature or ""}
    if signature is None:
        sent["X-Hub-Signature-256"] = hub_signature(raw)
    sent.update(headers or {})
    return client.post(PATH, content=raw, headers=sent)


def counts(client: AppClient, name: str, label: str, values: tuple[str, ...]) -> dict[str, float]:
    return {value: client.metric(name, **{label: value}) for value in values}


# Disabled until configured


@pytest.mark.parametrize(
    "configured",
    [{}, {"whatsapp_app_secret": APP_SECRET}, {"whatsapp_verify_token": VERIFY_TOKEN}],
)
def test_disabled_until_both_settings_are_set(
    make_client: MakeClient, configured: dict[str, str]
) -> None:
    client = make_client(**configured)
    handshake = client.get(
        PATH,
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
    )
    assert handshake.status_code == 404
    assert post(client, batch(change([text_message("wamid.1")]))).status_code == 404
    assert client.rows() == []
    assert PATH not in client.get("/openapi.json").json()["paths"]


def test_one_setting_alone_is_warned_about_at_start_up(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    make_client(whatsapp_app_secret=APP_SECRET)
    warned = [line for line in json_lines(capsys.readouterr().out) if "missing" in line]
    assert [line["missing"] for line in warned] == ["WHATSAPP_VERIFY_TOKEN"]
    assert warned[0]["level"] == "WARNING"
    assert APP_SECRET not in json.dumps(warned)


def test_enabled_routes_are_described(wa: AppClient) -> None:
    described = wa.get("/openapi.json").json()["paths"][PATH]
    assert set(described) == {"get", "post"}


# The handshake


def test_handshake_echoes_the_challenge_as_plain_text(wa: AppClient) -> None:
    response = wa.get(
        PATH,
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": VERIFY_TOKEN,
            "hub.challenge": "1158201444",
        },
    )
    assert response.status_code == 200
    assert response.text == "1158201444"
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    "params",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN + "x", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN[:-1], "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.mode": "SUBSCRIBE", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": ""},
        {
            "hub.mode": "subscribe",
            "hub.verify_token": VERIFY_TOKEN,
            "hub.challenge": "<script>alert(1)</script>",
        },
        {"hub.mode": "subscribe", "hub.verify_token": "é" + VERIFY_TOKEN, "hub.challenge": "1"},
        {},
    ],
)
def test_handshake_is_403_otherwise(wa: AppClient, params: dict[str, str]) -> None:
    response = wa.get(PATH, params=params)
    assert response.status_code == 403
    assert "1" not in response.text.replace("403", "")
    assert "script" not in response.text


# Batches


def test_a_text_message_is_stored_as_ours(wa: AppClient) -> None:
    response = post(wa, batch(change([text_message("wamid.HBgLMTY1MDM4Nzk0MzkVAgA=")])))
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert wa.rows(ROWS) == [
        (
            "wamid.HBgLMTY1MDM4Nzk0MzkVAgA=",
            "+16315551234",
            "+15550783881",
            "2020-10-18T22:13:21Z",
            "Hello",
        )
    ]
    listed = wa.get("/messages").json()["data"]
    assert listed[0]["from"] == "+16315551234"
    assert counts(wa, "whatsapp_messages_total", "result", WHATSAPP_MESSAGE_RESULTS) == {
        "created": 1,
        "duplicate": 0,
        "invalid": 0,
    }
    assert wa.metric("whatsapp_requests_total", result="accepted") == 1


def test_an_image_is_stored_with_null_text(wa: AppClient) -> None:
    assert post(wa, batch(change([image_message("wamid.img")]))).status_code == 200
    assert wa.rows("SELECT message_id, ts, text FROM messages") == [
        ("wamid.img", "2020-10-18T22:13:22Z", None)
    ]


def test_every_message_of_every_entry_and_change_is_stored(wa: AppClient) -> None:
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    change([text_message("wamid.a"), image_message("wamid.b")]),
                    change([text_message("wamid.c", sender="447700900123")], display="14155550100"),
                ],
            },
            {"id": "2", "changes": [change([text_message("wamid.d", body="from entry 2")])]},
        ],
    }
    assert post(wa, payload).status_code == 200
    assert wa.rows("SELECT message_id, from_msisdn, to_msisdn FROM messages ORDER BY 1") == [
        ("wamid.a", "+16315551234", "+15550783881"),
        ("wamid.b", "+16315551234", "+15550783881"),
        ("wamid.c", "+447700900123", "+14155550100"),
        ("wamid.d", "+16315551234", "+15550783881"),
    ]
    assert wa.metric("whatsapp_messages_total", result="created") == 4


def test_the_business_number_must_be_e164_with_or_without_its_plus(wa: AppClient) -> None:
    payload = batch(
        change([text_message("wamid.plain")]),
        change([text_message("wamid.plus")], display="+14155550100"),
        change([text_message("wamid.spaced")], display="1 415 555 0100 "),
        change([text_message("wamid.long")], display="1234567890123456"),
        change([text_message("wamid.zero")], display="0415550100"),
    )
    assert post(wa, payload).status_code == 200
    assert wa.rows("SELECT message_id, to_msisdn FROM messages ORDER BY 1") == [
        ("wamid.plain", "+15550783881"),
        ("wamid.plus", "+14155550100"),
    ]
    assert wa.metric("whatsapp_messages_total", result="invalid") == 3


def test_statuses_only_store_nothing_and_are_counted(wa: AppClient) -> None:
    states = ["sent", "delivered", "read", "read", "failed", "deleted", "brand-new-state"]
    payload = batch(change(statuses=[status(f"wamid.s{n}", s) for n, s in enumerate(states)]))
    payload["entry"][0]["changes"][0]["value"]["statuses"].append("not an object")
    assert post(wa, payload).status_code == 200
    assert wa.rows() == []
    assert counts(wa, "whatsapp_statuses_total", "status", WHATSAPP_STATUSES) == {
        "sent": 1,
        "delivered": 1,
        "read": 2,
        "failed": 1,
        "other": 3,
    }
    # Unknown values share "other": a sender cannot grow the label set.
    assert "brand-new-state" not in wa.get("/metrics").text


def test_messages_and_statuses_in_one_change(wa: AppClient) -> None:
    payload = batch(change([text_message("wamid.m")], statuses=[status("wamid.x", "delivered")]))
    assert post(wa, payload).status_code == 200
    assert wa.rows() == [("wamid.m",)]
    assert wa.metric("whatsapp_statuses_total", status="delivered") == 1


def test_non_ascii_text_is_verified_over_the_bytes_meta_sends(wa: AppClient) -> None:
    text = "Olá! Grüße 👋🏽 — مرحبا / 你好"
    raw = meta_bytes(batch(change([text_message("wamid.u", body=text)])))
    assert b"\\ud83d\\udc4b" in raw  # the emoji as Meta sends it: an escaped surrogate pair
    assert b"\\/" in raw
    # Signed over those exact bytes: the same document re-serialised would not verify.
    reserialised = json.dumps(json.loads(raw), ensure_ascii=False).encode()
    assert post(wa, reserialised, signature=hub_signature(raw)).status_code == 401
    assert wa.rows() == []
    assert post(wa, raw, signature=hub_signature(raw)).status_code == 200
    assert wa.rows("SELECT text FROM messages") == [(text,)]


def test_raw_utf8_text_is_stored_too(wa: AppClient) -> None:
    raw = json.dumps(
        batch(change([text_message("wamid.r", body="naïve café")])), ensure_ascii=False
    )
    assert post(wa, raw.encode()).status_code == 200
    assert wa.rows("SELECT text FROM messages") == [("naïve café",)]


def test_a_redelivered_batch_stores_nothing_twice(wa: AppClient) -> None:
    payload = batch(change([text_message("wamid.1"), text_message("wamid.2")]), entries=2)
    # The same two messages in two entries: one row each, even within one batch.
    assert post(wa, payload).status_code == 200
    assert post(wa, payload).status_code == 200
    assert wa.rows() == [("wamid.1",), ("wamid.2",)]
    assert counts(wa, "whatsapp_messages_total", "result", WHATSAPP_MESSAGE_RESULTS) == {
        "created": 2,
        "duplicate": 6,
        "invalid": 0,
    }


def test_one_malformed_message_does_not_block_the_rest(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    wa = enabled(make_client)
    bad_sender = text_message("wamid.bad1", sender="0123")
    no_body = {**text_message("wamid.bad2"), "text": {}}
    bad_time = {**text_message("wamid.bad3"), "timestamp": "yesterday"}
    no_id = {key: value for key, value in text_message("x").items() if key != "id"}
    too_long = text_message("wamid.bad5", body="x" * 4097)
    payload = batch(
        change(
            [
                text_message("wamid.good1"),
                bad_sender,
                no_body,
                "not an object",
                bad_time,
                no_id,
                too_long,
                image_message("wamid.good2"),
            ]
        )
    )
    capsys.readouterr()
    response = post(wa, payload)
    assert response.status_code == 200
    assert wa.rows() == [("wamid.good1",), ("wamid.good2",)]
    assert counts(wa, "whatsapp_messages_total", "result", WHATSAPP_MESSAGE_RESULTS) == {
        "created": 2,
        "duplicate": 0,
        "invalid": 6,
    }
    logged = json_lines(capsys.readouterr().out)
    skipped = [line for line in logged if line["msg"] == "whatsapp message skipped"]
    assert [line["where"] for line in skipped] == [
        f"entry[0].changes[0].value.messages[{n}]" for n in range(1, 7)
    ]
    assert all(line["level"] == "WARNING" for line in skipped)
    assert all(line["request_id"] == response.headers["x-request-id"] for line in skipped)
    reasons = [line["reason"] for line in skipped]
    assert reasons[0].startswith("from:")
    assert reasons[1].startswith("text.body:")
    assert reasons[3].startswith("timestamp:")
    assert reasons[4].startswith("id:")
    assert reasons[5].startswith("text.body:")
    # Names fields, never values: no text, numbers or ids of the skipped messages.
    assert "0123" not in json.dumps(skipped)
    assert "xxxx" not in json.dumps(skipped)
    (summary,) = [line for line in logged if line["msg"] == "whatsapp batch"]
    assert (summary["stored"], summary["invalid"]) == (2, 6)


def test_malformed_parts_of_a_batch_are_skipped_and_counted(wa: AppClient) -> None:
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            "not an entry",
            {"id": "1", "changes": "not a list"},
            {
                "id": "2",
                "changes": [
                    {"field": "messages"},
                    change([text_message("wamid.no-number")], display=""),
                    {"field": "messages", "value": {"messages": {"not": "a list"}}},
                    change([text_message("wamid.kept")]),
                    change([text_message("wamid.template")], field="message_template_status"),
                ],
            },
        ],
    }
    assert post(wa, payload).status_code == 200
    assert wa.rows() == [("wamid.kept",)]
    assert wa.metric("whatsapp_messages_total", result="invalid") == 5


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        (b"not json", ["body"]),
        (b"[]", ["body"]),
        (b'{"object":"whatsapp_business_account"}', ["body", "entry"]),
        (b'{"entry":{}}', ["body", "entry"]),
        (b'{"entry":[]} trailing', ["body"]),
        (b"\xff\xfe", ["body"]),
    ],
)
def test_a_body_that_is_not_a_batch_is_422(wa: AppClient, raw: bytes, loc: list[str]) -> None:
    response = post(wa, raw)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert wa.metric("whatsapp_requests_total", result="invalid_payload") == 1


def test_an_empty_batch_is_200(wa: AppClient) -> None:
    assert post(wa, {"object": "whatsapp_business_account", "entry": []}).status_code == 200


# Signatures


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "sha256=",
        "sha256=" + "0" * 64,
        hub_signature(b"another body"),
        hub_signature(meta_bytes(batch(change([text_message("wamid.1")]))), secret="other"),
        hub_signature(meta_bytes(batch(change([text_message("wamid.1")]))))[7:],
        "sha1=" + "0" * 40,
    ],
    ids=["empty", "prefix-only", "zeros", "other-body", "other-secret", "no-prefix", "sha1"],
)
def test_a_bad_signature_is_401_and_stores_nothing(wa: AppClient, signature: str) -> None:
    response = post(wa, batch(change([text_message("wamid.1")])), signature=signature)
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid signature"}
    assert wa.rows() == []
    assert wa.metric("whatsapp_requests_total", result="invalid_signature") == 1


def test_a_missing_signature_is_401(wa: AppClient) -> None:
    raw = meta_bytes(batch(change([text_message("wamid.1")])))
    response = wa.post(PATH, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    assert wa.rows() == []


def test_two_signature_headers_are_401(wa: AppClient) -> None:
    raw = meta_bytes(batch(change([text_message("wamid.1")])))
    good = hub_signature(raw).encode()
    response = wa.post(
        PATH,
        content=raw,
        headers=[(b"x-hub-signature-256", good), (b"x-hub-signature-256", good)],
    )
    assert response.status_code == 401
    assert wa.rows() == []


def test_a_bad_signature_is_checked_before_parsing(wa: AppClient) -> None:
    response = post(wa, b"not json at all", signature="sha256=" + "0" * 64)
    assert response.status_code == 401


def test_a_rejected_signature_logs_a_warning(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    wa = enabled(make_client)
    capsys.readouterr()
    post(wa, batch(change([text_message("wamid.1")])), signature="sha256=" + "0" * 64)
    (access,) = [
        line for line in json_lines(capsys.readouterr().out) if line["logger"] == "app.access"
    ]
    assert (access["status"], access["level"], access["path"]) == (401, "WARNING", PATH)


# Limits and storage


def test_a_body_over_the_limit_is_413(make_client: MakeClient) -> None:
    client = enabled(make_client, whatsapp_max_body_bytes=300)
    payload = batch(change([text_message("wamid.1", body="x" * 400)]))
    assert post(client, payload).status_code == 413

    def chunks() -> Iterator[bytes]:
        raw = meta_bytes(payload)
        for start in range(0, len(raw), 100):
            yield raw[start : start + 100]

    streamed = client.post(
        PATH, content=chunks(), headers={"X-Hub-Signature-256": hub_signature(meta_bytes(payload))}
    )
    assert streamed.status_code == 413
    assert client.rows() == []
    assert client.metric("whatsapp_requests_total", result="payload_too_large") == 2


def test_a_locked_database_is_503_and_the_retry_completes_the_batch(
    make_client: MakeClient, db_path: Path
) -> None:
    client = enabled(make_client, database_url=f"sqlite:///{db_path}", sqlite_busy_timeout_ms=100)
    payload = batch(change([text_message("wamid.1"), text_message("wamid.2")]))
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = post(client, payload)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert client.rows() == []
    assert post(client, payload).status_code == 200
    assert client.rows() == [("wamid.1",), ("wamid.2",)]
    assert client.metric("whatsapp_requests_total", result="storage_unavailable") == 1
    assert client.metric("whatsapp_requests_total", result="accepted") == 1


def test_every_whatsapp_line_exists_from_start_up(client: AppClient) -> None:
    text = client.get("/metrics").text
    for result in WHATSAPP_RESULTS:
        assert f'whatsapp_requests_total{{result="{result}"}} 0.0' in text
    for result in WHATSAPP_MESSAGE_RESULTS:
        assert f'whatsapp_messages_total{{result="{result}"}} 0.0' in text
    for state in WHATSAPP_STATUSES:
        assert f'whatsapp_statuses_total{{status="{state}"}} 0.0' in text


def test_requests_are_labelled_by_the_route(wa: AppClient) -> None:
    post(wa, batch(change([text_message("wamid.1")])))
    wa.get(PATH, params={"hub.mode": "subscribe"})
    assert wa.metric("http_requests_total", path=PATH, status="200") == 1
    assert wa.metric("http_requests_total", path=PATH, status="403") == 1


def test_secrets_text_and_numbers_never_reach_the_logs(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    wa = enabled(make_client)
    capsys.readouterr()
    raw = meta_bytes(batch(change([text_message("wamid.1", body="a secret plan")])))
    post(wa, raw)
    post(wa, raw, signature="sha256=" + "0" * 64)
    wa.get(
        PATH,
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "77"},
    )
    out = capsys.readouterr().out
    for needle in [
        APP_SECRET,
        VERIFY_TOKEN,
        "a secret plan",
        hub_signature(raw)[7:],
        "16315551234",
    ]:
        assert needle not in out
