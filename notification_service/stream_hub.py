"""The live streams of one process, GET /stream held on the event loop of asgi.py:
their slots, their connections, and the one watcher that feeds them.

A stream starts as an ordinary request: the Flask view (notification_handler.stream)
runs in one of the WEB_THREADS threads for one read of the user's inbox, checks the
key, user_id and Last-Event-ID, makes the first events and takes one of the process's
STREAM_MAX_PER_PROCESS slots (`StreamHub.hold`, through context.hold_stream). asgi.py
sends that answer and hands the connection to `StreamHub.serve`, which holds it on the
event loop: an open stream costs a task and a few objects there, never a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import logs, metrics
from .clock import Clock
from .config import Config
from .errors import TooManyStreams
from .sse import HEARTBEAT, Feed
from .storage.inbox_store import InboxStore
from .storage.mongo_connector import Document
from .stream_watcher import Watcher

if TYPE_CHECKING:
    from .asgi import Receive, Send

log = logging.getLogger(__name__)


@dataclass
class Held:
    """A stream the view started, for asgi.py to hold."""

    user_id: str
    feed: Feed
    until: float | None = None  # unix time at which it ends (its user token's expiry)


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

    def __init__(self, store: InboxStore, clock: Clock, config: Config) -> None:
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

    def hold(self, user_id: str, feed: Feed, until: float | None = None) -> Held:
        """Take a slot for a stream the view started, for asgi.py to hold (any thread).

        :raise TooManyStreams: the process holds STREAM_MAX_PER_PROCESS streams.
        """
        self.reserve()
        return Held(user_id, feed, until)

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
                seconds = self._clock.monotonic() - received_at
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
                now = self._clock.now().timestamp()
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
                    held.until is not None and self._clock.now().timestamp() >= held.until
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
