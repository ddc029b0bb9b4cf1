"""Query parameters that several read endpoints share, declared once: the same name,
rules, validators and OpenAPI text wherever they appear (/messages, its export, the feed,
the console's lists)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query
from pydantic import AfterValidator, BeforeValidator

from app.models import INSTANT_PATTERN, NO_NUL_PATTERN, check_instant, check_msisdn, no_nul

Q_MAX = 256
# For the OpenAPI document: what a query parameter must look like (the validators decide).
SENDER_PATTERN = r"^[ +][1-9][0-9]{1,14}$"
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,1024}$"


def plus_for_space(value: object) -> object:
    # ?from=+91... unencoded arrives as " 91...": the '+' became a space.
    if isinstance(value, str) and value.startswith(" "):
        return "+" + value[1:]
    return value


def optional(check: Any) -> AfterValidator:
    return AfterValidator(lambda value: value if value is None else check(value))


Limit = Annotated[int, Query(ge=1, le=100)]
Sender = Annotated[
    str | None,
    Query(
        alias="from",
        description="Exact sender, E.164 (a leading space reads as '+')",
        json_schema_extra={"pattern": SENDER_PATTERN},
    ),
    BeforeValidator(plus_for_space),
    optional(check_msisdn),
]
Recipient = Annotated[
    str | None,
    Query(
        alias="to",
        description="Exact recipient, E.164 (a leading space reads as '+')",
        json_schema_extra={"pattern": SENDER_PATTERN},
    ),
    BeforeValidator(plus_for_space),
    optional(check_msisdn),
]
Since = Annotated[
    str | None,
    Query(
        description="Only messages with ts >= since (ISO-8601 UTC, like ts)",
        json_schema_extra={"pattern": INSTANT_PATTERN},
    ),
    optional(check_instant),
]
Until = Annotated[
    str | None,
    Query(
        description="Only messages with ts < until (exclusive; ISO-8601 UTC, like ts)",
        json_schema_extra={"pattern": INSTANT_PATTERN},
    ),
    optional(check_instant),
]
Search = Annotated[
    str | None,
    Query(
        max_length=Q_MAX,
        description="Case-insensitive substring of text",
        json_schema_extra={"pattern": NO_NUL_PATTERN},
    ),
    optional(no_nul),
]
