"""The signature verifier under random headers, bodies and keys, and its constant-time compare."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import hmac
import inspect
import statistics
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app import signature as signature_module
from app.signature import (
    InvalidSignature,
    sign,
    sign_standard_webhook,
    verify_hub_signature,
    verify_signature,
    verify_standard_webhook,
)
from tests.support.tiers import TIER, record

pytestmark = pytest.mark.reliability

PROPERTY = settings(
    max_examples=TIER.examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
KEYS = st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=3)
HEX = "0123456789abcdefABCDEF"
HEADERS = st.one_of(
    st.none(),
    st.text(max_size=80),
    st.text(HEX, min_size=62, max_size=66),
    st.text(HEX + " \t\n\x00g", min_size=64, max_size=64),
    st.text(st.characters(codec="latin-1"), min_size=64, max_size=64),
    st.builds(lambda h: "sha256=" + h, st.text(HEX, min_size=63, max_size=65)),
    st.binary(max_size=80),
)


@PROPERTY
@given(st.binary(max_size=512), HEADERS, KEYS)
@example(b"", "", [b"k"])
@example(b"x", "\ud800" * 64, [b"k"])
@example(b"x", " " + "0" * 63, [b"k"])
@example(b"x", "0" * 64 + "\n", [b"k"])
@example(b"x", b"\xff" * 64, [b"k"])
def test_any_header_verifies_or_raises_invalid_signature(
    body: bytes, header: str | bytes | None, keys: list[bytes]
) -> None:
    try:
        index = verify_signature(body, header, keys)
    except InvalidSignature:
        return
    # Accepted only when it is exactly the hex HMAC of the body under that key.
    assert header is not None
    text = header.decode("ascii") if isinstance(header, bytes) else header
    assert text.lower().removeprefix("sha256=") == sign(body, keys[index])


STANDARD_IDS = st.one_of(st.text(max_size=20), st.just("msg_1"), st.binary(max_size=20))
STANDARD_SIGNATURES = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda parts: " ".join(parts),
        st.lists(
            st.builds(
                lambda version, value: f"{version},{value}",
                st.sampled_from(["v1", "v1a", "v2", "V1", ""]),
                st.text("ABCDEFabcdef0123456789+/=", min_size=40, max_size=46),
            ),
            max_size=3,
        ),
    ),
)


@PROPERTY
@given(
    st.binary(max_size=256),
    STANDARD_IDS,
    st.one_of(st.integers(-10, 10**13).map(str), st.text(max_size=14)),
    STANDARD_SIGNATURES,
    KEYS,
)
def test_standard_webhooks_headers_verify_or_raise_invalid_signature(
    body: bytes, webhook_id: str | bytes, timestamp: str, signature: str, keys: list[bytes]
) -> None:
    now = 1_700_000_000.0
    try:
        index = verify_standard_webhook(body, webhook_id, timestamp, signature, keys, now=now)
    except InvalidSignature:
        return
    assert isinstance(webhook_id, str)
    assert sign_standard_webhook(webhook_id, int(timestamp), body, keys[index]) in signature


@PROPERTY
@given(st.binary(max_size=256), HEADERS, KEYS)
def test_hub_signature_headers_verify_or_raise_invalid_signature(
    body: bytes, header: str | bytes | None, keys: list[bytes]
) -> None:
    try:
        index = verify_hub_signature(body, header, keys)
    except InvalidSignature:
        return
    assert header is not None
    text = header.decode("ascii") if isinstance(header, bytes) else header
    assert text.startswith("sha256=")
    assert text.removeprefix("sha256=").lower() == sign(body, keys[index])


@PROPERTY
@given(st.binary(max_size=512), KEYS, st.data())
def test_a_real_signature_verifies_and_any_changed_digit_does_not(
    body: bytes, keys: list[bytes], data: st.DataObject
) -> None:
    which = data.draw(st.integers(0, len(keys) - 1))
    good = sign(body, keys[which])
    mixed_case = "".join(c.upper() if data.draw(st.booleans()) else c for c in good)
    assert keys[verify_signature(body, mixed_case, keys)] == keys[which]
    at = data.draw(st.integers(0, 63))
    other = data.draw(st.sampled_from([d for d in "0123456789abcdef" if d != good[at]]))
    forged = good[:at] + other + good[at + 1 :]
    if any(sign(body, key) == forged for key in keys):
        return  # another key's signature: astronomically unlikely, and valid
    with pytest.raises(InvalidSignature):
        verify_signature(body, forged, keys)


REAL_COMPARE_DIGEST = hmac.compare_digest


class CompareSpy:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls.append((a, b))
        return REAL_COMPARE_DIGEST(a, b)


BODY = b'{"message_id":"m1"}'


@pytest.mark.parametrize("keys", [[b"current"], [b"current", b"previous"]])
@pytest.mark.parametrize(
    "header",
    [
        sign(BODY, b"current"),
        sign(BODY, b"previous"),
        "f" + sign(BODY, b"current")[1:],  # wrong in the first digit
        sign(BODY, b"current")[:-1] + "0",  # wrong in the last digit
        "0" * 64,
    ],
    ids=["current", "previous", "first-digit", "last-digit", "zeros"],
)
def test_every_key_is_compared_with_compare_digest_on_bytes(
    monkeypatch: pytest.MonkeyPatch, keys: list[bytes], header: str
) -> None:
    spy = CompareSpy()
    monkeypatch.setattr(hmac, "compare_digest", spy)
    with contextlib.suppress(InvalidSignature):
        verify_signature(BODY, header, keys)
    # One comparison per key, whether and wherever it matched: no early exit to time.
    assert len(spy.calls) == len(keys)
    for expected, given_digest in spy.calls:
        assert type(expected) is bytes
        assert type(given_digest) is bytes
        assert len(expected) == len(given_digest) == hashlib.sha256().digest_size


def test_no_computed_digest_is_compared_with_equality_operators() -> None:
    # A digest compared with == or != would leak how many leading bytes were right: in
    # every function, a name bound to a computed MAC may only reach hmac.compare_digest.
    tree = ast.parse(inspect.getsource(signature_module))
    found_macs = 0
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        macs = {
            target.id
            for node in ast.walk(function)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            for target in node.targets
            if isinstance(target, ast.Name) and _computes_mac(node.value)
        }
        compared = {
            name.id
            for node in ast.walk(function)
            if isinstance(node, ast.Compare)
            and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops)
            for name in ast.walk(node)
            if isinstance(name, ast.Name)
        }
        assert not macs & compared, function.name
        found_macs += len(macs)
    assert found_macs  # the walk did find the verifiers' expected digests


def _computes_mac(call: ast.Call) -> bool:
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    return name in {"digest", "hexdigest", "_standard_digest"} or (
        isinstance(call.func, ast.Attribute)
        and isinstance(call.func.value, ast.Call)
        and _computes_mac(call.func.value)
    )


def test_mismatch_position_does_not_change_the_time_taken() -> None:
    # A figure, not an assertion (timings are noisy here): how much longer a forgery that is
    # right up to its last digit takes to refuse than one wrong from its first.
    good = sign(BODY, b"current")
    first = ("e" if good[0] == "f" else "f") + good[1:]
    last = good[:-1] + ("1" if good[-1] == "0" else "0")
    rounds = 2000 if TIER.name == "fast" else 50_000

    def median_ns(header: str) -> float:
        samples = []
        for _ in range(rounds):
            started = time.perf_counter_ns()
            with contextlib.suppress(InvalidSignature):
                verify_signature(BODY, header, [b"current"])
            samples.append(time.perf_counter_ns() - started)
        return statistics.median(samples)

    median_ns(first)  # warm-up
    ratio = median_ns(last) / median_ns(first)
    record("signature: refusal time, last-digit / first-digit forgery", f"{ratio:.3f}")
