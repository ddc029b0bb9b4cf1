"""One JSON object per line on stdout, for our lines and the server's alike."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# uvicorn adds a coloured copy of its message for terminals.
_DROPPED_EXTRAS = frozenset({"color_message"})
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
FLUSH_SECONDS = 0.2
_LINE_BREAKS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # Every request logs a line: the date and time part of `ts` is formatted once a
        # second, not once a line. One tuple, so threads never see half an update.
        self._second: tuple[int, str] = (-1, "")

    def timestamp(self, created: float) -> str:
        second = int(created)
        cached, text = self._second
        if second != cached:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, text)
        return f"{text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self.timestamp(record.created),
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
    """Writes the lines; WARNING and above reach the stream at once, the rest within
    FLUSH_SECONDS.

    A busy server logs a line per request, and a write(2) per line was a fifth of the
    cost of a webhook: INFO lines ride the stream's buffer and a small thread flushes
    it. On a kill -9, at most FLUSH_SECONDS of INFO lines are lost; a normal exit
    flushes them (logging.shutdown). Being our own class also lets reconfiguring find
    and replace this handler, and nothing else.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._unflushed = False
        self._closing = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_regularly, name="log-flush", daemon=True
        )
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if record.levelno >= logging.WARNING:
                self.stream.flush()
            else:
                self._unflushed = True
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)

    def _flush_regularly(self) -> None:
        while not self._closing.wait(FLUSH_SECONDS):
            if self._unflushed:
                with self.lock:  # type: ignore[union-attr]
                    self._unflushed = False
                    # The stream may be gone (closed by whoever owned it): nothing to do.
                    with contextlib.suppress(ValueError, OSError):
                        self.flush()

    def close(self) -> None:
        self._closing.set()
        super().close()


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Route every logger, uvicorn's included, through one JSON handler at `level`."""
    # Fields our lines never show, which the logging module would otherwise gather for
    # every record (the logging HOWTO's "Optimization" section): caller frame, thread,
    # process. Every request writes a line, so this is on the hot path.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _JsonHandler):
            root.removeHandler(handler)
            handler.close()
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
