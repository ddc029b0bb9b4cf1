"""One JSON object per line on stdout, for our lines and the server's alike."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# uvicorn adds a coloured copy of its message for terminals.
_DROPPED_EXTRAS = frozenset({"color_message"})
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
FLUSH_SECONDS = 0.2
# INFO lines waiting at most; past this, the next one writes them all.
MAX_PENDING = 512
# What a log line never carries raw: control characters (C0, DEL, C1: a terminal obeys
# U+009B as ESC [), format characters (bidi overrides such as U+202E that reverse what a
# reader sees, zero-width characters that hide text), line and paragraph separators (many
# readers end a line at them), and lone surrogates. That is Unicode's Cc, Cf, Zl, Zp and
# Cs, as of Unicode 15 (tests/test_logging.py checks it against unicodedata). Each is
# written as its JSON escape, which decodes back to the same text: unambiguous, and the
# line stays one line of valid JSON.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    "\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)


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
        return safe_line(
            json.dumps(payload, ensure_ascii=False, default=str, separators=(",", ":"))
        )


def safe_line(line: str) -> str:
    """A JSON line with every character of _UNSAFE escaped (JSON escapes C0 itself)."""
    if line.isascii() and "\x7f" not in line:
        return line
    return _UNSAFE.sub(_json_escape, line)


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    if code > 0xFFFF:
        # JSON spells a character beyond the BMP as its UTF-16 surrogate pair.
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


class _JsonHandler(logging.Handler):
    """Writes the lines: access lines at INFO within FLUSH_SECONDS, all others at once.

    A busy server logs a line per request, and a write(2) per line was a fifth of the
    cost of a webhook. So INFO access lines (see AccessLog) wait in a list, and a small
    thread writes them every FLUSH_SECONDS in one call (or sooner, past MAX_PENDING
    lines). The buffering is ours rather than the stream's: PYTHONUNBUFFERED, common in
    containers, would otherwise turn every line back into a write(2). Any other line
    writes out what waits, then itself, so lines keep their order, and the last line a
    stopping server writes takes every access line before it out. On a kill -9, at most
    FLUSH_SECONDS of access lines are lost. Being our own class also lets reconfiguring
    find and replace this handler, and nothing else.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._pending: list[str] = []
        self._closing = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_regularly, name="log-flush", daemon=True
        )
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record), urgent=True)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)

    def write_line(self, line: str, *, urgent: bool) -> None:
        """Write one formatted line (no newline) now if `urgent`, else within FLUSH_SECONDS."""
        with self.lock:  # type: ignore[union-attr]
            pending = self._pending
            pending.append(line)
            if urgent or len(pending) >= MAX_PENDING:
                self._write_pending()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def _write_pending(self) -> None:
        # Called with the lock held.
        lines, self._pending = self._pending, []
        # The stream may be gone (closed by whoever owned it): nothing to do.
        with contextlib.suppress(ValueError, OSError):
            if lines:
                lines.append("")
                self.stream.write("\n".join(lines))
            self.stream.flush()

    def _flush_regularly(self) -> None:
        while not self._closing.wait(FLUSH_SECONDS):
            if self._pending:
                self.flush()

    def close(self) -> None:
        self._closing.set()
        self.flush()
        super().close()


def flush_logs() -> None:
    """Write out every line still waiting in the JSON handler."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _JsonHandler):
            handler.flush()


class AccessLog:
    """The per-request access line, written without building a LogRecord.

    Every request writes one, so it is the hottest log call by far: the logging module's
    path (a record, the formatter's generic loop, json.dumps of a dict) cost a third of
    the application's share of a webhook. The line is the JsonFormatter's format
    exactly, with the logger's configured level and handler. With any other logging
    setup (a handler of its own on the logger, a root without ours), the same fields go
    through the logging module.
    """

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)
        self._heads = {
            level: f'","level":"{logging.getLevelName(level)}","logger":'
            f'{encode_basestring(name)},"msg":"request","request_id":'
            for level in (logging.INFO, logging.WARNING, logging.ERROR)
        }

    def enabled(self, levelno: int) -> bool:
        return self.logger.isEnabledFor(levelno)

    def request(
        self,
        levelno: int,
        request_id: str,
        method: str,
        path: str,
        status: int,
        latency_ms: float,
        outcome: tuple[str | None, bool | None, str, str | None] | None = None,
    ) -> None:
        """Log one request; `outcome` is (message_id, dup, result, field), for a webhook
        or a refused request.

        message_id, dup and field appear only when known (not None).
        """
        sink = _sink
        head = self._heads.get(levelno)
        if (
            sink is None
            or head is None
            or self.logger.handlers
            or not self.logger.propagate
            or sink.handler not in logging.root.handlers
        ):
            fields: dict[str, Any] = {
                "request_id": request_id,
                "method": method,
                "path": path,
                "status": status,
                "latency_ms": latency_ms,
            }
            if outcome is not None:
                message_id, dup, result, field = outcome
                if message_id is not None:
                    fields["message_id"] = message_id
                if dup is not None:
                    fields["dup"] = dup
                fields["result"] = result
                if field is not None:
                    fields["field"] = field
            self.logger.log(levelno, "request", extra=fields)
            return
        line = (
            f'{{"ts":"{sink.timestamp(time.time())}{head}{encode_basestring(request_id)},'
            f'"method":{encode_basestring(method)},"path":{encode_basestring(path)},'
            f'"status":{status:d},"latency_ms":{latency_ms!r}'
        )
        if outcome is None:
            line += "}"
        else:
            message_id, dup, result, field = outcome
            if message_id is not None:
                line += ',"message_id":' + encode_basestring(message_id)
            if dup is not None:
                line += ',"dup":true' if dup else ',"dup":false'
            line += ',"result":' + encode_basestring(result)
            if field is not None:
                line += ',"field":' + encode_basestring(field)
            line += "}"
        sink.handler.write_line(safe_line(line), urgent=levelno >= logging.WARNING)


class _Sink:
    """The configured JSON handler and its formatter, for AccessLog."""

    def __init__(self, handler: _JsonHandler, formatter: JsonFormatter) -> None:
        self.handler = handler
        self.timestamp = formatter.timestamp


_sink: _Sink | None = None


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
    global _sink
    handler = _JsonHandler(stream if stream is not None else sys.stdout)
    formatter = JsonFormatter()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    _sink = _Sink(handler, formatter)
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
