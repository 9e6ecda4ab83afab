"""The live inbox, GET /stream: Server-Sent Events held on the event loop of asgi.py.

A stream starts as an ordinary request: the Flask view (notification_handler.stream)
runs in one of the WEB_THREADS threads for one read of the user's inbox, checks the
key, user_id and Last-Event-ID, makes the first events and takes one of the process's
STREAM_MAX_PER_PROCESS slots (`hold`). asgi.py sends that answer and hands the
connection to `StreamHub.serve`, which holds it on the event loop: an open stream costs
a task and a few objects there, never a thread.

One `Watcher` per process learns which of the followed users changed: from one change
stream on the users collection where the deployment has them (a replica set), else by
reading the followed users' `version` (it moves on every write of an inbox) every
STREAM_POLL_SECONDS. It then reads the changed users' inboxes, 50 users a query, and
hands each state to that user's streams, whose `Feed` sends what is new in it. As
everything comes from the database, a write made through any process reaches the
streams of every process; and a watcher that may have missed changes (the database
away, its change stream reopened) reads every followed inbox again.

Event ids are notification ids: each event carries the id of the newest notification
the client has been told of (24 zeros while the inbox is empty). EventSource sends it
back as Last-Event-ID when it reconnects, and the notifications before it in the array
are sent first. If that notification has gone meanwhile (deleted, capped, expired),
those stamped since the second its id was made, less a margin, are sent: a few may come
twice, and their ids tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeGuard

from . import logs, metrics
from .config import Config
from .errors import TooManyStreams, ValidationFailed
from .storage.inbox_store import ChangeStreamsUnsupported, InboxStore
from .storage.mongo_connector import DatabaseUnavailable, Document

if TYPE_CHECKING:
    from .asgi import Receive, Send

log = logging.getLogger(__name__)

# Where asgi.py puts the process's StreamHub for the view, and the view the stream it
# holds for asgi.py (both in the WSGI environ of the request).
STREAMS = "notification_service.streams"
HELD = "notification_service.held_stream"

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
RETRY_SECONDS = 1.0  # before the watcher tries the database again
READ_BATCH = 50  # users whose inboxes are read at once (one query on SecantusDB too)
_ID_RE = re.compile(r"[0-9a-f]{24}")
_UNSEEN = object()


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
    makes: a `notification` for each one it has not seen, oldest first, and `counts`
    when they differ from the last sent (always after the first state)."""

    def __init__(self, resume_from: str | None) -> None:
        self.resume_from = resume_from
        self.known: set[Any] | None = None  # the ids in the inbox at the last state
        self.cursor = ZERO_ID
        self.counts: dict[str, int] | None = None
        self.expires_at: float | None = None
        self._refreshed = 0.0

    def advance(self, state: Document) -> bytes:
        # The array is the application's too: only objects are notifications, and only
        # a string id is one to compare.
        items = [item for item in state["items"] if isinstance(item, dict)]
        ids = [item.get("id") if isinstance(item.get("id"), str) else None for item in items]
        if self.known is None:
            new = self._missed(items, ids)
        else:
            # Notifications only ever join the array at its front: one whose id was not
            # in the last state is new (none comes back once gone).
            new = [item for item, i in zip(items, ids, strict=True) if i not in self.known]
        self.known = set(ids)
        self.cursor = next((i for i in ids if _valid_id(i)), ZERO_ID)
        self.expires_at = state["expires_at"]
        # One without a proper id can't be resumed from, nor told apart: not sent.
        events = [
            _event("notification", n["id"], n) for n in reversed(new) if _valid_id(n.get("id"))
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


@dataclass
class Held:
    """A stream the view started, for asgi.py to hold."""

    user_id: str
    feed: Feed
    until: float | None = None  # unix time at which it ends (its user token's expiry)


def hold(environ: dict[str, Any], user_id: str, feed: Feed, until: float | None = None) -> None:
    """Take a stream slot for this request, when asgi.py serves it (a GET).

    Without asgi.py the answer is the first events alone (a snapshot): the client comes
    back after RETRY with its Last-Event-ID, as it would after a dropped connection.

    :raise TooManyStreams: the process holds STREAM_MAX_PER_PROCESS streams.
    """
    hub: StreamHub | None = environ.get(STREAMS)
    if hub is None or environ.get("REQUEST_METHOD") != "GET":
        return
    hub.reserve()
    environ[HELD] = Held(user_id, feed, until)


class _Listener:
    """One open stream's mailbox: the newest state of its user's inbox (states are whole,
    so one not yet sent is simply replaced), or that it must end."""

    __slots__ = ("ended", "state", "wake")

    def __init__(self) -> None:
        self.state: Document | None = None
        self.ended = False
        self.wake = asyncio.Event()

    def put(self, state: Document | None) -> None:
        if state is None:
            self.ended = True  # the user's document is gone
        else:
            self.state = state
        self.wake.set()

    def end(self) -> None:
        self.ended = True
        self.wake.set()


class StreamHub:
    """The streams of one process: their slots, their listeners, their one watcher."""

    def __init__(self, store: InboxStore, clock: Callable[[], datetime], config: Config) -> None:
        self.max_streams = config.stream_max_per_process
        self.heartbeat_seconds = config.stream_heartbeat_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self.open = 0
        self.closing = False
        self._listeners: dict[str, set[_Listener]] = {}  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        # Each wait of the change stream is shorter than the database timeout that bounds
        # it; it is also how soon the watcher notices that the last stream has gone.
        max_await_ms = min(1000, config.db_timeout_ms // 2)
        self.watcher = Watcher(
            store, clock, config.stream_poll_seconds, max_await_ms, self._from_watcher
        )

    def reserve(self) -> None:
        """Take a slot (any thread). :raise TooManyStreams:"""
        with self._lock:
            if self.closing or self.open >= self.max_streams:
                raise TooManyStreams()
            self.open += 1

    def release(self) -> None:
        with self._lock:
            self.open -= 1

    async def serve(
        self,
        held: Held,
        status: int,
        headers: list[tuple[bytes, bytes]],
        first: bytes,
        receive: Receive,
        send: Send,
        received_at: float,
    ) -> None:
        """Send the view's answer and, when it started the stream (200), hold the stream
        until the client leaves, the user is deleted, its token expires or the server
        stops; then free the slot and write the request's access line."""
        try:
            if status != 200:  # the view took a slot, then something failed after it
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": first})
                return
            # The view's body is the first events, not the whole answer.
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            await self._follow(held, receive, send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client has gone: ASGI servers may say so from send()
        finally:
            self.release()
            if status == 200:  # other answers were logged and counted by the app
                seconds = time.monotonic() - received_at
                logs.log_access(
                    {
                        "method": "GET",
                        "route": "/stream",
                        "path": "/stream",
                        "status": 200,
                        "duration_ms": round(seconds * 1000, 3),
                        "request_id": dict(headers).get(b"x-request-id", b"").decode("latin-1"),
                    }
                )
                metrics.observe_request("GET", "/stream", 200, seconds)

    async def _follow(self, held: Held, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        listener = _Listener()
        self._listeners.setdefault(held.user_id, set()).add(listener)
        if self.closing:
            listener.end()
        # Following starts after the view's read: the watcher reads the inbox once more
        # now, and anything written in between is sent.
        self.watcher.follow(held.user_id)
        leaving = asyncio.ensure_future(_until_disconnect(receive, listener))
        feed = held.feed
        try:
            last_sent = loop.time()
            while not listener.ended:
                now = self._clock().timestamp()
                wait = last_sent + self.heartbeat_seconds - loop.time()
                if held.until is not None:
                    wait = min(wait, held.until - now)
                refresh_in = feed.refresh_in(now)
                if refresh_in is not None:
                    wait = min(wait, refresh_in)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0)):
                        await listener.wake.wait()
                if listener.ended or (
                    held.until is not None and self._clock().timestamp() >= held.until
                ):
                    break
                if listener.wake.is_set():
                    listener.wake.clear()
                    state, listener.state = listener.state, None
                    chunk = feed.advance(state) if state is not None else b""
                elif refresh_in is not None and refresh_in <= wait:
                    feed.refreshing(now)
                    self.watcher.refresh(held.user_id)
                    continue
                else:
                    chunk = HEARTBEAT
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    last_sent = loop.time()
        finally:
            leaving.cancel()
            listeners = self._listeners.get(held.user_id, set())
            listeners.discard(listener)
            if not listeners:
                self._listeners.pop(held.user_id, None)
            self.watcher.unfollow(held.user_id)

    def _from_watcher(self, states: dict[str, Document | None]) -> None:
        """Hand the watcher's states to the streams (called in the watcher's thread)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are stopping
                loop.call_soon_threadsafe(self._dispatch, states)

    def _dispatch(self, states: dict[str, Document | None]) -> None:
        for user_id, state in states.items():
            for listener in self._listeners.get(user_id, ()):
                listener.put(state)

    def end_all(self) -> None:
        """End every stream now (on the event loop); refuse new ones."""
        self.closing = True
        for listeners in self._listeners.values():
            for listener in listeners:
                listener.end()

    def end_on_signals(self) -> None:
        """End every stream as soon as the server is told to stop (SIGTERM, SIGINT).

        granian waits for every open request before it sends lifespan.shutdown (its
        issue 547), so an open stream would keep the worker, dispatchers included, until
        it is killed GRACEFUL_SECONDS later. The handlers already there keep working:
        Python still writes the signal to asyncio's wakeup fd (granian's handler), and
        this one calls the Python-level one it replaces. Only from the main thread, and
        only over a handler: never in place of a signal's default action.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def handler(
                signum: int,
                frame: FrameType | None,
                previous: Callable[[int, FrameType | None], Any] = previous,
            ) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed already
                    loop.call_soon_threadsafe(self.end_all)
                previous(signum, frame)

            signal.signal(signum, handler)

    def close(self) -> None:
        """Stop the watcher (at shutdown, after the last request)."""
        self.watcher.close()


async def _until_disconnect(receive: Receive, listener: _Listener) -> None:
    # asgi.py has read the request's body: what comes now is the client leaving.
    while (await receive())["type"] != "http.disconnect":
        pass
    listener.end()


class Watcher:
    """The process's one watch over the users collection, for the users it follows.

    Two threads, started with the first stream and ending after the last: a source that
    learns which users changed (their ids from a change stream, or their versions read
    every `poll_seconds` where there is none), and a reader that reads the changed
    users' inboxes and delivers them. One database cursor at most (the change stream),
    whatever the number of streams.
    """

    def __init__(
        self,
        store: InboxStore,
        clock: Callable[[], datetime],
        poll_seconds: float,
        max_await_ms: int,
        deliver: Callable[[dict[str, Document | None]], None],
    ) -> None:
        self.store = store
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.max_await_ms = max_await_ms
        self.deliver = deliver
        self.polling: bool | None = None  # decided by the first change stream (or refusal)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._followed: dict[str, int] = {}  # user_id: its open streams
        self._dirty: set[str] = set()  # users whose inbox is to be read
        self._versions: dict[str, Any] = {}  # as last read (for polling)
        self._running: dict[str, threading.Thread] = {}  # role: thread
        self._stop = threading.Event()

    def follow(self, user_id: str) -> None:
        with self._lock:
            self._followed[user_id] = self._followed.get(user_id, 0) + 1
            self._mark([user_id])
            for role, target in (("source", self._watch), ("reader", self._read)):
                if role not in self._running and not self._stop.is_set():
                    thread = threading.Thread(target=target, name=f"stream-{role}", daemon=True)
                    self._running[role] = thread
                    thread.start()

    def unfollow(self, user_id: str) -> None:
        with self._lock:
            left = self._followed.get(user_id, 0) - 1
            if left > 0:
                self._followed[user_id] = left
                return
            self._followed.pop(user_id, None)
            self._dirty.discard(user_id)
            self._versions.pop(user_id, None)
            if not self._followed:
                self._work.notify_all()  # the reader ends now, the source after its wait

    def refresh(self, user_id: str) -> None:
        """Read the user's inbox again (an expiry changed it without a write)."""
        with self._lock:
            self._mark([user_id])

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            self._work.notify_all()
            threads = list(self._running.values())
        for thread in threads:
            thread.join(10)

    def _mark(self, user_ids: Iterable[str]) -> None:
        """Have these users' inboxes read (with the lock held)."""
        self._dirty.update(u for u in user_ids if u in self._followed)
        if self._dirty:
            self._work.notify_all()

    def _carry_on(self, role: str) -> bool:
        """Whether the thread of `role` has work left; if not, it is gone from
        `_running` (with the lock held: a stream that comes next starts a new one)."""
        if self._followed and not self._stop.is_set():
            return True
        self._running.pop(role, None)
        return False

    # -- the source: which users changed ---------------------------------------------

    def _watch(self) -> None:
        changes = None
        try:
            while True:
                with self._lock:
                    if not self._carry_on("source"):
                        return
                if self.polling:
                    self._poll()
                    self._stop.wait(self.poll_seconds)
                    continue
                try:
                    if changes is None:
                        changes = self.store.watch_users(self.max_await_ms)
                        self.polling = False
                        # What changed before it opened (or while it was down) is read
                        # once: every followed inbox.
                        with self._lock:
                            self._mark(self._followed)
                    user_id = changes.next_id()
                except ChangeStreamsUnsupported as exc:
                    log.info(
                        "no change streams (%s): streams poll every %gs", exc, self.poll_seconds
                    )
                    self.polling = True
                    continue
                except Exception as exc:
                    self._pause("change stream", exc)
                    if changes is not None:
                        changes.close()
                        changes = None
                    continue
                if user_id is not None:
                    with self._lock:
                        self._mark([user_id])
        finally:
            if changes is not None:
                changes.close()

    def _poll(self) -> None:
        with self._lock:
            users = list(self._followed)
        try:
            versions = self.store.versions(users)
        except Exception as exc:
            self._pause("polling", exc)
            return
        with self._lock:
            self._mark(u for u in users if versions.get(u) != self._versions.get(u, _UNSEEN))

    # -- the reader: their inboxes -----------------------------------------------------

    def _read(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and self._carry_on("reader"):
                    self._work.wait()
                if not self._carry_on("reader"):
                    return
                # A batch at a time, each delivered as soon as it is read: the first
                # streams of a fan-out to thousands need not wait for the last.
                users = [self._dirty.pop() for _ in range(min(READ_BATCH, len(self._dirty)))]
            try:
                states = self.store.feed_states(users, self.clock())
            except Exception as exc:
                with self._lock:
                    self._mark(users)
                self._pause("reading inboxes", exc)
                continue
            with self._lock:
                # Only for users still followed: one whose last stream closed during the
                # read was forgotten by unfollow, and would otherwise be kept for ever.
                for user_id in users:
                    if user_id in self._followed:
                        self._versions[user_id] = (
                            states[user_id]["version"] if user_id in states else None
                        )
            self.deliver({user_id: states.get(user_id) for user_id in users})

    def _pause(self, what: str, exc: Exception) -> None:
        # The streams stay open (their heartbeats go on) and catch up once it answers.
        if isinstance(exc, DatabaseUnavailable):
            log.warning("streams: database unavailable (%s): %s", what, exc)
        else:
            log.exception("streams: unexpected error (%s)", what)
        self._stop.wait(RETRY_SECONDS)
