"""Server-Sent Events of GET /stream: what one stream has told its client, and the
events a newer state of the inbox makes.

Event ids are notification ids: each event carries the id of the first notification
in the array the client has been told of (24 zeros while the inbox is empty), the
newest one, or the one a create collapsed into (it moves to the front, keeping its
id). EventSource sends it back as Last-Event-ID when it reconnects, and the
notifications before it in the array are sent first. If that notification has gone
meanwhile (deleted, capped, expired), those stamped since the second its id was made,
less a margin, are sent: a few may come twice (more after a collapse, whose id is
older than its stamp), and their ids tell them apart.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeGuard

from .errors import ValidationFailed
from .schemas import listed
from .storage.mongo_connector import Document

ZERO_ID = "0" * 24
# EventSource reconnects after this long; served without asgi.py (a plain WSGI server),
# the stream is its first events only, and this is then how often the client asks again.
RETRY = b"retry: 3000\n\n"
HEARTBEAT = b": keep-alive\n\n"
# Notifications are stamped by the clock of the process that made them, which may be a
# little behind the one that made the id a client resumes from.
RESUME_MARGIN_SECONDS = 5
# A user's oldest notification expires (NOTIFICATIONS_TTL_DAYS) without any write: the
# stream asks for the inbox again just after, and at most once a second.
EXPIRY_MARGIN_SECONDS = 0.1
_ID_RE = re.compile(r"[0-9a-f]{24}")


def resume_point(header: str | None) -> str | None:
    """The notification id a Last-Event-ID header names; None without one.

    :raise ValidationFailed: anything but an id of this stream's events.
    """
    if not header:
        return None
    value = header.lower()
    if not _ID_RE.fullmatch(value):
        raise ValidationFailed(
            details=[
                {
                    "field": "Last-Event-ID",
                    "problem": "must be the id of an event of this stream "
                    "(24 hexadecimal characters)",
                }
            ]
        )
    return value


def _valid_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def _event(kind: str, event_id: str, data: Any) -> bytes:
    # Compact JSON escapes every control character: the data is one line, whatever the
    # notification holds, and cannot end the event or start another. The id is checked.
    body = json.dumps(data, ensure_ascii=True, separators=(",", ":"), default=str)
    return f"id: {event_id}\nevent: {kind}\ndata: {body}\n\n".encode("ascii")


class Feed:
    """What one stream has told its client, and the events a newer state of the inbox
    makes: a `notification` for each one it has not seen, or has seen with another
    `count` (a create collapsed into it: the client replaces the row of that id), oldest
    first, and `counts` when they differ from the last sent (always after the first
    state)."""

    def __init__(self, resume_from: str | None) -> None:
        self.resume_from = resume_from
        # The ids in the inbox at the last state, and the count of each.
        self.known: dict[Any, Any] | None = None
        self.cursor = ZERO_ID
        self.counts: dict[str, int] | None = None
        self.expires_at: float | None = None
        self._refreshed = 0.0

    def advance(self, state: Document) -> bytes:
        # The array is the application's too: only objects are notifications, and only
        # a string id is one to compare.
        items = [item for item in state["items"] if isinstance(item, dict)]
        ids = [item.get("id") if isinstance(item.get("id"), str) else None for item in items]
        tallies = [item.get("count") for item in items]
        known = self.known
        if known is None:
            new = self._missed(items, ids)
        else:
            # Notifications only ever join the array at its front, new or collapsed
            # into (counted once more): one whose id was not in the last state is new
            # (none comes back once gone), one whose count moved was collapsed into.
            new = [
                item
                for item, i, n in zip(items, ids, tallies, strict=True)
                if i not in known or known[i] != n
            ]
        self.known = dict(zip(ids, tallies, strict=True))
        self.cursor = next((i for i in ids if _valid_id(i)), ZERO_ID)
        self.expires_at = state["expires_at"]
        # One without a proper id can't be resumed from, nor told apart: not sent.
        # Only those sent get /list's defaults (schemas.listed).
        events = [
            _event("notification", n["id"], listed(n))
            for n in reversed(new)
            if _valid_id(n.get("id"))
        ]
        counts = {"elements": state["elements"], "new": state["new"]}
        if counts != self.counts:
            events.append(_event("counts", self.cursor, counts))
            self.counts = counts
        return b"".join(events)

    def _missed(self, items: list[Document], ids: list[Any]) -> list[Document]:
        """The notifications a resuming client has not seen (none for a new stream)."""
        if self.resume_from is None:
            return []
        if self.resume_from in ids:
            return items[: ids.index(self.resume_from)]
        # Gone: every one stamped since its id was made (ObjectId: seconds, then more).
        since = int(self.resume_from[:8], 16) - RESUME_MARGIN_SECONDS
        return [n for n in items if isinstance(n.get("timestamp"), int) and n["timestamp"] >= since]

    def refresh_in(self, now: float) -> float | None:
        """Seconds until the inbox must be read again for an expiry; None: never."""
        if self.expires_at is None:
            return None
        return max(self.expires_at + EXPIRY_MARGIN_SECONDS, self._refreshed + 1.0) - now

    def refreshing(self, now: float) -> None:
        self._refreshed = now
