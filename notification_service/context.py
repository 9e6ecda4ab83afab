"""What the front (asgi.py) hands the app with each request, and what the app hands
back: one typed object under one key of the WSGI environ.

Under a plain WSGI server (the tests' client, a WSGI server without asgi.py) there is
none: `request_context` is None, and each reader has its default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .sse import Feed
from .stream_hub import Held, StreamHub

ENVIRON_KEY = "notification_service.request"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class RequestContext:
    """`received_at`: the monotonic time at which the whole request was in (its database
    deadline counts from there, a wait for a free thread included; the front answers 503
    itself for a request no thread has started by then). `edge_error`: the
    front's refusal (too large, too slow, cut short), which the app raises before
    anything else. `streams`: the process's stream hub. `held`: the stream the view
    started, for the front to hold once the view has answered."""

    received_at: float
    edge_error: ApiError | None = None
    streams: StreamHub | None = None
    held: Held | None = None


def request_context(environ: Mapping[str, Any]) -> RequestContext | None:
    """The request's context; None when no front made one (plain WSGI)."""
    context: RequestContext | None = environ.get(ENVIRON_KEY)
    return context


def request_id(given: str | None) -> str:
    """The id of a request: the caller's X-Request-ID when it is sane (1 to 64 of
    letters, digits, `.`, `_`, `-`), else a new one."""
    if given is not None and _REQUEST_ID_RE.fullmatch(given):
        return given
    return os.urandom(16).hex()


def hold_stream(
    environ: Mapping[str, Any], user_id: str, feed: Feed, until: float | None = None
) -> None:
    """Take a stream slot for this request, when asgi.py serves it (a GET).

    Without asgi.py the answer is the first events alone (a snapshot): the client comes
    back after RETRY with its Last-Event-ID, as it would after a dropped connection.

    :raise TooManyStreams: the process holds STREAM_MAX_PER_PROCESS streams.
    """
    context = request_context(environ)
    if context is None or context.streams is None or environ.get("REQUEST_METHOD") != "GET":
        return
    context.held = context.streams.hold(user_id, feed, until)
