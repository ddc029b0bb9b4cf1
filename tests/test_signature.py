"""The signature verifier, on its own."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from app.signature import InvalidSignature, sign, verify_signature

BODY = b'{"message_id":"m1"}'
KEY = b"testsecret"


def test_sign_matches_openssl_style_hex() -> None:
    assert sign(BODY, KEY) == hmac.new(KEY, BODY, hashlib.sha256).hexdigest()


def test_current_key_verifies_as_index_0() -> None:
    assert verify_signature(BODY, sign(BODY, KEY), [KEY]) == 0
    assert verify_signature(BODY, sign(BODY, KEY).upper(), [KEY]) == 0


def test_previous_key_verifies_as_index_1() -> None:
    assert verify_signature(BODY, sign(BODY, b"old"), [KEY, b"old"]) == 1


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "zz" * 32,
        sign(BODY, b"other"),
        sign(BODY, KEY)[:-1],
        "é" * 64,
        sign(BODY, KEY) + "\n",
        "\t" + sign(BODY, KEY)[1:],
    ],
)
def test_every_failure_is_invalid_signature(header: str | None) -> None:
    with pytest.raises(InvalidSignature):
        verify_signature(BODY, header, [KEY])


def test_the_body_bytes_matter() -> None:
    with pytest.raises(InvalidSignature):
        verify_signature(BODY + b" ", sign(BODY, KEY), [KEY])
