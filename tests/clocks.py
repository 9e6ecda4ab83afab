"""A clock that moves only when a test moves it (notification_service.clock.Clock)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta


class FakeClock:
    """Time of day and monotonic time that stand still until `advance`; `sleep` and
    `wait` move them on at once instead of waiting, for code a test drives step by step
    on its own thread (a thread looping on `wait` would spin)."""

    def __init__(self, now: datetime | None = None) -> None:
        self._now = now or datetime.now(UTC)
        self._monotonic = time.monotonic()
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._monotonic += seconds

    def set(self, now: datetime) -> None:
        """Move the time of day (and monotonic time with it) to `now`, never back."""
        self.advance(max(0.0, (now - self.now()).total_seconds()))

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if not event.is_set():
            self.advance(seconds)
        return event.is_set()
