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

The database's work stays off the SMTP connection's path: while a batch is sent, the
next one is claimed in the background (`_Prefetch`), and sends are recorded in the
background every SENT_FLUSH / 2 emails, never more than SENT_FLUSH accepted and
unrecorded at any time, all recorded when the batch ends. A batch claimed ahead is a
claim like any other: its lease is renewed past half while it waits, and it is given
back when the batch before it ends early (a stop, an outage, an error) or the
dispatcher stops.

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
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from .clock import SYSTEM_CLOCK, Clock
from .config import Config
from .digests import Digests
from .email_sender import OutgoingEmail, SendError, SmtpSender, SmtpSettings, build_message
from .logs import without_addresses
from .outbox import LastError, Outbox
from .storage.mongo_connector import DatabaseUnavailable

log = logging.getLogger(__name__)

SenderFactory = Callable[[], SmtpSender]
# At most this many emails a thread sent are ever unrecorded: sends are recorded in the
# background, one update per SENT_FLUSH / 2 (and at the end of a batch), and a send
# waits for the write before it when there are this many. A few database operations per
# batch instead of one per email; the cost is the duplicate window: a crash re-sends at
# most this many accepted emails.
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
    `digests`: the due-time step of each claim (digests.py): digests rendered or
    cancelled, emails whose user turned their key off cancelled. None: sent as claimed.
    """

    config: Config
    outbox: Outbox
    clock: Clock
    is_recorded: Callable[[str, str], bool]
    events: DispatchEvents = field(default_factory=DispatchEvents)
    digests: Digests | None = None


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
class _Claim:
    """A batch this dispatcher holds: its token, the emails not tried yet (in due order),
    and when its lease runs out (monotonic time)."""

    token: str
    pending: list[dict[str, Any]]
    lease_end: float


@dataclass
class _Prefetch:
    """The next batch, claimed on a helper thread while the current one is sent."""

    token: str
    lease_end: float  # taken before the claim's own `now`: never later than the stored lease
    future: Future[list[dict[str, Any]]]
    claim: _Claim | None = None  # once its answer has been taken (`Dispatcher._resolve`)
    lost: bool = False  # the database did not answer it


@dataclass
class _Recording:
    """Sends being recorded on a helper thread."""

    ids: list[Any]
    future: Future[None]


def _in_background(name: str, work: Callable[[], Any]) -> Future[Any]:
    """Run `work` on a thread of its own; its result or exception in the Future.

    One short thread per database operation (a claim, a record of sends): a few per batch,
    and nothing to shut down. Daemon, like the dispatchers: the client's timeout and the
    lease bound how long one runs, and `run` waits for them before it returns.
    """
    future: Future[Any] = Future()

    def target() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to the dispatcher's own thread
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


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
    # The next batch, claimed while this one is sent, and the sends being recorded. Only
    # the dispatcher's own thread reads or changes these and the lists below; the
    # helper threads only run one database operation each and hand back its answer.
    _prefetch: _Prefetch | None = None
    _recording: _Recording | None = None
    # Left over from a database outage, done before the next claim (`_catch_up`):
    # emails the SMTP server accepted whose record could not be written...
    _unrecorded: list[Any] = field(default_factory=list)
    # ...and claims not given back: (token, the untried ids, or None when the claim's
    # reply was lost and nothing of it was tried).
    _held: list[tuple[str, list[Any] | None]] = field(default_factory=list)

    def dispatch_once(self) -> int:
        """Send a batch of due emails: the one claimed while the previous batch was sent,
        or one claimed now; return how many were attempted (or cancelled instead).

        While a batch is sent, the next one is claimed in the background, and the
        sends are recorded in the background (never more than SENT_FLUSH unrecorded);
        all are recorded by the time this returns.
        An outage (the server down or refusing everyone) gives the rest of the batch and
        the next one back at once, as does a stop request. Past half the lease, sends
        are recorded and the claims on the rest of this batch and on the next one are
        renewed, so that a slow batch is never taken over (and sent again) while this
        dispatcher still works through it or waits to.

        :raise DatabaseUnavailable: the database did not answer (the caller waits and retries).
        """
        ctx = self.context
        if not self._indexed:
            ctx.outbox.ensure_indexes()
            self._indexed = True
        if self._unrecorded or self._held:
            self._catch_up()  # an outage's leftovers first, even before a prefetched batch
        claim = self._take_prefetched()
        if claim is None or not claim.pending:
            # None claimed ahead, or none was due when the batch before began: claim
            # now (what became due since: backoffs the SMTP server's return released).
            self._catch_up()
            claim = self._claim()
        if not claim.pending:
            return 0
        self._lease_end = claim.lease_end
        if not self.stopping.is_set() and not (self._unrecorded or self._held):
            # Even after a short batch: other dispatchers claiming at the same moment
            # shorten it while more is due, and the claim that would follow it anyway
            # is better made now, beside the sends, than after them.
            self._start_prefetch()
        attempted = 0
        finished = False
        sent: list[Any] = []
        try:
            if ctx.digests is not None:
                # Inside the try: on an error, what it did not settle is given back.
                claimed = len(claim.pending)
                claim.pending = ctx.digests.prepare(claim.pending, ctx.clock.now())
                attempted = claimed - len(claim.pending)  # cancelled: handled, not sent
            while claim.pending:
                if attempted and self.stopping.is_set():
                    break
                if not self.limiter.wait():
                    break  # stopping: the rest of the batch is given back
                self._keep_leases(claim, sent)
                if not claim.pending:
                    break
                self._make_room(sent)
                record = claim.pending.pop(0)
                attempted += 1
                if self._deliver(record, sent) == "outage":
                    break
                self._record_soon(sent)
            finished = not claim.pending
        finally:
            self._settle(sent, claim, finished)
        return attempted

    def _claim(self) -> _Claim:
        """Claim a batch now, on this thread."""
        ctx, cfg = self.context, self.context.config
        token = self._token()
        lease_end = ctx.clock.monotonic() + cfg.dispatch_lease_seconds
        try:
            records = ctx.outbox.claim_batch(
                token, ctx.clock.now(), cfg.dispatch_lease_seconds, cfg.dispatch_batch_size
            )
        except DatabaseUnavailable:
            # The claim may have been stored with only its reply lost: those emails
            # would wait out the whole lease. Nothing of it was tried, so give back
            # whatever the token holds once the database answers.
            self._held.append((token, None))
            raise
        ctx.events.batch_claimed(len(records))
        return _Claim(token, records, lease_end)

    def _token(self) -> str:
        return f"{self.name}:{uuid.uuid4().hex[:8]}"

    def _start_prefetch(self) -> None:
        """Claim the next batch on a helper thread. Its lease starts now: the batches
        before it are renewed for as long as they take (`_keep_leases`)."""
        ctx, cfg = self.context, self.context.config
        token, now = self._token(), ctx.clock.now()
        lease_end = ctx.clock.monotonic() + cfg.dispatch_lease_seconds

        def claim() -> list[dict[str, Any]]:
            return ctx.outbox.claim_batch(
                token, now, cfg.dispatch_lease_seconds, cfg.dispatch_batch_size
            )

        self._prefetch = _Prefetch(token, lease_end, _in_background(f"{self.name}:claim", claim))

    def _resolve(self, prefetch: _Prefetch) -> _Claim | None:
        """The prefetched claim, once its answer is in (this waits for it); None when
        the database did not answer it: as for a claim made here, whatever its token
        holds is then given back by `_catch_up`."""
        if prefetch.claim is None and not prefetch.lost:
            try:
                records = prefetch.future.result()
            except DatabaseUnavailable:
                prefetch.lost = True
                self._held.append((prefetch.token, None))
                return None
            except Exception:
                # Whatever the token may hold is given back once the database answers.
                prefetch.lost = True
                self._held.append((prefetch.token, None))
                raise
            self.context.events.batch_claimed(len(records))
            prefetch.claim = _Claim(prefetch.token, records, prefetch.lease_end)
        return prefetch.claim

    def _take_prefetched(self) -> _Claim | None:
        prefetch, self._prefetch = self._prefetch, None
        return None if prefetch is None else self._resolve(prefetch)

    def _give_back_prefetch(self) -> None:
        """Give back the next batch, if one was claimed (after a stop, an outage, an
        error); what the database does not take now is kept for `_catch_up`."""
        claim = self._take_prefetched()
        if claim is not None and claim.pending:
            self._give_back(claim)

    def _give_back(self, claim: _Claim) -> None:
        ids = [r["_id"] for r in claim.pending]
        claim.pending = []
        try:
            self.context.outbox.release(ids, claim.token, self.context.clock.now())
        except DatabaseUnavailable:
            self._held.append((claim.token, ids))
            log.warning("dispatcher %s: %d claims to give back later", self.name, len(ids))

    def _keep_leases(self, claim: _Claim, sent: list[Any]) -> None:
        """Past half its lease, renew the claim on the rest of this batch (after
        recording what was sent of it) and on the next batch once it has been claimed."""
        clock, half = self.context.clock, self.context.config.dispatch_lease_seconds / 2
        if claim.lease_end - clock.monotonic() < half:
            self._flush_sent(sent)
            self._renew(claim)
            self._lease_end = claim.lease_end
        prefetch = self._prefetch
        if prefetch is not None and prefetch.future.done():
            following = self._resolve(prefetch)
            if following is not None and following.lease_end - clock.monotonic() < half:
                self._renew(following)

    def _renew(self, claim: _Claim) -> None:
        """Extend the claim on the emails not yet sent; keep only those still held."""
        if not claim.pending:
            return
        ctx = self.context
        renewed_at = ctx.clock.monotonic()
        held = ctx.outbox.renew(
            [r["_id"] for r in claim.pending],
            claim.token,
            ctx.clock.now(),
            ctx.config.dispatch_lease_seconds,
        )
        claim.lease_end = renewed_at + ctx.config.dispatch_lease_seconds
        if len(held) < len(claim.pending):
            log.warning(
                "dispatcher %s: %d claims ran out", self.name, len(claim.pending) - len(held)
            )
        claim.pending = [r for r in claim.pending if r["_id"] in held]

    def _settle(self, sent: list[Any], claim: _Claim, finished: bool) -> None:
        """Record what was sent and give back what was not tried, even after an error;
        what the database does not take now is kept for `_catch_up`. A batch that ended
        early (a stop, an outage, an error) gives back the batch claimed ahead too."""
        with contextlib.suppress(DatabaseUnavailable):  # kept for _catch_up, and logged
            self._flush_sent(sent)
        if claim.pending:
            self._give_back(claim)
        if not finished:
            self._give_back_prefetch()

    def _catch_up(self) -> None:
        """Finish what a database outage interrupted, before claiming anything more:
        record the sends it left unrecorded (or this very dispatcher, finding their
        lease run out, would send them again) and give back the claims it left held (or
        their emails would wait for the lease to run out). Sends being recorded in the
        background are waited for first.

        :raise DatabaseUnavailable: the database still does not answer; nothing is forgotten.
        """
        ctx = self.context
        with contextlib.suppress(DatabaseUnavailable):  # its ids are in _unrecorded now
            self._wait_for_recording()
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

    def _unrecorded_count(self, sent: list[Any]) -> int:
        return len(sent) + (len(self._recording.ids) if self._recording is not None else 0)

    def _make_room(self, sent: list[Any]) -> None:
        """Before a send: with SENT_FLUSH accepted and unrecorded, wait for their record."""
        if self._unrecorded_count(sent) >= SENT_FLUSH:
            self._wait_for_recording()
            if len(sent) >= SENT_FLUSH:
                self._flush_sent(sent)

    def _record_soon(self, sent: list[Any]) -> None:
        """After a send: start recording the sends once SENT_FLUSH / 2 wait, unless the
        previous record is still being written."""
        if self._recording is not None and self._recording.future.done():
            self._wait_for_recording()
        if self._recording is None and len(sent) >= max(1, SENT_FLUSH // 2):
            self._record_in_background(sent)

    def _record_in_background(self, sent: list[Any]) -> None:
        """Record the sends in `sent` on a helper thread, after the previous record."""
        self._wait_for_recording()
        if not sent:
            return
        ids, now, lease_end = list(sent), self.context.clock.now(), self._lease_end
        sent.clear()

        def record() -> None:
            self._store(f"{len(ids)} sent email(s)", lambda: self._record_sent(ids, now), lease_end)

        self._recording = _Recording(ids, _in_background(f"{self.name}:record", record))

    def _wait_for_recording(self) -> None:
        """Wait for the sends being recorded in the background; if the database did not
        take them (after retrying while the lease lasts) they are kept for `_catch_up`.

        :raise DatabaseUnavailable: that record failed.
        """
        recording, self._recording = self._recording, None
        if recording is None:
            return
        try:
            recording.future.result()
        except Exception:  # an outage, or anything else: the sends are never forgotten
            self._not_recorded(recording.ids)
            raise

    def _flush_sent(self, sent: list[Any]) -> None:
        """Record the sends in `sent` (after those being recorded in the background) with
        one write; on DatabaseUnavailable (after retrying while the lease lasts) they are
        kept for `_catch_up`, never forgotten."""
        try:
            self._wait_for_recording()
        except DatabaseUnavailable:
            # That write has just waited out the database: keep these too, unwritten.
            if sent:
                self._not_recorded(list(sent))
                sent.clear()
            raise
        if not sent:
            return
        ids, now = list(sent), self.context.clock.now()
        sent.clear()
        try:
            self._store(f"{len(ids)} sent email(s)", lambda: self._record_sent(ids, now))
        except DatabaseUnavailable:
            self._not_recorded(ids)
            raise

    def _not_recorded(self, ids: list[Any]) -> None:
        self._unrecorded.extend(ids)
        log.error(
            "dispatcher %s: %d sent emails not recorded yet; recording them when the "
            "database answers (another dispatcher may send them again if their lease "
            "runs out first)",
            self.name,
            len(self._unrecorded),
        )

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
            self.close()

    def close(self) -> None:
        """Give back the batch claimed ahead, record what was sent, close the connection
        (the end of `run`; for a dispatcher driven by `dispatch_once`, call it after)."""
        try:
            self._give_back_prefetch()
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
                    unsubscribe_url=record.get("unsubscribe_url"),
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
        # Counted from the last resend when there was one: a resent email gets its whole
        # give-up age again, as it gets its attempts (DeadLetterStore.requeue); else from
        # when it was first due: a digest's batch waits email_after_seconds before that.
        start = record.get("requeued_at") or record.get("due_at") or record["created_at"]
        age: timedelta = now - start
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
                "email %s failed for good after %d attempts: %s",
                record["_id"],
                attempts,
                without_addresses(str(exc)),
            )
            ctx.events.send_finished("failed", seconds)
            self._fail(record, error, now)
            return "outage" if outage else "failed"
        self._smtp_was_down = self._smtp_was_down or outage
        delay = backoff_seconds(
            attempts, cfg.dispatch_backoff_base_seconds, cfg.dispatch_backoff_max_seconds, self.rng
        )
        log.info(
            "email %s: attempt %d failed (%s), retry in %.1fs",
            record["_id"],
            attempts,
            without_addresses(str(exc)),
            delay,
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

    def _store(self, what: str, write: Callable[[], bool], lease_end: float | None = None) -> None:
        """Run an outcome write (`write` returns False when the claim was lost first).

        The outcome must be stored even if the database blinks right now: an email the
        SMTP server accepted but whose record stays "sending" is sent again after the
        lease. So keep trying while the claim lasts (less a second), then give up (a
        send is then kept for `_catch_up`). `lease_end`: that claim's (monotonic time),
        by default the current batch's.
        """
        clock = self.context.clock
        lease_end = self._lease_end if lease_end is None else lease_end
        deadline = max(lease_end - 1.0, clock.monotonic() + 1.0)
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
