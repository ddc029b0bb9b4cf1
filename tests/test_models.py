"""The validation rules of SPEC section 2, on the models alone."""

from __future__ import annotations

import pytest

from app.models import (
    InvalidMessage,
    check_msisdn,
    decode_cursor,
    encode_cursor,
    instant_key,
    instant_key_unchecked,
    parse_message,
)
from tests.support.clients import encode, message


@pytest.mark.parametrize(
    ("ts", "key"),
    [
        ("2025-01-15T10:00:00Z", "2025-01-15T10:00:00.000000000Z"),
        ("2025-01-15T10:00:00.5Z", "2025-01-15T10:00:00.500000000Z"),
        ("2025-01-15T10:00:00.123456789Z", "2025-01-15T10:00:00.123456789Z"),
    ],
)
def test_instant_key_is_fixed_width(ts: str, key: str) -> None:
    assert instant_key(ts) == key
    assert instant_key_unchecked(parse_message(encode(message(ts=ts))).ts) == key


def test_instant_keys_sort_as_instants() -> None:
    stamps = [
        "2025-01-15T10:00:00.5Z",
        "2025-01-15T10:00:00Z",
        "2025-01-15T10:00:00.05Z",
        "2025-01-15T09:59:59.999Z",
    ]
    assert sorted(stamps, key=instant_key) == [
        "2025-01-15T09:59:59.999Z",
        "2025-01-15T10:00:00Z",
        "2025-01-15T10:00:00.05Z",
        "2025-01-15T10:00:00.5Z",
    ]


@pytest.mark.parametrize("value", ["+12", "+919876543210", "+123456789012345"])
def test_valid_msisdn(value: str) -> None:
    assert check_msisdn(value) == value


@pytest.mark.parametrize("value", ["+1", "+0123", "12345", "+1234567890123456", "+12\n", "+١٢٣"])
def test_invalid_msisdn(value: str) -> None:
    with pytest.raises(ValueError, match=r"E\.164"):
        check_msisdn(value)


def test_cursor_round_trip() -> None:
    key = instant_key("2025-01-15T10:00:00Z")
    for message_id in ["m1", 'with "quotes" and ,commas', "ünïcødé"]:
        assert decode_cursor(encode_cursor(key, message_id)) == (key, message_id)


@pytest.mark.parametrize("cursor", ["", "!!", "e30", "WyJ4IiwieSJd", "a" * 2000])
def test_foreign_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor(cursor)


def test_parse_errors_never_carry_the_input() -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_message(b'{"message_id": "m1", "from": "+0secret-number", "to": 5, "ts": "x"}')
    text = repr(caught.value.errors)
    assert "secret-number" not in text
    assert {tuple(error["loc"]) for error in caught.value.errors} == {
        ("body", "from"),
        ("body", "to"),
        ("body", "ts"),
    }
