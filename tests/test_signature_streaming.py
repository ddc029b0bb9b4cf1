"""X-Hub-Signature-256 checked as the body streams in: the same answers as the one-shot
check, whatever the chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.signature import (
    MALFORMED,
    MISMATCH,
    MISSING,
    InvalidSignature,
    StreamingHubVerifier,
    sign,
    verify_hub_signature,
)

KEY = b"app-secret"
OLD_KEY = b"old-app-secret"


def streamed(body: bytes, header: str | None, secrets: list[bytes], cuts: list[int]) -> int:
    verifier = StreamingHubVerifier(header, secrets)
    start = 0
    for cut in sorted({min(cut, len(body)) for cut in cuts}):
        verifier.update(body[start:cut])
        start = cut
    verifier.update(body[start:])
    return verifier.verify()


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8), st.booleans())
def test_any_chunking_verifies_as_the_whole_body_does(
    body: bytes, cuts: list[int], old: bool
) -> None:
    header = "sha256=" + sign(body, OLD_KEY if old else KEY)
    secrets = [KEY, OLD_KEY]
    assert streamed(body, header, secrets, cuts) == verify_hub_signature(body, header, secrets)
    assert streamed(body, header, secrets, cuts) == (1 if old else 0)


@pytest.mark.parametrize(
    ("header", "why"),
    [(None, MISSING), ("", MALFORMED), ("sha256=xyz", MALFORMED), ("sha1=" + "0" * 40, MALFORMED)],
)
def test_a_missing_or_malformed_header_is_refused_before_any_body(
    header: str | None, why: str
) -> None:
    with pytest.raises(InvalidSignature) as caught:
        StreamingHubVerifier(header, [KEY])
    assert caught.value.reason == why


def test_another_body_does_not_verify() -> None:
    verifier = StreamingHubVerifier("sha256=" + sign(b"the body", KEY), [KEY])
    verifier.update(b"the body, and more")
    with pytest.raises(InvalidSignature) as caught:
        verifier.verify()
    assert caught.value.reason == MISMATCH
