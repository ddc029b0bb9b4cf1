"""`python -m app ...`: serve, init-db, sign."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import uvicorn

from app.config import ConfigError, load_settings, parse_database_url
from app.logging_utils import refuse_to_start, uvicorn_log_config
from app.server import guarded_protocol
from app.signature import sign
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

    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_server(args.host, args.port)
    if args.command == "init-db":
        return init_db()
    return print_signature(args.file)


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
        http=guarded_protocol(
            max_head_bytes=settings.http_max_head_bytes,
            head_timeout=settings.http_head_timeout_seconds,
            body_timeout=settings.http_body_timeout_seconds,
        ),
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


def print_signature(path: str | None) -> int:
    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        print(
            "WEBHOOK_SECRET is not set: export the secret the service verifies with",
            file=sys.stderr,
        )
        return 2
    if path in (None, "-"):
        body = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as file:
            body = file.read()
    print(sign(body, secret.encode()))
    return 0
