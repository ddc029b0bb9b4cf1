"""`python -m app ...`: serve, init-db, sign, send, demo, follow; export, import, backup,
restore.

Exit codes: 0 done; 1 the service answered, but not as expected (`send`: a status other
than 2xx; `demo`: any step), or export, import, backup or restore was refused or failed
(`import`: an invalid line); 2 a usage or configuration error (a bad flag or URL, no
WEBHOOK_SECRET, an unreadable file); 3 the service could not be reached (refused, unknown
host, no answer in time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

from app.client import (
    FOLLOW_WAIT_SECONDS,
    BadURL,
    Client,
    FollowRefused,
    ServiceUnreachable,
    build_message,
    follow,
    format_ts,
    read_position,
    run_demo,
)
from app.logging_utils import refuse_to_start
from app.signature import sign, sign_standard_webhook

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_URL = "http://127.0.0.1:8000"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_server(args.host, args.port)
    if args.command == "init-db":
        return init_db()
    if args.command in LIFECYCLE_COMMANDS:
        return run_lifecycle(args)
    if args.command == "sign":
        if args.standard_webhooks:
            return print_standard_headers(args.file, args.id, args.timestamp)
        if args.whatsapp:
            return print_signature(args.file, "WHATSAPP_APP_SECRET", hub=True)
        return print_signature(args.file, "WEBHOOK_SECRET")
    try:
        client = Client(args.url, timeout=args.timeout, read_token=first_read_token())
    except BadURL as exc:
        return fail(str(exc), EXIT_USAGE)
    if args.command == "follow":
        return run_follow(client, args)
    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        return fail(_MISSING_KEY_HELP, EXIT_USAGE)
    try:
        if args.command == "send":
            return send(client, secret.encode(), args)
        ok = run_demo(client, secret.encode(), sys.stdout)
    except ServiceUnreachable as exc:
        return fail(str(exc), EXIT_UNREACHABLE)
    return EXIT_OK if ok else EXIT_UNEXPECTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="The webhook receiver: run it, or talk to a running one.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))

    commands.add_parser("init-db", help="create or upgrade the schema of DATABASE_URL")
    add_lifecycle_commands(commands)

    sign_cmd = commands.add_parser(
        "sign", help="print the X-Signature of a body, keyed with WEBHOOK_SECRET"
    )
    sign_cmd.add_argument("file", nargs="?", help="the body (default or '-': stdin)")
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

    send_cmd = commands.add_parser(
        "send", help="build, sign and POST one message; print the status and body"
    )
    send_cmd.add_argument("--message-id", help="default: a fresh cli-<random> id")
    send_cmd.add_argument(
        "--from",
        dest="sender",
        default="+919876543210",
        metavar="E164",
        help="default: %(default)s",
    )
    send_cmd.add_argument(
        "--to",
        dest="recipient",
        default="+14155550100",
        metavar="E164",
        help="default: %(default)s",
    )
    send_cmd.add_argument("--ts", help="YYYY-MM-DDTHH:MM:SSZ (default: now)")
    text = send_cmd.add_mutually_exclusive_group()
    text.add_argument("--text", default="Hello", help="default: %(default)s")
    text.add_argument("--no-text", action="store_true", help="send the message without text")

    demo_cmd = commands.add_parser(
        "demo", help="send a sample conversation and the failure cases; print /stats"
    )
    follow_cmd = commands.add_parser(
        "follow",
        help="print every stored message once, in feed order, as JSON lines; keep following",
        description="Polls GET /feed (long polls while nothing is new). Sends"
        " `Authorization: Bearer $READ_TOKEN` when READ_TOKEN is set (else the first of"
        " READ_TOKENS, if set). Stops on Ctrl-C.",
    )
    follow_cmd.add_argument(
        "--from", dest="sender", metavar="E164", help="only this sender's messages"
    )
    follow_cmd.add_argument(
        "--position-file",
        metavar="PATH",
        help="start after the position saved here, and save it after each printed batch",
    )
    follow_cmd.add_argument(
        "--after", type=int, default=None, help="start after this position (default 0)"
    )
    follow_cmd.add_argument(
        "--limit", type=int, default=100, help="messages per request, 1..1000 (default 100)"
    )
    for sub in (send_cmd, demo_cmd, follow_cmd):
        sub.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
        sub.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    return parser


def run_follow(client: Client, args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        return fail("--limit must be 1..1000", EXIT_USAGE)
    try:
        after = read_position(args.position_file) if args.after is None else args.after
    except (OSError, ValueError) as exc:
        return fail(str(exc), EXIT_USAGE)
    # A poll is held open up to FOLLOW_WAIT_SECONDS when nothing is new.
    client.timeout = max(client.timeout, FOLLOW_WAIT_SECONDS + client.timeout)
    # The consumer's own token first; else the first of the service's, as `demo` does.
    client.read_token = os.environ.get("READ_TOKEN") or client.read_token
    try:
        follow(
            client,
            sys.stdout,
            after=after,
            sender=args.sender,
            limit=args.limit,
            position_file=args.position_file,
            warn=sys.stderr,
        )
    except KeyboardInterrupt:
        return EXIT_OK  # the position file holds the last printed batch
    except FollowRefused as exc:
        hint = " (set READ_TOKEN to one of the service's READ_TOKENS)" if " 401" in str(exc) else ""
        return fail(f"{exc}{hint}", EXIT_UNEXPECTED)
    except BrokenPipeError:
        # The reader (head, a closed pipe) has had enough; stdout must not be flushed
        # into the closed pipe again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_OK


LIFECYCLE_COMMANDS = ("export", "import", "backup", "restore")


def add_lifecycle_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export", help="write the messages of DATABASE_URL to stdout as NDJSON"
    )
    export.add_argument("--from", dest="sender", metavar="E164", help="only this sender")
    export.add_argument("--to", dest="recipient", metavar="E164", help="only this recipient")
    export.add_argument("--since", metavar="TS", help="only messages with ts >= TS")
    export.add_argument("--until", metavar="TS", help="only messages with ts < TS")
    export.add_argument("--q", metavar="TEXT", help="only texts containing TEXT (any case)")
    import_cmd = commands.add_parser(
        "import", help="store the messages of an export (idempotent; a summary at the end)"
    )
    import_cmd.add_argument("file", help="the NDJSON file ('-': stdin)")
    import_cmd.add_argument(
        "--skip-invalid",
        action="store_true",
        help="report an invalid line and go on (default: stop at the first one)",
    )
    backup = commands.add_parser(
        "backup", help="copy the live SQLite database to a new file, checked"
    )
    backup.add_argument("path", help="the backup file to create")
    restore = commands.add_parser(
        "restore", help="put a backup in place of the SQLite database (service stopped)"
    )
    restore.add_argument("path", help="the backup file")


def run_lifecycle(args: argparse.Namespace) -> int:
    # Imported here, like the server: the other commands need only the standard library.
    from app import lifecycle_cli

    if args.command == "export":
        return lifecycle_cli.export(args.sender, args.recipient, args.since, args.until, args.q)
    if args.command == "import":
        return lifecycle_cli.import_(args.file, args.skip_invalid)
    if args.command == "backup":
        return lifecycle_cli.backup_(args.path)
    return lifecycle_cli.restore_(args.path)


_MISSING_KEY_HELP = (
    "WEBHOOK_SECRET is not set: export the secret the service verifies with "
    "(`make up` keeps a generated one in .env; `make demo` reads it from there)"
)


def first_read_token() -> str | None:
    """The first of READ_TOKENS (or of READ_TOKENS_FILE's content), for reading /stats."""
    tokens = os.environ.get("READ_TOKENS", "")
    path = os.environ.get("READ_TOKENS_FILE", "")
    if not tokens and path:
        try:
            with open(path, encoding="utf-8") as file:
                tokens = file.read()
        except (OSError, UnicodeDecodeError):
            return None  # the service refuses such a file itself, and says why
    return tokens.strip().split(",")[0] or None


def fail(message: str, code: int) -> int:
    print(f"python -m app: {message}", file=sys.stderr)
    return code


def run_server(host: str, port: int) -> int:
    # The server's imports live here: sign, send and demo need only the standard library,
    # so they also run on a bare python3 outside the virtualenv (`make demo`).
    from app.config import ConfigError, load_settings
    from app.server import serve

    try:
        settings = load_settings()
    except ConfigError as exc:
        refuse_to_start(str(exc))
        return EXIT_USAGE
    serve(settings, host, port)
    return EXIT_OK


def init_db() -> int:
    from app.config import ConfigError, load_database_settings
    from app.storage import StorageUnavailable
    from app.storage.migrations import SCHEMA_VERSION
    from app.storage.postgres.store import migrate
    from app.storage.sqlite.connection import init_sqlite

    try:
        settings = load_database_settings()
    except ConfigError as exc:
        refuse_to_start(str(exc))
        return EXIT_USAGE
    database = settings.database
    if database.scheme == "sqlite":
        version = init_sqlite(database.target)
        print(f"schema version {version} applied to {database.target}")
        return EXIT_OK
    try:
        asyncio.run(
            migrate(
                settings.direct_database_url,
                startup_timeout=settings.database_startup_timeout_seconds,
            )
        )
    except StorageUnavailable as exc:
        refuse_to_start(f"init-db: {exc}")
        return EXIT_UNEXPECTED
    where = describe_postgres_url(settings.direct_database_url)
    print(f"schema version {SCHEMA_VERSION} applied to {where}")
    return EXIT_OK


def describe_postgres_url(url: str) -> str:
    """host:port/database, without the user or password."""
    parts = urlsplit(url)
    return f"PostgreSQL at {parts.hostname}:{parts.port or 5432}{parts.path}"


def print_signature(path: str | None, variable: str, *, hub: bool = False) -> int:
    secret = os.environ.get(variable, "")
    if not secret:
        if variable == "WEBHOOK_SECRET":
            return fail(_MISSING_KEY_HELP, EXIT_USAGE)
        return fail(f"{variable} is not set: export the secret to sign with", EXIT_USAGE)
    body = read_input(path)
    if body is None:
        return EXIT_USAGE
    signature = sign(body, secret.encode())
    print("sha256=" + signature if hub else signature)
    return EXIT_OK


def print_standard_headers(path: str | None, webhook_id: str | None, timestamp: int | None) -> int:
    # Like the server's imports above: only this option needs the settings module.
    from app.config import standard_webhook_key

    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        return fail(_MISSING_KEY_HELP, EXIT_USAGE)
    try:
        key = standard_webhook_key(secret)
    except ValueError as exc:
        return fail(f"WEBHOOK_SECRET: {exc}", EXIT_USAGE)
    body = read_input(path)
    if body is None:
        return EXIT_USAGE
    webhook_id = webhook_id or "msg_" + os.urandom(12).hex()
    timestamp = int(time.time()) if timestamp is None else timestamp
    print(f"webhook-id: {webhook_id}")
    print(f"webhook-timestamp: {timestamp}")
    print(f"webhook-signature: {sign_standard_webhook(webhook_id, timestamp, body, key)}")
    return EXIT_OK


def read_input(path: str | None) -> bytes | None:
    """The body to sign, from a file or stdin; None (and a message) if unreadable."""
    if path in (None, "-"):
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or type(exc).__name__}", EXIT_USAGE)
        return None


def send(client: Client, secret: bytes, args: argparse.Namespace) -> int:
    message_id = args.message_id or f"cli-{os.urandom(6).hex()}"
    ts = args.ts or format_ts(datetime.now(UTC))
    text = None if args.no_text else args.text
    body = build_message(message_id, args.sender, args.recipient, ts, text)
    print(f"message_id {message_id}", file=sys.stderr)
    reply = client.post_webhook(body, sign(body, secret))
    print(f"{reply.status} {reply.text}")
    if reply.request_id:
        # The service logs this id with the request: grep for it in `make logs`.
        print(f"request_id {reply.request_id}", file=sys.stderr)
    if reply.status == 401:
        print(
            "hint: the service did not accept the signature; is WEBHOOK_SECRET the one it "
            "verifies with?",
            file=sys.stderr,
        )
    return EXIT_OK if 200 <= reply.status < 300 else EXIT_UNEXPECTED
