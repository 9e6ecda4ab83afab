"""Drains the outbox: claim a batch of emails with a lease, send them over SMTP, store
the outcomes.

Any number of dispatchers, threads or processes, share one outbox: each email's claim is
a conditional update only one of them can win, and a failure is written only while the
claim is still held; a send is recorded in any case (it went out). A dispatcher that
dies leaves its claim to be taken over when the lease runs out, so delivery is at least
once. A duplicate needs the dispatcher to die between the SMTP server's acceptance and
the record (at most SENT_FLUSH emails per thread), or the database to stay away longer
than what is left of the lease; a database that restarts sooner causes none: what this
dispatcher could not record or give back meanwhile it does first when the database
answers again (`_catch_up`).

Dispatchers also settle pending emails (outbox.py) whose request ended between its
writes: past the request's write window, the email goes if its notification was stored
and is dropped if not (`sweep_pending`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from .clock import SYSTEM_CLOCK, Clock
from .config import Config
from .email_sender import OutgoingEmail, SendError, SmtpSender, SmtpSettings, build_message
from .outbox import LastError, Outbox
from .storage.mongo_connector import DatabaseUnavailable

log = logging.getLogger(__name__)

SenderFactory = Callable[[], SmtpSender]
# Successful sends are recorded with one update per this many emails (or per batch,
# if smaller): a few database operations per batch instead of one per email. The cost
# is the duplicate window: a crash re-sends at most this many accepted emails.
SENT_FLUSH = 16
# How often a dispatcher looks for pending emails left by requests that ended between
# their writes, and how many it settles per look.
SWEEP_SECONDS = 10.0
SWEEP_BATCH = 500


# How one claimed email's attempt ended, as DispatchEvents reports it.
SendOutcome = Literal["sent", "retry", "failed"]


class DispatchEvents:
    """What dispatchers report as they work: the one instrumentation hook, used by
    metrics.py and the benchmarks. This base class ignores everything; subclass it and
    pass an instance as `DispatchContext.events`.

    Called on the dispatcher's own thread, between sends: keep each call quick, and
    never raise (an exception would count as a bug of the dispatcher's loop).
    """

    def batch_claimed(self, size: int) -> None:
        """A claim returned `size` emails; 0 when nothing was due."""

    def send_finished(self, outcome: SendOutcome, seconds: float | None) -> None:
        """One claimed email's attempt ended as `outcome` (sent: the SMTP server
        accepted it; retry: it waits for another attempt; failed: for good).

        `seconds` is how long the SMTP exchange took, None when there was none (the
        record could not become a message, or its claims kept running out). Reported
        as decided, before the outcome is written to the outbox.
        """


@dataclass(frozen=True)
class DispatchContext:
    """What a dispatcher needs from the rest of the service.

    `is_recorded(user_id, notification_id)`: whether the user's array holds the
    notification (InboxStore.has_notification), which decides a pending email's fate.
    `clock`: the time of day for the outbox's records, monotonic time for leases and
    sweeps, and every wait.
    `events`: where the dispatcher reports its claims and sends (a no-op by default).
    """

    config: Config
    outbox: Outbox
    clock: Clock
    is_recorded: Callable[[str, str], bool]
    events: DispatchEvents = field(default_factory=DispatchEvents)


def backoff_seconds(attempts: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: about base * 2**(attempts-1), never above cap.

    The jitter (a random half of the step) spreads retries of a burst that failed together.
    """
    step: float = min(cap, base * 2.0 ** max(0, attempts - 1))
    return step * (0.5 + rng.random() / 2)


class RateLimiter:
    """Spaces sends across the whole deployment: SMTP_RATE_LIMIT per second in all,
    however many threads and processes send.

    Before each send a dispatcher takes the next free slot from one small document in
    the database (`Outbox.take_send_slot`, which answers how long to wait for it,
    measured on the database's own clock), then waits that long. A send costs one more
    database round trip when a rate is set, none when it is not.

    `take_slot(interval_seconds) -> seconds to wait`; `sleep(seconds)` returns True
    when it was cut short (the pool passes a wait on its `stopping` event, so a stop does
    not wait out a slot).

    :raise DatabaseUnavailable: from `wait`, when no slot could be taken: the database
        does not answer, so nothing is sent (its outcome could not be stored either).
    """

    def __init__(
        self,
        per_second: float,
        take_slot: Callable[[float], float] | None = None,
        sleep: Callable[[float], Any] = SYSTEM_CLOCK.sleep,
    ) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        if self.interval and take_slot is None:
            raise ValueError("a rate needs a slot source (Outbox.take_send_slot)")
        self._take_slot = take_slot
        self._sleep = sleep

    def wait(self) -> bool:
        """Wait for this send's slot; False when the wait was cut short (do not send:
        the slot has not come)."""
        if not self.interval or self._take_slot is None:
            return True
        delay = self._take_slot(self.interval)
        return delay <= 0 or not self._sleep(delay)


Outcome = Literal["sent", "failed", "retry", "outage"]


def is_outage(error: SendError) -> bool:
    """Whether a transient failure is the server's (down, refusing everyone) rather than
    one message's: a 4xx other than 421 to MAIL, RCPT or DATA (greylisting, a full
    mailbox) says nothing about the other emails, everything else does."""
    if error.permanent:
        return False
    return error.code is None or error.code == 421 or error.code >= 500


@dataclass
class Dispatcher:
    context: DispatchContext
    sender: SmtpSender
    name: str
    limiter: RateLimiter
    wake: threading.Event
    stopping: threading.Event
    rng: random.Random
    _smtp_was_down: bool = False
    _indexed: bool = False
    _lease_end: float = 0.0  # monotonic time at which the current claim runs out
    _next_sweep: float = 0.0  # monotonic time of the next sweep of pending emails (0: now)
    # Left over from a database outage, done before the next claim (`_catch_up`):
    # emails the SMTP server accepted whose record could not be written...
    _unrecorded: list[Any] = field(default_factory=list)
    # ...and claims not given back: (token, the untried ids, or None when the claim's
    # reply was lost and nothing of it was tried).
    _held: list[tuple[str, list[Any] | None]] = field(default_factory=list)

    def dispatch_once(self) -> int:
        """Claim a batch of due emails and send them; return how many were attempted.

        An outage (the server down or refusing everyone) gives the rest of the batch
        back at once, as does a stop request. Past half the lease, sends are recorded
        and the claim on the rest is renewed, so that a slow batch is never taken over
        (and sent again) while this dispatcher still works through it.

        :raise DatabaseUnavailable: the database did not answer (the caller waits and retries).
        """
        ctx, cfg = self.context, self.context.config
        clock = ctx.clock
        if not self._indexed:
            ctx.outbox.ensure_indexes()
            self._indexed = True
        self._catch_up()
        token = f"{self.name}:{uuid.uuid4().hex[:8]}"
        lease = cfg.dispatch_lease_seconds
        claimed_at = clock.monotonic()
        try:
            pending = ctx.outbox.claim_batch(token, ctx.clock.now(), lease, cfg.dispatch_batch_size)
        except DatabaseUnavailable:
            # The claim may have been stored with only its reply lost: those emails
            # would wait out the whole lease. Nothing of it was tried, so give back
            # whatever the token holds once the database answers.
            self._held.append((token, None))
            raise
        self._lease_end = claimed_at + lease
        ctx.events.batch_claimed(len(pending))
        attempted = 0
        sent: list[Any] = []
        try:
            while pending:
                if attempted and self.stopping.is_set():
                    break
                if not self.limiter.wait():
                    break  # stopping: the rest of the batch is given back
                if self._lease_end - clock.monotonic() < lease / 2:
                    self._flush_sent(sent, token)
                    pending = self._renew(pending, token)
                    if not pending:
                        break
                record = pending.pop(0)
                attempted += 1
                if self._deliver(record, sent) == "outage":
                    break
                if len(sent) >= SENT_FLUSH:
                    self._flush_sent(sent, token)
        finally:
            self._settle(sent, pending, token)
        return attempted

    def _renew(self, pending: list[dict[str, Any]], token: str) -> list[dict[str, Any]]:
        """Extend the claim on the emails not yet sent; keep only those still held."""
        ctx = self.context
        renewed_at = ctx.clock.monotonic()
        held = ctx.outbox.renew(
            [r["_id"] for r in pending], token, ctx.clock.now(), ctx.config.dispatch_lease_seconds
        )
        self._lease_end = renewed_at + ctx.config.dispatch_lease_seconds
        if len(held) < len(pending):
            log.warning("dispatcher %s: %d claims ran out", self.name, len(pending) - len(held))
        return [r for r in pending if r["_id"] in held]

    def _settle(self, sent: list[Any], pending: list[dict[str, Any]], token: str) -> None:
        """Record what was sent and give back what was not tried, even after an error;
        what the database does not take now is kept for `_catch_up`."""
        with contextlib.suppress(DatabaseUnavailable):  # kept for _catch_up, and logged
            self._flush_sent(sent, token)
        if pending:
            ids = [r["_id"] for r in pending]
            try:
                self.context.outbox.release(ids, token, self.context.clock.now())
            except DatabaseUnavailable:
                self._held.append((token, ids))
                log.warning("dispatcher %s: %d claims to give back later", self.name, len(ids))

    def _catch_up(self) -> None:
        """Finish what a database outage interrupted, before claiming anything more:
        record the sends it left unrecorded (or this very dispatcher, finding their
        lease run out, would send them again) and give back the claims it left held (or
        their emails would wait for the lease to run out).

        :raise DatabaseUnavailable: the database still does not answer; nothing is forgotten.
        """
        ctx = self.context
        if self._unrecorded:
            ids = list(self._unrecorded)
            ctx.outbox.mark_sent(ids, ctx.clock.now())
            self._unrecorded.clear()
            log.info(
                "dispatcher %s: recorded %d sends after a database outage", self.name, len(ids)
            )
        while self._held:
            token, held = self._held[0]
            ctx.outbox.release(held, token, ctx.clock.now())
            self._held.pop(0)

    def _flush_sent(self, sent: list[Any], token: str) -> None:
        """Record the sends in `sent` with one write; on DatabaseUnavailable (after retrying
        while the lease lasts) they are kept for `_catch_up`, never forgotten."""
        if not sent:
            return
        ids, now = list(sent), self.context.clock.now()
        sent.clear()
        try:
            self._store(f"{len(ids)} sent email(s)", lambda: self._record_sent(ids, now))
        except DatabaseUnavailable:
            self._unrecorded.extend(ids)
            log.error(
                "dispatcher %s: %d sent emails not recorded yet; recording them when the "
                "database answers (another dispatcher may send them again if their lease "
                "runs out first)",
                self.name,
                len(self._unrecorded),
            )
            raise

    def _record_sent(self, ids: list[Any], now: datetime) -> bool:
        recorded = self.context.outbox.mark_sent(ids, now)
        if recorded < len(ids):
            # Our own earlier try whose reply was lost, or another dispatcher's, after
            # this claim's lease ran out: either way the record now says sent.
            log.info(
                "dispatcher %s: %d of %d sends were recorded already",
                self.name,
                len(ids) - recorded,
                len(ids),
            )
        return True

    def sweep_pending(self) -> tuple[int, int]:
        """Settle the pending emails whose request can no longer write; return how many
        were activated and how many discarded.

        A pending email older than the write window belongs to a request that is over:
        if its notification is in the user's array the request stored it, so the email
        must go; if not, the request failed as a whole (its client got an error and may
        retry, creating both anew), so the email must not. A notification that the
        array's cap dropped within the window counts as not stored: a rare loss of that
        email, never a duplicate.

        :raise DatabaseUnavailable: the caller tries again later; nothing is half done
            that the next sweep would not finish.
        """
        ctx = self.context
        activated = discarded = 0
        while True:
            before = ctx.clock.now() - timedelta(seconds=ctx.config.write_window_seconds)
            stale = ctx.outbox.stale_pending(before, SWEEP_BATCH)
            go: list[str] = []
            drop: list[str] = []
            for record in stale:
                (go if self._was_recorded(record) else drop).append(str(record["_id"]))
            # Both conditional on the record still being pending: sweeps running at the
            # same time in other dispatchers settle each email once.
            activated += ctx.outbox.activate(go, ctx.clock.now())
            discarded += ctx.outbox.discard_pending(drop)
            if len(stale) < SWEEP_BATCH or self.stopping.is_set():
                break
        if activated or discarded:
            log.info(
                "dispatcher %s: pending emails of ended requests: %d activated, %d discarded",
                self.name,
                activated,
                discarded,
            )
        return activated, discarded

    def _was_recorded(self, record: dict[str, Any]) -> bool:
        user_id, notification_id = record.get("user_id"), record.get("notification_id")
        if not (isinstance(user_id, str) and isinstance(notification_id, str)):
            # Only a notification's email is ever pending; without one, nothing shows
            # that its request succeeded.
            return False
        return self.context.is_recorded(user_id, notification_id)

    def _sweep_when_due(self) -> None:
        clock = self.context.clock
        if clock.monotonic() < self._next_sweep:
            return
        self._next_sweep = clock.monotonic() + SWEEP_SECONDS
        try:
            self.sweep_pending()
        except DatabaseUnavailable:
            log.warning("dispatcher %s: pending emails not swept: database unavailable", self.name)
            self._next_sweep = clock.monotonic() + self.context.config.dispatch_poll_seconds * 4

    def run(self) -> None:
        """Dispatch until `stopping` is set; an in-flight send always finishes first."""
        cfg, clock = self.context.config, self.context.clock
        try:
            while not self.stopping.is_set():
                try:
                    self._sweep_when_due()
                    if self.dispatch_once():
                        continue
                    clock.wait(self.wake, self._idle_seconds())
                except DatabaseUnavailable:
                    clock.wait(self.stopping, cfg.dispatch_poll_seconds * 4)
                except Exception:  # a bug must not kill the thread and strand the outbox
                    log.exception("dispatcher %s: unexpected error", self.name)
                    clock.wait(self.stopping, cfg.dispatch_poll_seconds * 4)
                self.wake.clear()
        finally:
            try:
                self._catch_up()
            except DatabaseUnavailable:
                log.error(
                    "dispatcher %s: stopped with %d sends unrecorded (they will be sent "
                    "again after their lease) and %d claims left to run out",
                    self.name,
                    len(self._unrecorded),
                    len(self._held),
                )
            self.sender.close()

    def _idle_seconds(self) -> float:
        # Poll at least every DISPATCH_POLL_SECONDS (another process may enqueue), and
        # sooner when a retry or the next sweep falls due before that.
        poll = min(
            self.context.config.dispatch_poll_seconds,
            max(0.0, self._next_sweep - self.context.clock.monotonic()),
        )
        due = self.context.outbox.next_due()
        if due is None:
            return poll
        return max(0.0, min(poll, (due - self.context.clock.now()).total_seconds()))

    def _deliver(self, record: dict[str, Any], sent: list[Any]) -> Outcome:
        """Send one claimed email. A failure is stored at once; a success is added to
        `sent`, which the caller stores with one update for several (see SENT_FLUSH)."""
        ctx, cfg = self.context, self.context.config
        now = ctx.clock.now()
        attempts = int(record["attempts"])
        if attempts > cfg.dispatch_max_attempts or self._too_old(record, now):
            # Only claims taken over after their lease ran out get here: the sends
            # that kept outliving their lease must stop somewhere too.
            reason = f"gave up after {attempts - 1} attempts whose claims ran out"
            ctx.events.send_finished("failed", None)
            self._fail(record, _error(None, reason, permanent=False, outage=False), now)
            return "failed"
        try:
            message = build_message(
                OutgoingEmail(
                    to=record["to"],
                    subject=record["subject"],
                    text=record["text"],
                    html=record.get("html"),
                    message_id=record["message_id"],
                ),
                from_email=cfg.smtp_email,
                from_name=cfg.smtp_name,
            )
        except (ValueError, KeyError, TypeError) as exc:
            # A record that cannot become a message never will: fail it, don't retry.
            error = _error(None, f"cannot build message: {exc}", permanent=True, outage=False)
            ctx.events.send_finished("failed", None)
            self._fail(record, error, now)
            return "failed"
        started = ctx.clock.monotonic()
        try:
            self.sender.send(message)
        except SendError as exc:
            return self._failed(record, exc, ctx.clock.monotonic() - started)
        ctx.events.send_finished("sent", ctx.clock.monotonic() - started)
        sent.append(record["_id"])
        if self._smtp_was_down:
            # The server is back: what waits on a backoff from the outage goes now.
            self._smtp_was_down = False
            released = ctx.outbox.release_backoffs(ctx.clock.now())
            if released:
                log.info("dispatcher %s: SMTP is back, %d emails retried now", self.name, released)
        return "sent"

    def _too_old(self, record: dict[str, Any], now: datetime) -> bool:
        age: timedelta = now - record["created_at"]
        return age > timedelta(seconds=self.context.config.dispatch_max_age_seconds)

    def _failed(self, record: dict[str, Any], exc: SendError, seconds: float) -> Outcome:
        """Store a failed attempt (`seconds`: its SMTP exchange) as final or to retry."""
        ctx, cfg = self.context, self.context.config
        now = ctx.clock.now()
        outage = is_outage(exc)
        error = _error(exc.code, exc.reply[:1000], permanent=exc.permanent, outage=outage)
        attempts = int(record["attempts"])
        if exc.permanent or attempts >= cfg.dispatch_max_attempts or self._too_old(record, now):
            log.warning(
                "email %s failed for good after %d attempts: %s", record["_id"], attempts, exc
            )
            ctx.events.send_finished("failed", seconds)
            self._fail(record, error, now)
            return "outage" if outage else "failed"
        self._smtp_was_down = self._smtp_was_down or outage
        delay = backoff_seconds(
            attempts, cfg.dispatch_backoff_base_seconds, cfg.dispatch_backoff_max_seconds, self.rng
        )
        log.info(
            "email %s: attempt %d failed (%s), retry in %.1fs", record["_id"], attempts, exc, delay
        )
        ctx.events.send_finished("retry", seconds)
        at = now + timedelta(seconds=delay)
        self._store(
            f"email {record['_id']}",
            lambda: ctx.outbox.mark_retry(record["_id"], record["claimed_by"], error, at),
        )
        return "outage" if outage else "retry"

    def _fail(self, record: dict[str, Any], error: LastError, now: datetime) -> None:
        self._store(
            f"email {record['_id']}",
            lambda: self.context.outbox.mark_failed(
                record["_id"], record["claimed_by"], error, now
            ),
        )

    def _store(self, what: str, write: Callable[[], bool]) -> None:
        """Run an outcome write (`write` returns False when the claim was lost first).

        The outcome must be stored even if the database blinks right now: an email the
        SMTP server accepted but whose record stays "sending" is sent again after the
        lease. So keep trying while the claim lasts (less a second), then give up (a
        send is then kept for `_catch_up`).
        """
        clock = self.context.clock
        deadline = max(self._lease_end - 1.0, clock.monotonic() + 1.0)
        while True:
            try:
                if not write():
                    log.warning("%s: claim lost before the outcome was stored", what)
                return
            except DatabaseUnavailable:
                if clock.monotonic() > deadline:
                    raise
                clock.sleep(0.5)


def _error(code: int | None, message: str, *, permanent: bool, outage: bool) -> LastError:
    return {"code": code, "message": message, "permanent": permanent, "outage": outage}


class DispatcherPool:
    """N dispatcher threads in this process, each with its own SMTP connection."""

    def __init__(
        self,
        threads: list[threading.Thread],
        stopping: threading.Event,
        wakes: list[threading.Event],
    ) -> None:
        self.threads = threads
        self.stopping = stopping
        self.wakes = wakes

    @classmethod
    def start(
        cls, context: DispatchContext, count: int, sender_factory: SenderFactory | None = None
    ) -> DispatcherPool:
        cfg = context.config
        if sender_factory is None:
            settings = SmtpSettings.from_config(cfg)

            def sender_factory() -> SmtpSender:
                return SmtpSender(settings)

        stopping = threading.Event()
        # Shared by the deployment through the database; a stop cuts a wait short.
        limiter = RateLimiter(
            cfg.smtp_rate_limit,
            context.outbox.take_send_slot,
            sleep=lambda seconds: context.clock.wait(stopping, seconds),
        )
        prefix = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        threads, wakes = [], []
        for i in range(count):
            wake = threading.Event()
            wakes.append(wake)
            context.outbox.on_enqueue(wake.set)
            dispatcher = Dispatcher(
                context=context,
                sender=sender_factory(),
                name=f"{prefix}:{i}",
                limiter=limiter,
                wake=wake,
                stopping=stopping,
                rng=random.Random(),
            )
            thread = threading.Thread(target=dispatcher.run, name=f"dispatcher-{i}", daemon=True)
            thread.start()
            threads.append(thread)
        log.info("started %d dispatcher thread(s) as %s", count, prefix)
        return cls(threads, stopping, wakes)

    def stop(self, timeout: float = 20.0) -> None:
        """Ask every thread to stop and wait for in-flight sends to finish."""
        self.stopping.set()
        for wake in self.wakes:
            wake.set()  # an idle thread stops now, not at the end of its poll
        # Real time: a thread's join waits in it, whatever clock the dispatchers read.
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = [thread.name for thread in self.threads if thread.is_alive()]
        if busy:
            # The process may now exit with them: say what becomes of their emails.
            log.warning(
                "%d dispatcher thread(s) still sending after %.0f s (%s): their emails "
                "stay 'sending' until the claim's lease runs out, then are sent again",
                len(busy),
                timeout,
                ", ".join(busy),
            )
