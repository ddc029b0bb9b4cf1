"""Property tests: the validators against strict oracles written without regular expressions.

The oracles spell out SPEC section 2 character by character: E.164 is '+', then 2 to 15
ASCII digits, the first not 0; a timestamp is YYYY-MM-DDTHH:MM:SS, optionally 1 to 9
fractional digits, then an upper-case Z, every digit ASCII, and a real calendar instant.
Hypothesis throws near misses at both: other scripts' digits, trailing newlines, offsets,
lower-case z, leap seconds, 10-digit fractions, February 29ths.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from app.api.params import SENDER_PATTERN, plus_for_space
from app.models import (
    E164_PATTERN,
    INSTANT_PATTERN,
    InvalidMessage,
    Message,
    check_instant,
    check_msisdn,
    instant_key,
    parse_message,
)
from tests.support.tiers import TIER

pytestmark = pytest.mark.reliability

ASCII_DIGITS = "0123456789"
# Digits of other scripts that str.isdigit() and `\d` accept: Arabic-Indic, Devanagari,
# fullwidth, superscript, Bengali.
FOREIGN_DIGITS = "٠١٢٣٤٥٦٧٨٩०१२३४५६७८९０１２３４５６７８９²³൧১"
PROPERTY = settings(
    max_examples=TIER.examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def e164_oracle(value: str) -> bool:
    digits = value[1:]
    return (
        value[:1] == "+"
        and 2 <= len(digits) <= 15
        and all(char in ASCII_DIGITS for char in digits)
        and digits[0] != "0"
    )


def is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def days_in(year: int, month: int) -> int:
    if month == 2:
        return 29 if is_leap(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def instant_oracle(value: str) -> bool:
    if not value.endswith("Z"):
        return False
    main, dot, fraction = value[:-1].partition(".")
    if dot and not (1 <= len(fraction) <= 9 and all(c in ASCII_DIGITS for c in fraction)):
        return False
    shape = "dddd-dd-ddTdd:dd:dd"
    if len(main) != len(shape):
        return False
    for char, kind in zip(main, shape, strict=True):
        if (kind == "d" and char not in ASCII_DIGITS) or (kind != "d" and char != kind):
            return False
    year, month, day = int(main[0:4]), int(main[5:7]), int(main[8:10])
    hour, minute, second = int(main[11:13]), int(main[14:16]), int(main[17:19])
    return (
        year >= 1
        and 1 <= month <= 12
        and 1 <= day <= days_in(year, month)
        and hour < 24
        and minute < 60
        and second < 60
    )


def accepts(check: object, value: str) -> bool:
    assert callable(check)
    try:
        check(value)
    except ValueError:
        return False
    return True


def ecma_match(pattern: str, value: str) -> bool:
    """A JSON Schema pattern as ECMA-262 reads it: `$` is the very end, not before a newline."""
    assert pattern.endswith("$")
    return re.search(pattern[:-1] + r"\Z", value) is not None


def perturb_digits(draw: st.DrawFn, value: str) -> str:
    """Maybe swap one ASCII digit for another script's digit."""
    positions = [i for i, char in enumerate(value) if char in ASCII_DIGITS]
    swap: bool = draw(st.booleans())
    if positions and swap:
        at: int = draw(st.sampled_from(positions))
        value = value[:at] + draw(st.sampled_from(FOREIGN_DIGITS)) + value[at + 1 :]
    return value


@st.composite
def near_e164(draw: st.DrawFn) -> str:
    first = draw(st.sampled_from(ASCII_DIGITS))
    rest = draw(st.text(ASCII_DIGITS, min_size=0, max_size=16))
    value = draw(st.sampled_from(["+", "", "00", " ", "++", "\uff0b"])) + first + rest
    value = perturb_digits(draw, value)
    return value + draw(st.sampled_from(["", "", "", "\n", " ", "\x00", "#1", "\t"]))


@st.composite
def near_instants(draw: st.DrawFn) -> str:
    def two(low: int, high: int) -> str:
        return f"{draw(st.integers(low, high)):02d}"

    year = f"{draw(st.integers(0, 10000)):04d}"
    month, day = two(0, 13), two(0, 32)
    if draw(st.booleans()):  # February 29th and its neighbours, leap years or not
        month, day = "02", draw(st.sampled_from(["28", "29", "30"]))
        year = draw(st.sampled_from(["1900", "2000", "2023", "2024", "2100", "2400", "0004"]))
    hour, minute = two(0, 25), two(0, 61)
    second = draw(st.sampled_from(["00", "59", "60", "61", two(0, 59)]))
    fraction = draw(st.one_of(st.just(""), st.text(ASCII_DIGITS, min_size=0, max_size=11)))
    dot = "." if fraction or draw(st.booleans()) else ""
    sep = draw(st.sampled_from(["T", "T", "T", "t", " ", "_"]))
    suffix = draw(st.sampled_from(["Z", "Z", "Z", "z", "", "+00:00", "-05:30", "Z\n", "ZZ"]))
    value = f"{year}-{month}-{day}{sep}{hour}:{minute}:{second}{dot}{fraction}{suffix}"
    return perturb_digits(draw, value)


ANY_TEXT = st.text(max_size=40)


@PROPERTY
@given(st.one_of(near_e164(), ANY_TEXT))
@example("+919876543210")
@example("+919876543210\n")
@example("+٩١٩٨٧٦٥٤٣٢١٠")
@example("+0123")
@example("+1")
@example("+1234567890123456")
def test_e164_validator_agrees_with_the_oracle(value: str) -> None:
    expected = e164_oracle(value)
    assert accepts(check_msisdn, value) == expected
    # The OpenAPI document says the same, and so does /messages?from=.
    assert ecma_match(E164_PATTERN, value) == expected
    assert ecma_match(SENDER_PATTERN, value) == expected or value.startswith(" ")
    assert accepts(check_msisdn, str(plus_for_space(value))) == e164_oracle(
        "+" + value[1:] if value.startswith(" ") else value
    )


@PROPERTY
@given(st.one_of(near_instants(), ANY_TEXT))
@example("2025-01-15T10:00:00Z")
@example("2025-01-15T10:00:00.123456789Z")
@example("2025-01-15T10:00:00.1234567890Z")
@example("2025-01-15T10:00:00z")
@example("2025-01-15T10:00:00Z\n")
@example("2025-01-15T10:00:00+00:00")
@example("2016-12-31T23:59:60Z")
@example("2024-02-29T00:00:00Z")
@example("2023-02-29T00:00:00Z")
@example("0000-01-01T00:00:00Z")
@example("2025-01-15T10:00:00.Z")
@example("２０２５-01-15T10:00:00Z")
def test_timestamp_validator_agrees_with_the_oracle(value: str) -> None:
    expected = instant_oracle(value)
    assert accepts(check_instant, value) == expected
    assert ecma_match(INSTANT_PATTERN, value) == expected


def as_instant(value: str) -> tuple[datetime, Decimal]:
    main, _, fraction = value[:-1].partition(".")
    return datetime.fromisoformat(main), Decimal("0." + (fraction or "0"))


@st.composite
def valid_instants(draw: st.DrawFn) -> str:
    moment = draw(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)))
    fraction = draw(st.one_of(st.just(""), st.text(ASCII_DIGITS, min_size=1, max_size=9)))
    return (
        moment.strftime("%Y-%m-%dT%H:%M:%S").zfill(19) + (f".{fraction}" if fraction else "") + "Z"
    )


VALID_INSTANTS = valid_instants()


@PROPERTY
@given(VALID_INSTANTS, VALID_INSTANTS)
@example("2025-01-15T10:00:00Z", "2025-01-15T10:00:00.05Z")
@example("2025-01-15T10:00:00.5Z", "2025-01-15T10:00:00.123456789Z")
def test_instant_keys_sort_like_the_instants(a: str, b: str) -> None:
    assert (instant_key(a) < instant_key(b)) == (as_instant(a) < as_instant(b))
    assert (instant_key(a) == instant_key(b)) == (as_instant(a) == as_instant(b))


def message_oracle(data: object) -> bool:
    if not isinstance(data, dict):
        return False
    message_id, text = data.get("message_id"), data.get("text")
    return (
        isinstance(message_id, str)
        and 1 <= len(message_id) <= 256
        and "\x00" not in message_id
        and all(isinstance(data.get(k), str) and e164_oracle(data[k]) for k in ("from", "to"))
        and isinstance(data.get("ts"), str)
        and instant_oracle(data["ts"])
        and (text is None or (isinstance(text, str) and len(text) <= 4096 and "\x00" not in text))
    )


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), ANY_TEXT
)
MESSAGES = st.fixed_dictionaries(
    {
        "message_id": st.one_of(st.text(max_size=260), JSON_SCALARS),
        "from": st.one_of(near_e164(), JSON_SCALARS),
        "to": st.one_of(near_e164(), JSON_SCALARS),
        "ts": st.one_of(near_instants(), JSON_SCALARS),
    },
    optional={"text": st.one_of(st.text(max_size=4100), JSON_SCALARS), "extra": JSON_SCALARS},
)


@PROPERTY
@given(MESSAGES)
def test_the_message_model_agrees_with_the_oracles(data: dict[str, object]) -> None:
    try:
        raw = json.dumps(data).encode()
    except (UnicodeEncodeError, ValueError):
        assume(False)
    try:
        message = parse_message(raw)
    except InvalidMessage as exc:
        assert not message_oracle(data)
        # Errors never quote the input back.
        for error in exc.errors:
            assert set(error) == {"loc", "msg", "type"}
        return
    assert message_oracle(data)
    assert message == Message.model_validate(data)


@PROPERTY
@given(st.binary(max_size=300))
def test_any_bytes_are_a_message_or_invalid_message(raw: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        parse_message(raw)
