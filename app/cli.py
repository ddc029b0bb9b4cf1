"""`python -m app ...`: serve, init-db, sign."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Sequence

import uvicorn

from app.config import ConfigError, load_settings, parse_database_url, standard_webhook_key
from app.logging_utils import refuse_to_start, uvicorn_log_config
from app.signature import sign, sign_standard_webhook
from app.storage import init_sqlite


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))

    commands.add_parser("init-db", help="create or upgrade the schema of DATABASE_URL")

    sign_cmd = commands.add_parser("sign", help="print the X-Signature for a body")
    sign_cmd.add_argument("file", nargs="?", help="the body (default: stdin)")
    scheme = sign_cmd.add_mutually_exclusive_group()
    scheme.add_argument(
        "--standard-webhooks",
        action="store_true",
        help="print the three Standard Webhooks headers instead (for curl -H @file)",
    )
    scheme.add_argument(
        "--whatsapp",
        action="store_true",
        help="print the X-Hub-Signature-256 value Meta would send, keyed with WHATSAPP_APP_SECRET",
    )
    sign_cmd.add_argument("--id", help="the webhook-id (default: a random msg_ id)")
    sign_cmd.add_argument("--timestamp", type=int, help="the webhook-timestamp (default: now)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_server(args.host, args.port)
    if args.command == "init-db":
        return init_db()
    if args.whatsapp:
        return print_signature(args.file, "WHATSAPP_APP_SECRET", hub=True)
    if args.standard_webhooks:
        return print_standard_headers(args.file, args.id, args.timestamp)
    return print_signature(args.file, "WEBHOOK_SECRET")


def run_server(host: str, port: int) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        refuse_to_start(str(exc))
        return 2
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_config=uvicorn_log_config(settings.log_level),
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=20,
    )
    return 0


def init_db() -> int:
    url = os.environ.get("DATABASE_URL", "sqlite:///./data/app.db")
    try:
        database = parse_database_url(url)
    except ValueError as exc:
        refuse_to_start(f"invalid configuration: DATABASE_URL: {exc}")
        return 2
    if database.scheme != "sqlite":
        refuse_to_start(
            "invalid configuration: DATABASE_URL: postgresql:// is not supported by this build"
        )
        return 2
    version = init_sqlite(database.target)
    print(f"schema version {version} applied to {database.target}")
    return 0


def print_signature(path: str | None, variable: str, *, hub: bool = False) -> int:
    secret = secret_from_env(variable)
    if secret is None:
        return 2
    signature = sign(read_body(path), secret.encode())
    print("sha256=" + signature if hub else signature)
    return 0


def print_standard_headers(path: str | None, webhook_id: str | None, timestamp: int | None) -> int:
    secret = secret_from_env("WEBHOOK_SECRET")
    if secret is None:
        return 2
    try:
        key = standard_webhook_key(secret)
    except ValueError as exc:
        print(f"WEBHOOK_SECRET: {exc}", file=sys.stderr)
        return 2
    webhook_id = webhook_id or "msg_" + secrets.token_hex(12)
    timestamp = int(time.time()) if timestamp is None else timestamp
    signature = sign_standard_webhook(webhook_id, timestamp, read_body(path), key)
    print(f"webhook-id: {webhook_id}")
    print(f"webhook-timestamp: {timestamp}")
    print(f"webhook-signature: {signature}")
    return 0


def secret_from_env(variable: str) -> str | None:
    secret = os.environ.get(variable, "")
    if not secret:
        print(
            f"{variable} is not set: export the secret the service verifies with", file=sys.stderr
        )
        return None
    return secret


def read_body(path: str | None) -> bytes:
    if path in (None, "-"):
        return sys.stdin.buffer.read()
    with open(path, "rb") as file:
        return file.read()
