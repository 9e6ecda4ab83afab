"""The process's one watch over the users collection, for the users its streams follow.

It learns which of the followed users changed: from one change stream on the users
collection where the deployment has them (a replica set), else by reading the followed
users' `version` (it moves on every write of an inbox) every STREAM_POLL_SECONDS. It
then reads the changed users' inboxes, 50 users a query, and delivers each state to the
hub. As everything comes from the database, a write made through any process reaches
the streams of every process; and a watcher that may have missed changes (the database
away, its change stream reopened) reads every followed inbox again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .clock import Clock
from .storage.inbox_store import ChangeStreamsUnsupported, InboxStore
from .storage.mongo_connector import DatabaseUnavailable, Document

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # before the watcher tries the database again
READ_BATCH = 50  # users whose inboxes are read at once (one query on SecantusDB too)
_UNSEEN = object()


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
        clock: Clock,
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
                    self.clock.wait(self._stop, self.poll_seconds)
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
                states = self.store.feed_states(users, self.clock.now())
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
        self.clock.wait(self._stop, RETRY_SECONDS)
