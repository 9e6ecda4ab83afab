"""SMTP_RATE_LIMIT holds for the whole deployment: every dispatcher takes its send slots
from one document in the database, on the database's clock."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId
from conftest import DatabaseLink, runtime
from flask import Flask
from smtp_fixtures import SmtpServer

from notification_service.config import Config
from notification_service.dispatcher import (
    DispatchContext,
    Dispatcher,
    DispatcherPool,
    DispatchEvents,
    RateLimiter,
    SendOutcome,
)
from notification_service.email_sender import SmtpSender, SmtpSettings
from notification_service.runtime import build_runtime
from notification_service.storage.mongo_connector import DatabaseUnavailable

RATE = 5.0  # emails per second, for the whole deployment
# What a send's own latency may take off a gap between arrivals: the slots are spaced
# exactly, but a thread's first send also opens its SMTP connection.
SLACK = 0.1


def queue_emails(db: Any, count: int) -> None:
    now = datetime.now(UTC)
    db.email_outbox.insert_many(
        [
            {"_id": ObjectId(), "kind": "custom", "to": f"u{i}@example.com",
             "subject": f"n{i}", "text": "hi", "html": None,
             "message_id": f"<{i}.rate@test>", "status": "queued", "attempts": 0,
             "created_at": now, "next_attempt_at": now, "last_error": None,
             "sent_at": None, "claimed_by": None}
            for i in range(count)
        ]
    )  # fmt: skip


def arrivals(server: SmtpServer, count: int, timeout: float) -> list[float]:
    """When each of `count` messages reached the SMTP server (monotonic seconds)."""
    times = []
    for n in range(1, count + 1):
        server.wait_for_messages(n, timeout)
        times.append(time.monotonic())
    return times


class Sends(DispatchEvents):
    def __init__(self) -> None:
        self.sent = 0
        self.claimed: list[int] = []

    def batch_claimed(self, size: int) -> None:
        self.claimed.append(size)

    def send_finished(self, outcome: SendOutcome, seconds: float | None) -> None:
        self.sent += outcome == "sent"


def test_two_pools_with_their_own_clients_send_no_faster_than_the_rate_in_all(
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    db: Any,
) -> None:
    total = 12
    queue_emails(db, total)
    # One email per claim, so that both pools get some.
    config = make_config(
        **smtp_server.config_kwargs(),
        smtp_rate_limit=RATE,
        dispatch_batch_size=1,
    )
    # Two runtimes: each its own client and pool of two threads, as two processes have,
    # each pool reporting to its own events from its first claim.
    counts = [Sends(), Sends()]
    runtimes = [build_runtime(config) for _ in counts]
    for rt, events in zip(runtimes, counts, strict=True):
        svc = rt.services
        context = DispatchContext(
            config, svc.outbox, rt.clock, svc.store.has_notification, events=events
        )
        rt.dispatchers = DispatcherPool.start(context, 2)
    try:
        times = arrivals(smtp_server, total, timeout=total / RATE + 10)
    finally:
        for rt in runtimes:
            rt.close()
    for i in range(total):
        for j in range(i + 1, total):
            # Any run of sends, not only the whole: no burst above the rate either.
            assert times[j] - times[i] >= (j - i) / RATE - SLACK, (i, j, times[j] - times[i])
    assert all(events.sent for events in counts), [events.sent for events in counts]
    # Recorded a moment after the SMTP server has it.
    deadline = time.monotonic() + 5
    while db.email_outbox.count_documents({"status": "sent"}) < total:
        assert time.monotonic() < deadline, "the sends were not all recorded"
        time.sleep(0.05)


def test_each_slot_comes_one_interval_after_the_last_and_idling_banks_none(
    app: Flask, db: Any
) -> None:
    services = runtime(app).services
    outbox = services.outbox
    interval = 1 / RATE
    calls, waits = [], []  # (sent, answered) of each call, its wait
    for _ in range(4):
        sent = time.monotonic()
        waits.append(outbox.take_send_slot(interval))
        calls.append((sent, time.monotonic()))
    # The n-th slot is n intervals after the first: a call the database runs later waits
    # that much less. When the database ran each call is known only to within the call's
    # own round trip (a loaded machine may take a good part of an interval).
    first_sent, first_answered = calls[0]
    for n, ((sent, answered), wait) in enumerate(zip(calls, waits, strict=True)):
        earliest = sent - first_answered  # how much later the database ran it, at least
        latest = answered - first_sent  # and at most
        # (and the database's clock counts milliseconds).
        low, high = max(0.0, n * interval - latest), max(0.0, n * interval - earliest)
        assert low - 0.002 <= wait <= high + 0.002, (
            waits,
            calls,
        )
    time.sleep(4 * interval + 0.3)  # past every slot taken
    assert outbox.take_send_slot(interval) == 0
    assert 0 < outbox.take_send_slot(interval) <= interval  # no credit from the idle time
    [state] = db[f"{services.config.outbox_collection}_rate"].find()
    assert state["_id"] == "smtp" and state["next_at"] > state["now"]


def test_without_a_rate_no_slot_is_taken(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    db: Any,
) -> None:
    queue_emails(db, 3)
    make_app(make_config(**smtp_server.config_kwargs(), dispatcher_threads=1))
    smtp_server.wait_for_messages(3, timeout=10)
    assert "email_outbox_rate" not in db.list_collection_names()  # not one round trip


class CutOnClaim(DispatchEvents):
    """Cuts the database link right after a claim: before the send's slot is taken."""

    def __init__(self, link: DatabaseLink) -> None:
        self.link = link

    def batch_claimed(self, size: int) -> None:
        if size:
            self.link.cut()


def test_without_the_database_nothing_is_sent_and_the_claim_is_given_back(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    db_link: DatabaseLink,
    db_name: str,
    db: Any,
) -> None:
    config = make_config(
        **smtp_server.config_kwargs(), smtp_rate_limit=RATE, db_uri=db_link.uri(db_name),
        db_timeout_ms=500,
    )  # fmt: skip
    rt = runtime(make_app(config))
    services = rt.services
    queue_emails(db, 2)
    context = DispatchContext(
        config,
        services.outbox,
        rt.clock,
        services.store.has_notification,
        events=CutOnClaim(db_link),
    )
    dispatcher = Dispatcher(
        context=context,
        sender=SmtpSender(SmtpSettings.from_config(config)),
        name="cut",
        limiter=RateLimiter(RATE, services.outbox.take_send_slot),
        wake=threading.Event(),
        stopping=threading.Event(),
        rng=random.Random(3),
    )
    try:
        with pytest.raises(DatabaseUnavailable):
            dispatcher.dispatch_once()
        # No slot, no send: its outcome could not have been stored either.
        time.sleep(0.2)
        assert smtp_server.messages == []
        assert db.email_outbox.count_documents({"status": "sending"}) == 2  # held, for now
        db_link.heal()
        dispatcher.context = replace(context, events=DispatchEvents())
        sent = 0
        deadline = time.monotonic() + 10
        while sent < 2:
            assert time.monotonic() < deadline, "the emails were not sent"
            sent += dispatcher.dispatch_once()
    finally:
        dispatcher.sender.close()
    assert len(smtp_server.wait_for_messages(2)) == 2
    # Given back before they were tried: the failed round counts as no attempt.
    assert {(r["status"], r["attempts"]) for r in db.email_outbox.find()} == {("sent", 1)}


def test_a_stop_does_not_wait_out_a_slot_nor_send_before_it(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    db: Any,
) -> None:
    slow = 0.2  # one email every 5 s
    config = make_config(**smtp_server.config_kwargs(), smtp_rate_limit=slow)
    services = runtime(make_app(config)).services
    services.outbox.take_send_slot(1 / slow)  # another dispatcher's: the next is 5 s off
    queue_emails(db, 1)
    pool = runtime(make_app(replace(config, dispatcher_threads=1))).dispatchers
    assert pool is not None
    deadline = time.monotonic() + 10
    while not db.email_outbox.count_documents({"status": "sending"}):
        assert time.monotonic() < deadline, "the email was not claimed"
        time.sleep(0.02)
    time.sleep(0.2)  # waiting for its slot now
    started = time.monotonic()
    pool.stop()
    assert time.monotonic() - started < 2
    assert smtp_server.messages == []
    # Given back at once, as not tried: the next dispatcher sends it in its slot.
    [record] = db.email_outbox.find()
    assert (record["status"], record["attempts"], record["claimed_by"]) == ("queued", 0, None)
