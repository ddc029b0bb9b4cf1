"""POST /webhook, row by row of SPEC section 2, on a :memory: SQLite database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from app.main import create_app
from app.signature import sign
from tests.support.clients import SECRET, AppClient, MakeClient, encode, make_settings, message


def test_valid_signature_and_new_message_is_stored(client: AppClient) -> None:
    response = client.post_signed(message())
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    stored = client.rows("SELECT message_id, from_msisdn, to_msisdn, ts, text FROM messages")
    assert stored == [("m1", "+919876543210", "+14155550100", "2025-01-15T10:00:00Z", "Hello")]


def test_redelivery_answers_ok_and_stores_one_row(client: AppClient) -> None:
    assert client.post_signed(message()).status_code == 200
    again = client.post_signed(message())
    assert again.status_code == 200
    assert again.json() == {"status": "ok"}
    assert client.rows() == [("m1",)]


def test_redelivery_with_other_content_keeps_the_first(client: AppClient) -> None:
    client.post_signed(message(text="first"))
    assert client.post_signed(message(text="second")).status_code == 200
    assert client.rows("SELECT text FROM messages") == [("first",)]


def test_invalid_signature_is_401_and_stores_nothing(client: AppClient) -> None:
    response = client.post_signed(message(), secret="wrong-secret")
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid signature"}
    assert client.rows() == []


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "not-hex",
        "0" * 64,
        "abc",
        "0" * 63,
        "0" * 65,
        " " + "0" * 63,
        "ab " * 21 + "a",
        "é" * 64,
    ],
    ids=[
        "missing",
        "empty",
        "not-hex",
        "zeros",
        "short",
        "63",
        "65",
        "space",
        "spaced",
        "non-ascii",
    ],
)
def test_missing_or_malformed_signature_is_401(client: AppClient, signature: str | None) -> None:
    headers: dict[bytes, bytes] = {b"Content-Type": b"application/json"}
    if signature is not None:
        headers[b"X-Signature"] = signature.encode("utf-8")
    response = client.post("/webhook", content=encode(message()), headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid signature"}
    assert client.rows() == []


def test_signature_over_a_different_body_is_401(client: AppClient) -> None:
    signed = encode(message())
    sent = encode(message(text="tampered"))
    response = client.post(
        "/webhook",
        content=sent,
        headers={"Content-Type": "application/json", "X-Signature": sign(signed, SECRET.encode())},
    )
    assert response.status_code == 401
    assert client.rows() == []


def test_signature_is_over_raw_bytes_not_reserialised_json(client: AppClient) -> None:
    # Same JSON value, different bytes: only the exact bytes that were signed verify.
    raw = (
        b'{ "message_id":"m1", "from":"+919876543210", "to":"+14155550100",'
        b' "ts":"2025-01-15T10:00:00Z" }'
    )
    ok = client.post(
        "/webhook",
        content=raw,
        headers={"X-Signature": sign(raw, SECRET.encode()), "Content-Type": "application/json"},
    )
    assert ok.status_code == 200
    compact = json.dumps(json.loads(raw), separators=(",", ":")).encode()
    assert compact != raw
    bad = client.post(
        "/webhook",
        content=compact,
        headers={"X-Signature": sign(raw, SECRET.encode()), "Content-Type": "application/json"},
    )
    assert bad.status_code == 401


def test_upper_case_hex_signature_is_accepted(client: AppClient) -> None:
    raw = encode(message())
    response = client.post(
        "/webhook",
        content=raw,
        headers={
            "Content-Type": "application/json",
            "X-Signature": sign(raw, SECRET.encode()).upper(),
        },
    )
    assert response.status_code == 200
    assert client.rows() == [("m1",)]


def test_body_over_the_limit_with_content_length_is_413(make_client: MakeClient) -> None:
    client = make_client(max_body_bytes=200)
    body = encode(message(text="x" * 300))
    response = client.post_signed(body)
    assert response.status_code == 413
    assert client.rows() == []


def test_default_limit_is_64_kib(client: AppClient) -> None:
    padding = 65536 - len(encode(message(pad="")))
    at_limit = encode(message(pad="x" * padding))
    assert len(at_limit) == 65536
    assert client.post_signed(at_limit).status_code == 200
    over = encode(message(message_id="m2", pad="x" * (padding + 1)))
    assert client.post_signed(over).status_code == 413
    assert client.rows() == [("m1",)]


def test_chunked_body_over_the_limit_is_413(make_client: MakeClient) -> None:
    client = make_client(max_body_bytes=1000)
    raw = encode(message(pad="x" * 5000))

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(raw), 100):
            yield raw[start : start + 100]

    response = client.post(
        "/webhook",
        content=chunks(),
        headers={"Content-Type": "application/json", "X-Signature": sign(raw, SECRET.encode())},
    )
    assert response.status_code == 413
    assert client.rows() == []


def test_chunked_body_under_the_limit_is_stored(client: AppClient) -> None:
    raw = encode(message())

    def chunks() -> Iterator[bytes]:
        yield raw[:10]
        yield raw[10:]

    response = client.post(
        "/webhook",
        content=chunks(),
        headers={"Content-Type": "application/json", "X-Signature": sign(raw, SECRET.encode())},
    )
    assert response.status_code == 200
    assert client.rows() == [("m1",)]


def test_oversized_body_with_bad_signature_is_413(make_client: MakeClient) -> None:
    client = make_client(max_body_bytes=100)
    response = client.post_signed(message(text="x" * 200), secret="wrong")
    assert response.status_code == 413


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        "application/jsonx",
    ],
)
def test_other_content_type_is_415(client: AppClient, content_type: str) -> None:
    response = client.post_signed(message(), headers={"Content-Type": content_type})
    assert response.status_code == 415
    assert client.rows() == []


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"],
)
def test_json_content_types_are_accepted(client: AppClient, content_type: str) -> None:
    assert client.post_signed(message(), headers={"Content-Type": content_type}).status_code == 200


def test_missing_content_type_is_read_as_json(client: AppClient) -> None:
    raw = encode(message())
    response = client.post(
        "/webhook", content=raw, headers={"X-Signature": sign(raw, SECRET.encode())}
    )
    assert response.status_code == 200
    assert client.rows() == [("m1",)]


def test_wrong_content_type_with_bad_signature_is_401(client: AppClient) -> None:
    response = client.post_signed(message(), secret="wrong", headers={"Content-Type": "text/plain"})
    assert response.status_code == 401


def test_bad_signature_and_bad_body_is_401(client: AppClient) -> None:
    response = client.post_signed(b"{not json", secret="wrong")
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid signature"}


def assert_422(client: AppClient, body: dict[str, Any] | bytes, field: str | None = None) -> None:
    response = client.post_signed(body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list)
    assert detail
    for error in detail:
        assert set(error) == {"loc", "msg", "type"}
        assert error["loc"][0] == "body"
    if field is not None:
        assert ["body", field] in [error["loc"] for error in detail]
    assert client.rows() == []


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b'{"message_id": "m1",',
        b'{"message_id":"m1"} trailing',
        b"\xef\xbb\xbf" + encode(message()),
        encode(message())[:-1] + b',"n":NaN}',
        b"[" * 10000 + b"]" * 10000,
        b'{"message_id":"m1","n":' + b"9" * 5000 + b"}",
    ],
    ids=["garbage", "empty", "truncated", "trailing", "bom", "nan", "deep", "huge-number"],
)
def test_body_that_is_not_json_is_422(client: AppClient, raw: bytes) -> None:
    assert_422(client, raw)


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"1", b"null", b"true"])
def test_body_that_is_not_an_object_is_422(client: AppClient, raw: bytes) -> None:
    assert_422(client, raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"message_id":"m\xff1","from":"+919876543210","to":"+14155550100","ts":"2025-01-15T10:00:00Z"}',
        json.dumps(message(), ensure_ascii=False).encode("utf-16"),
        b'{"message_id":"m1","from":"+919876543210","to":"+14155550100","ts":"2025-01-15T10:00:00Z","text":"\\ud800"}',
    ],
    ids=["invalid-utf8", "utf16", "lone-surrogate"],
)
def test_body_that_is_not_utf8_is_422(client: AppClient, raw: bytes) -> None:
    assert_422(client, raw)


INVALID_FIELDS: list[tuple[str, Any]] = [
    ("message_id", ""),
    ("message_id", None),
    ("message_id", 123),
    ("message_id", "x" * 257),
    ("message_id", "a\x00b"),
    ("from", "919876543210"),
    ("from", "+0919876543210"),
    ("from", "+1"),
    ("from", "+1234567890123456"),
    ("from", "+91 98765 43210"),
    ("from", "+919876543210\n"),
    ("from", "+٩١٩٨٧٦٥٤٣٢١٠"),
    ("from", "+91987654321a"),
    ("from", 919876543210),
    ("from", None),
    ("to", "14155550100"),
    ("to", "+"),
    ("to", ["+14155550100"]),
    ("ts", "2025-01-15T10:00:00"),
    ("ts", "2025-01-15T10:00:00z"),
    ("ts", "2025-01-15T10:00:00+00:00"),
    ("ts", "2025-01-15T10:00:00+05:30"),
    ("ts", "2025-01-15 10:00:00Z"),
    ("ts", "2025-02-30T00:00:00Z"),
    ("ts", "2025-01-15T24:00:00Z"),
    ("ts", "2025-01-15T10:60:00Z"),
    ("ts", "2016-12-31T23:59:60Z"),
    ("ts", "2025-01-15T10:00:00.Z"),
    ("ts", "2025-01-15T10:00:00.1234567890Z"),
    ("ts", "2025-01-15T10:00:00Z\n"),
    ("ts", "２０２５-01-15T10:00:00Z"),
    ("ts", "0000-01-01T00:00:00Z"),
    ("ts", "20250115T100000Z"),
    ("ts", 1736935200),
    ("ts", ""),
    ("text", "x" * 4097),
    ("text", 42),
    ("text", {"body": "hi"}),
    ("text", "nul\x00inside"),
]


@pytest.mark.parametrize(("field", "value"), INVALID_FIELDS)
def test_each_field_rule_is_422(client: AppClient, field: str, value: Any) -> None:
    body = message(**{field: value})
    response = client.post_signed(body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert ["body", field] in [error["loc"] for error in errors]
    # Errors describe the problem without echoing the input back.
    if isinstance(value, str) and len(value) > 3:
        assert value not in response.text
    assert client.rows() == []


@pytest.mark.parametrize("field", ["message_id", "from", "to", "ts"])
def test_missing_required_field_is_422(client: AppClient, field: str) -> None:
    body = message()
    del body[field]
    assert_422(client, body, field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ts", "2025-01-15T10:00:00.123456789Z"),
        ("ts", "2025-01-15T10:00:00.5Z"),
        ("ts", "2024-02-29T23:59:59Z"),
        ("from", "+12"),
        ("from", "+123456789012345"),
        ("text", None),
        ("text", "x" * 4096),
        ("text", "नमस्ते 👋"),
        ("text", ""),
        ("message_id", "x" * 256),
    ],
)
def test_edge_values_that_are_valid_are_stored(client: AppClient, field: str, value: Any) -> None:
    assert client.post_signed(message(**{field: value})).status_code == 200
    assert client.rows("SELECT count(*) FROM messages") == [(1,)]


def test_absent_text_is_stored_as_null(client: AppClient) -> None:
    body = message()
    del body["text"]
    assert client.post_signed(body).status_code == 200
    assert client.rows("SELECT text FROM messages") == [(None,)]


def test_unknown_fields_are_ignored(client: AppClient) -> None:
    response = client.post_signed(message(extra="field", nested={"a": [1, 2]}))
    assert response.status_code == 200
    assert client.rows() == [("m1",)]


def test_422_bodies_are_compact_json_like_every_other_answer(client: AppClient) -> None:
    response = client.post_signed(message(ts="bad"))
    assert response.status_code == 422
    compact = json.dumps(response.json(), ensure_ascii=False, separators=(",", ":"))
    assert response.content == compact.encode()


def test_a_root_path_is_honoured_by_the_direct_route() -> None:
    # An app mounted under a prefix (uvicorn --root-path, a proxy's sub-path) still takes
    # deliveries: the prefix is not part of the route, as for FastAPI's own routes.
    client = AppClient(create_app(make_settings()), root_path="/receiver")
    client.__enter__()
    raw = encode(message())
    response = client.post(
        "/receiver/webhook",
        content=raw,
        headers={"Content-Type": "application/json", "X-Signature": sign(raw, SECRET.encode())},
    )
    assert response.status_code == 200
    assert client.get("/receiver/messages").json()["total"] == 1
    assert client.metric("http_requests_total", path="/webhook", status="200") == 1
    client.__exit__(None, None, None)
