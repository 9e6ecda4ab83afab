"""Logging, configured in one place: one JSON object a line by default, text for a terminal.

`configure` is called wherever a process starts (create_app, in each granian worker
process too, and the command line: `worker`, `sink`, `serve`). It replaces only the
handler it installed itself, so calling it again (tests build many apps) leaves one.

A JSON line is `{"ts", "level", "logger", "msg"}`, then `exc` (the traceback) when
there is one and `request_id` when logged inside a request. The access line of each
request (logger `notification_service.access`, msg `request`) adds `method`, `route`,
`path` (never the query string, and never the credential of an unsubscribe link: what
follows `/unsubscribe/` reads `<redacted>`), `status` and `duration_ms`; no body, no
header.
Every value is JSON-escaped (`ensure_ascii`): a hostile path cannot break the line,
forge another, or put a control character on an operator's terminal.

The web server's own lines (granian's start, stop and worker messages) go through the
same formatters: `serve` hands granian `granian_log_config` as its --log-config.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

from .config import Config

ACCESS_LOGGER = "notification_service.access"
# The record attribute that carries an access line's fields.
ACCESS_FIELDS = "access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

access_log = logging.getLogger(ACCESS_LOGGER)
# One encoder for every line (json.dumps with options would make one per call).
_JSON = json.JSONEncoder(ensure_ascii=True, default=str)

# An unsubscribe link's token is its credential (unsubscribe.py): it stays out of the log.
_UNSUBSCRIBE_RE = re.compile(r"(/unsubscribe/).*", re.IGNORECASE | re.DOTALL)
_REDACTED = r"\1<redacted>"
# An email address inside a text that quotes one (an SMTP reply: "550 <bob@x>: ...").
_ADDRESS_RE = re.compile(r"[^\s<>()\[\],;:\"']+@[^\s<>()\[\],;:\"']+")
# Control characters (C0, DEL, C1) and the Unicode line separators.
_UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        request_id = getattr(record, "request_id", None)
        if request_id and "request_id" not in doc:
            doc["request_id"] = request_id
        return _JSON.encode(doc)


class TextFormatter(logging.Formatter):
    """Today's human format; an access line reads `GET /path 200 1.2 ms request_id=...`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = getattr(record, ACCESS_FIELDS, None)
        if not isinstance(fields, dict):
            return super().formatMessage(record)
        message = record.message  # other handlers may format the same record
        record.message = (
            f"{fields['method']} {_printable(str(fields['path']))} {fields['status']} "
            f"{fields['duration_ms']:.1f} ms request_id={fields['request_id']}"
        )
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


class RequestIdFilter(logging.Filter):
    """Adds the request id of the Flask request being handled in this thread, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            from flask import g, has_request_context

            if has_request_context():
                record.request_id = g.get("request_id")
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is logged (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def make_handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """A handler with the formatter of `log_format` (`json` or `text`) and the request id.

    `stream` defaults to the current sys.stderr.
    """
    handler: logging.Handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if log_format == "text" else JsonFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure(config: Config) -> None:
    """Send every log line of this process to stderr in LOG_FORMAT at LOG_LEVEL.

    Idempotent: the handler a previous call installed is replaced, others are kept.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_notification_service", False)]:
        root.removeHandler(old)
        old.close()
    handler = make_handler(config.log_format or "json")
    handler._notification_service = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.log_level)
    # What no line here shows, so no record gathers it (the logging HOWTO's
    # "Optimization"): the caller's file and line (a walk up the stack for every
    # record), the thread, the process. The access line is logged on every request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


# granian's loggers: its Rust core and its Python side log as `_granian`.
GRANIAN_LOGGERS = ("_granian", "granian.access")


def granian_log_config(log_format: str) -> dict[str, Any]:
    """The logging dictConfig for granian's --log-config: its lines in `log_format`
    (`json` or `text`), on stderr like every other line. Its --log-level still sets
    the level. Not propagated: in a worker process the root logger holds our handler
    too (`configure`), which would print each line twice."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "service": {
                "class": "logging.StreamHandler",
                "formatter": "service",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            name: {"handlers": ["service"], "propagate": False} for name in GRANIAN_LOGGERS
        },
    }


def log_access(fields: dict[str, Any]) -> None:
    """The access line of one request: `fields` as described in this module's docstring."""
    if access_log.isEnabledFor(logging.INFO):
        path = fields.get("path")
        if isinstance(path, str) and "/unsubscribe/" in path.lower():
            fields = {**fields, "path": _UNSUBSCRIBE_RE.sub(_REDACTED, path, count=1)}
        # The request id given, so that RequestIdFilter need not look for the request.
        extra = {ACCESS_FIELDS: fields, "request_id": fields.get("request_id")}
        access_log.info("request", extra=extra)


def without_addresses(text: str) -> str:
    """`text` with every email address in it replaced by `<address>`: for a log line
    that quotes an SMTP server's reply, which names the recipient it refused. A log is
    kept apart from the user's data, and no erasure reaches it."""
    return _ADDRESS_RE.sub("<address>", text)


def _iso_utc(created: float) -> str:
    stamp = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _printable(text: str) -> str:
    return _UNPRINTABLE_RE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
