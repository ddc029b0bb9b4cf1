"""The naive reference: how this service is commonly first written.

A Pydantic body parameter (so FastAPI parses JSON before anything else), the signature
checked afterwards against the raw body, a new SQLite connection and a commit per request
in the default journal mode, no indexes beyond the primary key, COUNT(*) and GROUP BY for
every listing and /stats. Still correct and durable; just not fast.

    DATABASE_URL=sqlite:///./naive.db WEBHOOK_SECRET=... uvicorn bench.naive:app
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

SECRET = os.environ.get("WEBHOOK_SECRET", "").encode()
PATH = os.environ.get("DATABASE_URL", "sqlite:///./naive.db").removeprefix("sqlite:///")
E164 = r"^\+[1-9][0-9]{1,14}$"
TS = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$"

app = FastAPI()


class Message(BaseModel):
    message_id: str = Field(min_length=1)
    from_: str = Field(alias="from", pattern=E164)
    to: str = Field(pattern=E164)
    ts: str = Field(pattern=TS)
    text: str | None = Field(default=None, max_length=4096)


def connect() -> sqlite3.Connection:
    conn = sqlite3.connect(PATH)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS messages (message_id TEXT PRIMARY KEY, from_msisdn TEXT"
        " NOT NULL, to_msisdn TEXT NOT NULL, ts TEXT NOT NULL, text TEXT, created_at TEXT"
        " NOT NULL)"
    )
    return conn


@app.post("/webhook")
async def webhook(
    message: Message,
    request: Request,
    response: Response,
    x_signature: Annotated[str, Header()] = "",
) -> dict[str, str]:
    body = await request.body()
    expected = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, x_signature.lower()):
        raise HTTPException(status_code=401, detail="invalid signature")
    conn = connect()
    try:
        conn.execute(
            "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?)",
            (
                message.message_id,
                message.from_,
                message.to,
                message.ts,
                message.text,
                datetime.now(UTC).isoformat(),
            ),
        )
        conn.commit()
    finally:
        conn.close()
    # Echoed so the benchmark can tell which deliveries were acknowledged.
    response.headers["x-request-id"] = request.headers.get("x-request-id", "")
    return {"status": "ok"}


@app.get("/messages")
def messages(
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
    q: str | None = None,
) -> dict[str, Any]:
    conn = connect()
    try:
        where, params = "", []
        if q:
            where, params = " WHERE text LIKE ?", [f"%{q}%"]
        total = conn.execute(f"SELECT COUNT(*) FROM messages{where}", params).fetchone()[0]
        rows = conn.execute(
            f"SELECT message_id, from_msisdn, to_msisdn, ts, text FROM messages{where}"
            " ORDER BY ts, message_id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        ).fetchall()
    finally:
        conn.close()
    data = [dict(zip(("message_id", "from", "to", "ts", "text"), r, strict=True)) for r in rows]
    return {"data": data, "total": total, "limit": limit, "offset": offset}


@app.get("/stats")
def stats() -> dict[str, Any]:
    conn = connect()
    try:
        total = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        senders = conn.execute("SELECT COUNT(DISTINCT from_msisdn) FROM messages").fetchone()[0]
        top = conn.execute(
            "SELECT from_msisdn, COUNT(*) c FROM messages GROUP BY from_msisdn"
            " ORDER BY c DESC, from_msisdn LIMIT 10"
        ).fetchall()
        first, last = conn.execute("SELECT MIN(ts), MAX(ts) FROM messages").fetchone()
    finally:
        conn.close()
    return {
        "total_messages": total,
        "senders_count": senders,
        "messages_per_sender": [{"from": f, "count": c} for f, c in top],
        "first_message_ts": first,
        "last_message_ts": last,
    }
