"""One JSON object per line on stdout, for our lines and the server's alike."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# uvicorn adds a coloured copy of its message for terminals.
_DROPPED_EXTRAS = frozenset({"color_message"})
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
_LINE_BREAKS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in _DROPPED_EXTRAS:
                payload[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, _, tb = record.exc_info
            # The type and the frames, not the exception's message: messages can quote
            # the data that caused them (a body, a phone number).
            payload["exc_type"] = exc_type.__name__
            payload["traceback"] = "".join(traceback.format_tb(tb)).rstrip()
        line = json.dumps(payload, ensure_ascii=False, default=str)
        if not line.isascii():
            # JSON leaves these unescaped, but many readers (Python's splitlines, JavaScript,
            # log shippers) end a line at them: a sender's message_id must not split a line.
            for char, escaped in _LINE_BREAKS:
                line = line.replace(char, escaped)
        return line


class _JsonHandler(logging.StreamHandler[TextIO]):
    """Marks the handler we install, so reconfiguring replaces it and nothing else."""


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Route every logger, uvicorn's included, through one JSON handler at `level`."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _JsonHandler):
            root.removeHandler(handler)
    handler = _JsonHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in _SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.setLevel(logging.NOTSET)
        server_logger.propagate = True
    # We write our own access line, with the request id and the webhook outcome.
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
    logging.captureWarnings(True)


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """A dictConfig for uvicorn.run(), so the server's very first lines are JSON too."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stdout"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
        },
    }


def refuse_to_start(message: str, stream: TextIO | None = None) -> None:
    """The one line written when configuration is unusable: JSON, on stderr."""
    record = logging.makeLogRecord(
        {"name": "app.config", "levelno": logging.CRITICAL, "levelname": "CRITICAL", "msg": message}
    )
    out = stream if stream is not None else sys.stderr
    out.write(JsonFormatter().format(record) + "\n")
    out.flush()
