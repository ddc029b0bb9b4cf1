"""The console's records: conversations, the timeline, and refused deliveries.

The timeline's range arithmetic lives here too: buckets are whole UTC hours or days of
`ts` (the sender's clock, as /stats' first and last are), so a range is rounded out to
whole buckets, and the store is asked for hour keys (`YYYY-MM-DDTHH`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from app.models import Message, instant_key

BucketSize = Literal["hour", "day"]
BUCKET_LENGTH: dict[str, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
# Without `since`: the last 48 hours, or the last 30 days.
DEFAULT_SPAN: dict[str, timedelta] = {"hour": timedelta(hours=48), "day": timedelta(days=30)}
# At most a leap year of hours, or ten years of days, per request.
MAX_BUCKETS: dict[str, int] = {"hour": 366 * 24, "day": 3660}
# How long each bucket's key is: 'YYYY-MM-DDTHH' or 'YYYY-MM-DD'.
KEY_LENGTH: dict[str, int] = {"hour": 13, "day": 10}
_HOURS = [f"T{hour:02}" for hour in range(24)]


class Conversation(BaseModel):
    """One sender's messages, summed up: how many, from when to when, and the last one."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    from_: str = Field(alias="from")
    count: int
    first_ts: str = Field(description="The earliest ts of the sender's messages, as received")
    last_ts: str = Field(description="The latest ts, as received: last_message's")
    last_message: Message = Field(
        description="The greatest (ts as an instant, message_id): the last one /messages lists"
    )


class ConversationPage(BaseModel):
    data: list[Conversation]
    limit: int
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next (older) page; null at the end."
    )


class TimelineBucket(BaseModel):
    start: str = Field(description="The bucket's first instant, YYYY-MM-DDTHH:00:00Z (UTC)")
    count: int


class Timeline(BaseModel):
    bucket: BucketSize
    since: str = Field(description="The first bucket's start (since, rounded down)")
    until: str = Field(description="The end of the last bucket (until, rounded up): exclusive")
    total: int
    data: list[TimelineBucket] = Field(description="Every bucket in the range, empty ones at 0")


class Rejection(BaseModel):
    """A refused delivery: never its body, a header value or a secret."""

    id: int
    at: str = Field(description="Server time of the refusal, ISO-8601 UTC")
    endpoint: str
    reason: str
    field: str | None = Field(
        description="invalid_field: where the first problem is; conflict: the fields that differ"
    )
    remote: str | None = Field(description="The peer address (behind a proxy: the proxy's)")
    body_bytes: int
    message_id: str | None = Field(description="conflict: the message_id that was reused")
    request_id: str | None = Field(description="The request's X-Request-ID, as in its log line")


class RejectionPage(BaseModel):
    data: list[Rejection]
    limit: int
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next (older) page; null at the end."
    )


# What a conflict check compares: (from, to, ts as an instant key, text).
StoredContent = tuple[str, str, str, str | None]


class Refusal(NamedTuple):
    """A rejection as the recorder queues it, before the store gives it an id."""

    at: str
    endpoint: str
    reason: str
    field: str | None
    remote: str | None
    body_bytes: int
    message_id: str | None
    request_id: str | None


@dataclass(frozen=True, slots=True)
class TimelineRange:
    """Whole buckets: from `start` (inclusive) to `end` (exclusive), both UTC."""

    bucket: BucketSize
    start: datetime
    end: datetime

    @property
    def start_hour(self) -> str:
        return hour_key(self.start)

    @property
    def end_hour(self) -> str:
        return hour_key(self.end)

    def starts(self) -> list[datetime]:
        step = BUCKET_LENGTH[self.bucket]
        count = (self.end - self.start) // step
        return [self.start + step * index for index in range(count)]

    def key(self, moment: datetime) -> str:
        return hour_key(moment)[: KEY_LENGTH[self.bucket]]


class RangeError(ValueError):
    """A timeline range that cannot be served; `param` names the query parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def hour_key(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H")


def instant_text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _floor(moment: datetime, bucket: BucketSize) -> datetime:
    moment = moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if bucket == "day" else moment


def _parse(instant: str) -> tuple[datetime, bool]:
    """A valid ts as a datetime to the second, and whether it had a non-zero fraction."""
    key = instant_key(instant)
    moment = datetime.strptime(key[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return moment, key[20:29] != "000000000"


def timeline_range(
    bucket: BucketSize, since: str | None, until: str | None, now: datetime
) -> TimelineRange:
    """The whole buckets that overlap [since, until); RangeError says what is wrong.

    `until` defaults to `now`, `since` to DEFAULT_SPAN before `until`.
    """
    step = BUCKET_LENGTH[bucket]
    try:
        if until is None:
            end_moment, fraction = now.astimezone(UTC).replace(microsecond=0), True
        else:
            end_moment, fraction = _parse(until)
        end = _floor(end_moment, bucket)
        if end != end_moment or fraction:
            end += step  # the bucket holding `until` starts before it: it is in
        start = end - DEFAULT_SPAN[bucket] if since is None else _floor(_parse(since)[0], bucket)
    except OverflowError:
        raise RangeError("since" if until is None else "until", "is outside the calendar") from None
    if start >= end or (
        since is not None and until is not None and instant_key(since) >= instant_key(until)
    ):
        raise RangeError("since", "must be earlier than until")
    if (end - start) // step > MAX_BUCKETS[bucket]:
        raise RangeError(
            "since", f"is more than {MAX_BUCKETS[bucket]} {bucket} buckets before until"
        )
    return TimelineRange(bucket, start, end)


def dense_timeline(span: TimelineRange, counts: dict[str, int]) -> bytes:
    """The Timeline JSON of `span`, every bucket, from sparse (bucket key -> count) rows.

    Written out directly, day by day: a year of hours is 8,784 buckets, and a model or a
    datetime formatted per bucket would cost several times the query.
    """
    parts = []
    total = 0
    day = span.start.replace(hour=0)
    first_hour, last_hour = hour_key(span.start), hour_key(span.end)
    while day < span.end:
        date = day.date().isoformat()
        if span.bucket == "day":
            count = counts.get(date, 0)
            total += count
            parts.append(f'{{"start":"{date}T00:00:00Z","count":{count}}}')
        else:
            for hour in _HOURS:
                key = date + hour
                if first_hour <= key < last_hour:
                    count = counts.get(key, 0)
                    total += count
                    parts.append(f'{{"start":"{key}:00:00Z","count":{count}}}')
        day += BUCKET_LENGTH["day"]
    head = (
        f'{{"bucket":"{span.bucket}","since":"{instant_text(span.start)}",'
        f'"until":"{instant_text(span.end)}","total":{total},"data":['
    )
    return (head + ",".join(parts) + "]}").encode()
