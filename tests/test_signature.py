"""The signature verifiers, on their own: X-Signature, X-Hub-Signature-256, Standard Webhooks."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from app.config import standard_webhook_key
from app.signature import (
    EXPIRED,
    FUTURE,
    MALFORMED,
    MISMATCH,
    MISSING,
    InvalidSignature,
    Verifier,
    sign,
    sign_standard_webhook,
    verify_hub_signature,
    verify_signature,
    verify_standard_webhook,
)

BODY = b'{"message_id":"m1"}'
KEY = b"testsecret"

# The test vector every Standard Webhooks library checks itself against.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

# The example headers in the specification itself (its secret is not published).
SPEC_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
SPEC_TS = "1674087231"
SPEC_SIGNATURE = (
    "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4= "
    "v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg=="
)

NOW = 1_700_000_000
SW_KEY = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
OLD_KEY = b"an old key, still accepted during the rotation"


def reason(call: object, *args: object, **kwargs: object) -> str:
    assert callable(call)
    with pytest.raises(InvalidSignature) as caught:
        call(*args, **kwargs)
    return caught.value.reason


def standard(
    body: bytes = BODY,
    webhook_id: str | bytes | None = "msg_1",
    timestamp: str | bytes | None = str(NOW),
    signature: str | bytes | None = None,
    keys: tuple[bytes, ...] = (SW_KEY,),
    now: float = NOW,
) -> int:
    if signature is None:
        signature = sign_standard_webhook("msg_1", NOW, BODY, SW_KEY)
    return verify_standard_webhook(body, webhook_id, timestamp, signature, keys, now=now)


# X-Signature


def test_sign_matches_openssl_style_hex() -> None:
    assert sign(BODY, KEY) == hmac.new(KEY, BODY, hashlib.sha256).hexdigest()


def test_current_key_verifies_as_index_0() -> None:
    assert verify_signature(BODY, sign(BODY, KEY), [KEY]) == 0
    assert verify_signature(BODY, sign(BODY, KEY).upper(), [KEY]) == 0


def test_previous_key_verifies_as_index_1() -> None:
    assert verify_signature(BODY, sign(BODY, b"old"), [KEY, b"old"]) == 1


def test_sha256_prefix_is_accepted() -> None:
    assert verify_signature(BODY, "sha256=" + sign(BODY, KEY), [KEY]) == 0
    assert verify_signature(BODY, b"sha256=" + sign(BODY, b"old").encode(), [KEY, b"old"]) == 1


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, MISSING),
        ("", MALFORMED),
        ("zz" * 32, MALFORMED),
        (sign(BODY, b"other"), MISMATCH),
        ("sha256=" + sign(BODY, b"other"), MISMATCH),
        (sign(BODY, KEY)[:-1], MALFORMED),
        ("é" * 64, MALFORMED),
        (sign(BODY, KEY) + "\n", MALFORMED),
        ("\t" + sign(BODY, KEY)[1:], MALFORMED),
        ("SHA256=" + sign(BODY, KEY), MALFORMED),
        ("sha256:" + sign(BODY, KEY), MALFORMED),
        ("sha256= " + sign(BODY, KEY), MALFORMED),
        ("sha1=" + sign(BODY, KEY), MALFORMED),
        ("sha256=sha256=" + sign(BODY, KEY), MALFORMED),
    ],
)
def test_every_failure_is_invalid_signature(header: str | None, why: str) -> None:
    assert reason(verify_signature, BODY, header, [KEY]) == why


def test_the_body_bytes_matter() -> None:
    assert reason(verify_signature, BODY + b" ", sign(BODY, KEY), [KEY]) == MISMATCH


# X-Hub-Signature-256 (Meta)


def test_hub_signature_needs_its_prefix() -> None:
    assert verify_hub_signature(BODY, "sha256=" + sign(BODY, KEY), [KEY]) == 0
    assert verify_hub_signature(BODY, "sha256=" + sign(BODY, KEY).upper(), [KEY]) == 0
    assert reason(verify_hub_signature, BODY, sign(BODY, KEY), [KEY]) == MALFORMED
    assert reason(verify_hub_signature, BODY, None, [KEY]) == MISSING
    assert reason(verify_hub_signature, BODY, "sha256=" + sign(b"x", KEY), [KEY]) == MISMATCH


# Standard Webhooks: known answers


def test_the_libraries_test_vector() -> None:
    key = standard_webhook_key(VECTOR_SECRET)
    assert sign_standard_webhook(VECTOR_ID, VECTOR_TS, VECTOR_BODY, key) == VECTOR_SIGNATURE
    assert (
        verify_standard_webhook(
            VECTOR_BODY, VECTOR_ID, str(VECTOR_TS), VECTOR_SIGNATURE, [key], now=VECTOR_TS
        )
        == 0
    )


def test_the_specs_example_header_parses_and_its_v1a_entry_is_skipped() -> None:
    # The spec does not publish the secret behind its example, so it cannot verify here;
    # what it shows is that the header is well formed (a v1 and a v1a entry): MISMATCH,
    # not MALFORMED. Without the v1 entry, nothing is left that we can check.
    spec_now = int(SPEC_TS)
    args = (BODY, SPEC_ID, SPEC_TS)
    assert reason(verify_standard_webhook, *args, SPEC_SIGNATURE, [SW_KEY], now=spec_now) == (
        MISMATCH
    )
    v1a_only = SPEC_SIGNATURE.split(" ")[1]
    assert reason(verify_standard_webhook, *args, v1a_only, [SW_KEY], now=spec_now) == MISMATCH


def test_signatures_made_by_the_standardwebhooks_package_verify() -> None:
    sender = Webhook(SW_KEY)
    at = datetime.fromtimestamp(NOW, UTC)
    body = '{"message_id":"m1","text":"Grüße, 你好"}'
    signature = sender.sign("msg_1", at, body)
    raw = body.encode()
    assert verify_standard_webhook(raw, "msg_1", str(NOW), signature, [SW_KEY], now=NOW) == 0
    # Its whsec_ form of the same key gives the same signature.
    whsec = "whsec_" + base64.b64encode(SW_KEY).decode()
    assert Webhook(whsec).sign("msg_1", at, body) == signature
    assert standard_webhook_key(whsec) == SW_KEY


def test_our_signatures_verify_with_the_standardwebhooks_package() -> None:
    now = int(datetime.now(UTC).timestamp())  # the package reads the clock itself
    signature = sign_standard_webhook("msg_1", now, BODY, SW_KEY)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": signature}
    assert Webhook(SW_KEY).verify(BODY, headers, json_parse=False) is None


# Standard Webhooks: rotation


def test_a_signature_by_the_previous_key_verifies_as_index_1() -> None:
    old = sign_standard_webhook("msg_1", NOW, BODY, OLD_KEY)
    assert standard(signature=old, keys=(SW_KEY, OLD_KEY)) == 1
    assert reason(standard, signature=old, keys=(SW_KEY,)) == MISMATCH


def test_a_sender_signing_with_both_keys_verifies_as_current() -> None:
    old = sign_standard_webhook("msg_1", NOW, BODY, OLD_KEY)
    new = sign_standard_webhook("msg_1", NOW, BODY, SW_KEY)
    assert standard(signature=f"{old} {new}", keys=(SW_KEY, OLD_KEY)) == 0
    assert standard(signature=f"{old} {new}", keys=(SW_KEY,)) == 0
    assert standard(signature=f"{old} v2,whatever {new}", keys=(OLD_KEY,)) == 0


# Standard Webhooks: the window


@pytest.mark.parametrize(
    ("offset", "why"),
    [(-301, EXPIRED), (-300, None), (0, None), (300, None), (301, FUTURE)],
)
def test_timestamps_outside_five_minutes_are_refused(offset: int, why: str | None) -> None:
    sent = NOW + offset
    signature = sign_standard_webhook("msg_1", sent, BODY, SW_KEY)
    args = (BODY, "msg_1", str(sent), signature, [SW_KEY])
    if why is None:
        assert verify_standard_webhook(*args, now=NOW) == 0
    else:
        assert reason(verify_standard_webhook, *args, now=NOW) == why


def test_past_and_future_bounds_are_separate() -> None:
    def check(offset: int) -> int:
        sent = NOW + offset
        signature = sign_standard_webhook("msg_1", sent, BODY, SW_KEY)
        return verify_standard_webhook(
            BODY, "msg_1", str(sent), signature, [SW_KEY], now=NOW, max_age=600, max_ahead=5
        )

    assert check(-600) == 0
    assert check(5) == 0
    assert reason(check, -601) == EXPIRED
    assert reason(check, 6) == FUTURE


def test_a_stale_timestamp_is_refused_even_with_a_good_signature() -> None:
    assert reason(standard, now=NOW + 3600) == EXPIRED


# Standard Webhooks: what is signed


def test_id_timestamp_and_body_are_all_signed() -> None:
    assert standard() == 0
    assert reason(standard, body=BODY + b" ") == MISMATCH
    assert reason(standard, webhook_id="msg_2") == MISMATCH
    assert reason(standard, timestamp=str(NOW + 1)) == MISMATCH
    assert reason(standard, keys=(b"another key",)) == MISMATCH


def test_no_dots_in_the_id_so_parts_cannot_shift() -> None:
    # "a" + "." + "b.1700000000" and "a.b" + "." + "1700000000" sign the same bytes... if
    # dots were allowed in the id. They are not.
    shifted = base64.b64encode(
        hmac.new(SW_KEY, b"a.b." + str(NOW).encode() + b"." + BODY, hashlib.sha256).digest()
    ).decode()
    assert reason(standard, webhook_id="a.b", signature="v1," + shifted) == MALFORMED


_GOOD = sign_standard_webhook("msg_1", NOW, BODY, SW_KEY)
_DIGEST = _GOOD.removeprefix("v1,")


@pytest.mark.parametrize(
    ("webhook_id", "timestamp", "signature", "why"),
    [
        (None, str(NOW), _GOOD, MISSING),
        ("msg_1", None, _GOOD, MISSING),
        ("msg_1", str(NOW), None, MISSING),
        ("", str(NOW), _GOOD, MALFORMED),
        ("msg.1", str(NOW), _GOOD, MALFORMED),
        ("msg 1", str(NOW), _GOOD, MALFORMED),
        ("msg_é", str(NOW), _GOOD, MALFORMED),
        ("m" * 257, str(NOW), _GOOD, MALFORMED),
        ("msg_1", "", _GOOD, MALFORMED),
        ("msg_1", f"{NOW}.0", _GOOD, MALFORMED),
        ("msg_1", f"{NOW}.5", _GOOD, MALFORMED),
        ("msg_1", f"+{NOW}", _GOOD, MALFORMED),
        ("msg_1", f"-{NOW}", _GOOD, MALFORMED),
        ("msg_1", f" {NOW}", _GOOD, MALFORMED),
        ("msg_1", f"{NOW}\n", _GOOD, MALFORMED),
        ("msg_1", f"0{NOW}", _GOOD, MALFORMED),
        ("msg_1", "1.7e9", _GOOD, MALFORMED),
        ("msg_1", "１７００００００００", _GOOD, MALFORMED),
        ("msg_1", "2023-11-14T22:13:20Z", _GOOD, MALFORMED),
        ("msg_1", str(NOW), "", MALFORMED),
        ("msg_1", str(NOW), "v1", MALFORMED),
        ("msg_1", str(NOW), "v1,", MALFORMED),
        ("msg_1", str(NOW), _DIGEST, MALFORMED),
        ("msg_1", str(NOW), "V1," + _DIGEST, MALFORMED),
        ("msg_1", str(NOW), "v1=" + _DIGEST, MALFORMED),
        ("msg_1", str(NOW), ",", MALFORMED),
        ("msg_1", str(NOW), " " + _GOOD, MALFORMED),
        ("msg_1", str(NOW), _GOOD + " ", MALFORMED),
        ("msg_1", str(NOW), f"{_GOOD}  {_GOOD}", MALFORMED),
        ("msg_1", str(NOW), f"{_GOOD}\t{_GOOD}", MALFORMED),
        ("msg_1", str(NOW), f"{_GOOD},{_GOOD}", MALFORMED),
        ("msg_1", str(NOW), "v1," + _DIGEST.rstrip("="), MALFORMED),
        ("msg_1", str(NOW), "v1," + _DIGEST + "=", MALFORMED),
        ("msg_1", str(NOW), "v1," + _DIGEST[:-2] + "=", MALFORMED),
        ("msg_1", str(NOW), "v1," + _DIGEST[:-1] + "$", MALFORMED),
        ("msg_1", str(NOW), "v1," + base64.b64encode(b"\x00" * 31).decode(), MALFORMED),
        ("msg_1", str(NOW), "v1," + base64.b64encode(b"\x00" * 33).decode(), MALFORMED),
        ("msg_1", str(NOW), "v1a,", MALFORMED),
        ("msg_1", str(NOW), "v1a,é", MALFORMED),
        ("msg_1", str(NOW), "x1," + _DIGEST, MALFORMED),
        ("msg_1", str(NOW), "v1a," + _DIGEST, MISMATCH),
    ],
)
def test_every_malformed_header_is_refused(
    webhook_id: str | None, timestamp: str | None, signature: str | None, why: str
) -> None:
    args = (BODY, webhook_id, timestamp, signature, [SW_KEY])
    assert reason(verify_standard_webhook, *args, now=NOW) == why


def test_url_safe_base64_is_malformed() -> None:
    # Find a delivery whose digest has a '+' or '/', which url-safe base64 would change.
    for n in range(100):
        good = sign_standard_webhook(f"msg_{n}", NOW, BODY, SW_KEY)
        if "+" in good or "/" in good:
            break
    urlsafe = good.replace("+", "-").replace("/", "_")
    assert verify_standard_webhook(BODY, f"msg_{n}", str(NOW), good, [SW_KEY], now=NOW) == 0
    assert reason(standard, webhook_id=f"msg_{n}", signature=urlsafe) == MALFORMED


def test_a_non_canonical_last_digit_is_malformed() -> None:
    # 32 bytes take 43 digits and '='; the 43rd carries 2 unused bits, which must be 0.
    digest = _DIGEST
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(digest[42])
    sloppy = digest[:42] + alphabet[last | 1] + "="
    assert sloppy != digest
    assert base64.b64decode(sloppy) == base64.b64decode(digest)  # decoders drop the bits
    assert reason(standard, signature="v1," + sloppy) == MALFORMED


def test_header_bytes_and_text_are_read_alike() -> None:
    assert standard(webhook_id=b"msg_1", timestamp=str(NOW).encode(), signature=_GOOD.encode()) == 0
    assert reason(standard, webhook_id=b"msg_\xe9") == MALFORMED


# Picking the scheme


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in values.items()]


VERIFIER = Verifier(secrets=(KEY, b"old"), standard_keys=(SW_KEY, OLD_KEY))


def test_x_signature_when_no_webhook_header_is_sent() -> None:
    assert VERIFIER.verify(BODY, headers(x_signature=sign(BODY, KEY)), NOW) == 0
    assert VERIFIER.verify(BODY, headers(x_signature=sign(BODY, b"old")), NOW) == 1
    assert reason(VERIFIER.verify, BODY, headers(content_type="application/json"), NOW) == MISSING


def test_any_webhook_header_selects_standard_webhooks() -> None:
    good = headers(webhook_id="msg_1", webhook_timestamp=str(NOW), webhook_signature=_GOOD)
    assert VERIFIER.verify(BODY, good, NOW) == 0
    # A valid X-Signature does not rescue an incomplete or wrong Standard Webhooks set.
    flat = headers(x_signature=sign(BODY, KEY))
    assert reason(VERIFIER.verify, BODY, flat + good[:2], NOW) == MISSING
    assert reason(VERIFIER.verify, BODY, flat + good[1:], NOW) == MISSING
    assert reason(VERIFIER.verify, BODY, flat + good, NOW + 1000) == EXPIRED
    assert VERIFIER.verify(BODY, flat + good, NOW) == 0


def test_a_signature_header_sent_twice_is_malformed() -> None:
    flat = headers(x_signature=sign(BODY, KEY))
    assert reason(VERIFIER.verify, BODY, flat + flat, NOW) == MALFORMED
    good = headers(webhook_id="msg_1", webhook_timestamp=str(NOW), webhook_signature=_GOOD)
    assert reason(VERIFIER.verify, BODY, good + good[2:], NOW) == MALFORMED


def test_the_window_comes_from_the_verifier() -> None:
    strict = Verifier(secrets=(KEY,), standard_keys=(SW_KEY,), max_age=10, max_ahead=1)
    good = headers(webhook_id="msg_1", webhook_timestamp=str(NOW), webhook_signature=_GOOD)
    assert strict.verify(BODY, good, NOW + 10) == 0
    assert reason(strict.verify, BODY, good, NOW + 11) == EXPIRED
    assert reason(strict.verify, BODY, good, NOW - 2) == FUTURE


# Standard Webhooks: what a forged header may cost


def test_sixteen_entries_verify_and_seventeen_are_malformed_whatever_they_hold() -> None:
    wrong = sign_standard_webhook("msg_1", NOW, BODY, OLD_KEY)
    # The genuine signature last: before the limit it verified past any number of others.
    sixteen = " ".join([wrong] * 15 + [_GOOD])
    assert standard(signature=sixteen) == 0
    seventeen = " ".join([wrong] * 16 + [_GOOD])
    assert reason(standard, signature=seventeen) == MALFORMED
    assert reason(standard, signature=" ".join([wrong] * 2000)) == MALFORMED


def test_the_window_is_checked_before_the_signatures_are_read() -> None:
    # A stale delivery is refused as stale, whatever its signature header holds: nothing
    # of that header is parsed or digested first.
    for signature in ["v1,not base64!", "x" * 1000, " ".join([_GOOD] * 2000)]:
        assert reason(standard, signature=signature, now=NOW + 3600) == EXPIRED
        assert reason(standard, signature=signature, now=NOW - 3600) == FUTURE
