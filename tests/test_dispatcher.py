"""The outbox dispatcher against a real database and real SMTP servers."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from clocks import FakeClock
from conftest import DatabaseLink, runtime
from flask import Flask
from flask.testing import FlaskClient
from pymongo import MongoClient, monitoring
from smtp_fixtures import SmtpServer

from notification_service.clock import SYSTEM_CLOCK, Clock
from notification_service.config import Config
from notification_service.dispatcher import (
    SENT_FLUSH,
    DispatchContext,
    Dispatcher,
    DispatcherPool,
    DispatchEvents,
    RateLimiter,
    SendOutcome,
    backoff_seconds,
)
from notification_service.email_sender import SmtpSender, SmtpSettings
from notification_service.embedded import start_worker
from notification_service.outbox import Outbox
from notification_service.runtime import build_runtime
from notification_service.storage.inbox_store import InboxStore
from notification_service.storage.mongo_connector import DatabaseUnavailable

FAST_RETRY = {"dispatch_backoff_base_seconds": 0.01, "dispatch_backoff_max_seconds": 0.05}


def context_of(app: Flask, **settings: Any) -> DispatchContext:
    """The app's own dispatch context, with `settings` changed in its config."""
    services = runtime(app).services
    return DispatchContext(
        config=replace(services.config, **settings),
        outbox=services.outbox,
        clock=runtime(app).clock,
        is_recorded=services.store.has_notification,
    )


def make_dispatcher(
    context: DispatchContext, name: str = "test", per_second: float = 0
) -> Dispatcher:
    return Dispatcher(
        context=context,
        sender=SmtpSender(SmtpSettings.from_config(context.config)),
        name=name,
        limiter=RateLimiter(per_second, context.outbox.take_send_slot),
        wake=threading.Event(),
        stopping=threading.Event(),
        rng=random.Random(7),
    )


@pytest.fixture
def mail_app(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], smtp_server: SmtpServer
) -> Flask:
    """The app wired to the plain SMTP server, dispatchers off: tests drive them."""
    return make_app(make_config(**smtp_server.config_kwargs(), smtp_name="Notifier", **FAST_RETRY))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mail_setup(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], clock: FakeClock
) -> Iterator[Callable[..., tuple[FlaskClient, Dispatcher]]]:
    """An app wired to `server` (fast retries unless overridden) and a dispatcher for it,
    both on the test's `clock`: a backoff is waited out by moving it."""
    made: list[Dispatcher] = []

    def make(server: SmtpServer, **overrides: Any) -> tuple[FlaskClient, Dispatcher]:
        config = make_config(**server.config_kwargs(), **{**FAST_RETRY, **overrides})
        app = make_app(config, runtime=build_runtime(config, clock=clock))
        made.append(make_dispatcher(context_of(app)))
        return app.test_client(), made[-1]

    yield make
    for d in made:
        d.close()


@pytest.fixture
def dispatcher(mail_app: Flask) -> Iterator[Dispatcher]:
    d = make_dispatcher(context_of(mail_app))
    yield d
    d.close()


def drain(dispatcher: Dispatcher, limit: int = 50) -> int:
    """Dispatch until nothing is due; return how many sends were attempted."""
    handled = 0
    while handled < limit and (n := dispatcher.dispatch_once()):
        handled += n
    return handled


def outbox(db: Any) -> list[dict[str, Any]]:
    return list(db.email_outbox.find().sort("created_at", 1))


# --- what gets sent ----------------------------------------------------------------


def test_each_key_sends_its_email_or_none(
    mail_app: Flask, dispatcher: Dispatcher, smtp_server: SmtpServer, user_id: str
) -> None:
    client = mail_app.test_client()
    for key in ("registration", "new_message", "new_post", "new_login"):
        assert client.post("/create", json={"user_id": user_id, "key": key}).status_code == 201
    assert drain(dispatcher) == 2
    subjects = [m.message["Subject"] for m in smtp_server.wait_for_messages(2)]
    assert len(subjects) == 2
    assert "registration" in subjects[0] and "new_login" in subjects[1]
    for received in smtp_server.messages:
        assert received.message.get_body(("plain",)) is not None
        assert received.message.get_body(("html",)) is not None


def test_headers_carry_from_to_subject_and_the_stored_message_id(
    mail_app: Flask, dispatcher: Dispatcher, smtp_server: SmtpServer, db: Any, user_id: str
) -> None:
    mail_app.test_client().post("/create", json={"user_id": user_id, "key": "new_login"})
    drain(dispatcher)
    [received] = smtp_server.wait_for_messages(1)
    [record] = outbox(db)
    assert received.mail_from == "notifications@localhost"
    assert received.rcpt_tos == ["user@example.com"]
    assert received.message["From"] == "Notifier <notifications@localhost>"
    assert received.message["To"] == "user@example.com"
    assert received.message["Message-ID"] == record["message_id"]
    assert record["status"] == "sent"
    assert record["attempts"] == 1
    assert record["sent_at"] is not None


def test_non_ascii_name_and_data_survive(
    mail_setup: Any, smtp_server: SmtpServer, make_user: Callable[..., str]
) -> None:
    client, d = mail_setup(smtp_server, smtp_name="Служба уведомлений")
    body = {"user_id": make_user(name="Zoë"), "key": "new_login", "data": {"город": "Москва <b>"}}
    assert client.post("/create", json=body).status_code == 201
    drain(d)
    [received] = smtp_server.wait_for_messages(1)
    assert b"=?utf-8?" in received.data.split(b"\r\n\r\n", 1)[0]
    assert received.message["From"].addresses[0].display_name == "Служба уведомлений"
    text = received.message.get_body(("plain",)).get_content()
    html = received.message.get_body(("html",)).get_content()
    assert "Zoë" in text and "город: Москва <b>" in text
    assert "Москва &lt;b&gt;" in html  # HTML is autoescaped


def test_transient_4xx_is_retried_then_delivered_once(
    mail_setup: Any, smtp_factory: Any, db: Any, user_id: str, clock: FakeClock
) -> None:
    server = smtp_factory(fail_first=1, fail_code=451)
    client, d = mail_setup(server)
    client.post("/create", json={"user_id": user_id, "key": "registration"})
    assert d.dispatch_once()
    [record] = outbox(db)
    assert record["status"] == "queued"
    assert record["last_error"]["code"] == 451
    assert record["last_error"]["permanent"] is False
    assert record["next_attempt_at"] > record["created_at"]
    assert drain(d) == 0  # not before its backoff
    clock.advance(FAST_RETRY["dispatch_backoff_max_seconds"])
    assert drain(d) == 1
    assert len(server.wait_for_messages(1)) == 1
    [record] = outbox(db)
    assert (record["status"], record["attempts"]) == ("sent", 2)


def test_permanent_5xx_stops_at_once_with_the_reply_stored(
    mail_setup: Any, smtp_factory: Any, db: Any, user_id: str, clock: FakeClock
) -> None:
    client, d = mail_setup(smtp_factory(permanent_code=550))
    client.post("/create", json={"user_id": user_id, "key": "registration"})
    assert drain(d) == 1
    clock.advance(3600)  # past any backoff: a retry would be due
    assert not d.dispatch_once()
    [record] = outbox(db)
    assert record["status"] == "failed"
    assert record["attempts"] == 1
    assert record["last_error"]["code"] == 550
    assert record["last_error"]["permanent"] is True
    assert record["last_error"]["message"]


def test_transient_failures_stop_after_max_attempts(
    mail_setup: Any, smtp_factory: Any, db: Any, user_id: str, clock: FakeClock
) -> None:
    client, d = mail_setup(smtp_factory(fail_first=100, fail_code=421), dispatch_max_attempts=3)
    client.post("/create", json={"user_id": user_id, "key": "registration"})
    for _ in range(10):
        if outbox(db)[0]["status"] == "failed":
            break
        d.dispatch_once() or clock.advance(FAST_RETRY["dispatch_backoff_max_seconds"])
    [record] = outbox(db)
    assert (record["status"], record["attempts"]) == ("failed", 3)
    assert record["last_error"]["code"] == 421
    assert record["last_error"]["permanent"] is False
    assert record["last_error"]["outage"] is True  # 421: the server closes on everyone


def test_smtp_down_then_up_delivers_each_email_once(
    mail_setup: Any, smtp_server: SmtpServer, db: Any, user_id: str
) -> None:
    # A long backoff: only the "server is back" release can send them promptly.
    client, d = mail_setup(
        smtp_server, dispatch_backoff_base_seconds=60, dispatch_backoff_max_seconds=60
    )
    smtp_server.stop()
    for _ in range(3):
        client.post("/create", json={"user_id": user_id, "key": "registration"})
    assert drain(d) == 3
    assert {r["status"] for r in outbox(db)} == {"queued"}
    assert all(r["last_error"]["permanent"] is False for r in outbox(db))
    smtp_server.start()
    client.post("/create", json={"user_id": user_id, "key": "registration"})
    assert drain(d) == 4  # the new one, then the three released from their backoff
    received = smtp_server.wait_for_messages(4)
    assert len({m.message["Message-ID"] for m in received}) == 4
    assert {r["status"] for r in outbox(db)} == {"sent"}
    time.sleep(0.3)
    assert len(smtp_server.messages) == 4


def test_unbuildable_record_fails_permanently(dispatcher: Dispatcher, db: Any) -> None:
    now = datetime.now(UTC)
    dispatcher.context.outbox.enqueue(
        {"kind": "custom", "to": "a@b.c\r\nBcc: x@evil.test", "subject": "s", "text": "t",
         "html": None, "message_id": "<x@y>"},
        now,
    )  # fmt: skip
    assert dispatcher.dispatch_once()
    [record] = outbox(db)
    assert record["status"] == "failed"
    assert record["last_error"]["permanent"] is True


def test_consecutive_sends_reuse_one_connection(
    mail_app: Flask, dispatcher: Dispatcher, smtp_server: SmtpServer, user_id: str
) -> None:
    client = mail_app.test_client()
    for _ in range(5):
        client.post("/create", json={"user_id": user_id, "key": "new_login"})
    assert drain(dispatcher) == 5
    smtp_server.wait_for_messages(5)
    assert smtp_server.connections == 1


# --- leases, crashes, many dispatchers ------------------------------------------------


def worker_env(config: Config, server: SmtpServer, **extra: str) -> dict[str, str]:
    assert config.db_uri is not None
    return {**server.env(), "DB_URI": config.db_uri, "LOG_LEVEL": "WARNING", **extra}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def silent_smtp() -> Iterator[int]:
    """A port that accepts connections and never says a word: a send hangs there."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


def test_claim_of_a_killed_dispatcher_is_taken_over_after_the_lease(
    mail_app: Flask,
    smtp_server: SmtpServer,
    silent_smtp: int,
    db: Any,
    user_id: str,
    tmp_path: Path,
) -> None:
    services = runtime(mail_app).services
    mail_app.test_client().post("/create", json={"user_id": user_id, "key": "registration"})
    env = worker_env(
        services.config, smtp_server, SMTP_PORT=str(silent_smtp), SMTP_TIMEOUT="2",
        DISPATCH_LEASE_SECONDS="8",
    )  # fmt: skip
    worker = start_worker(env, tmp_path)
    try:
        wait_until(lambda: outbox(db)[0]["status"] == "sending", 20, "the worker's claim")
    finally:
        worker.process.kill()  # mid-send: no chance to record anything
        worker.process.wait()
    [claimed] = outbox(db)
    assert claimed["attempts"] == 1

    d = make_dispatcher(context_of(mail_app, dispatch_lease_seconds=8), "rescuer")
    try:
        assert not d.dispatch_once()  # the lease still holds
        wait_until(d.dispatch_once, 10, "the lease to run out")
    finally:
        d.close()
    [record] = outbox(db)
    assert (record["status"], record["attempts"]) == ("sent", 2)
    assert len(smtp_server.wait_for_messages(1)) == 1


def test_three_worker_processes_deliver_every_email_exactly_once(
    mail_app: Flask, smtp_server: SmtpServer, db: Any, tmp_path: Path
) -> None:
    services = runtime(mail_app).services
    now = datetime.now(UTC)
    total = 300
    db.email_outbox.insert_many(
        [
            {"_id": ObjectId(), "kind": "custom", "to": f"u{i}@example.com", "subject": f"n{i}",
             "text": "hello", "html": None, "message_id": f"<{i}.bulk@test>", "status": "queued",
             "attempts": 0, "created_at": now, "next_attempt_at": now - timedelta(seconds=1),
             "last_error": None, "sent_at": None, "claimed_by": None}
            for i in range(total)
        ]
    )  # fmt: skip
    env = worker_env(services.config, smtp_server, DISPATCHER_THREADS="2")
    workers = [start_worker(env, tmp_path, name=f"worker-{i}") for i in range(3)]
    try:
        wait_until(
            lambda: db.email_outbox.count_documents({"status": "sent"}) == total, 120, "delivery"
        )
    finally:
        for w in workers:
            w.process.terminate()
        codes = [w.process.wait(30) for w in workers]
    assert codes == [0, 0, 0]  # SIGTERM is a clean stop
    received = smtp_server.wait_for_messages(total, timeout=10)
    ids = [m.message["Message-ID"] for m in received]
    assert len(ids) == total and len(set(ids)) == total
    assert {r["attempts"] for r in db.email_outbox.find()} == {1}
    assert {r["claimed_by"] for r in db.email_outbox.find()} == {None}  # cleared on finish


def test_in_server_dispatcher_sends_a_new_email_promptly(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    user_id: str,
) -> None:
    app = make_app(
        make_config(**smtp_server.config_kwargs(), dispatcher_threads=2, dispatch_poll_seconds=5)
    )
    client = app.test_client()
    time.sleep(0.3)  # let the threads go idle on their (long) poll
    assert (
        client.post("/create", json={"user_id": user_id, "key": "registration"}).status_code == 201
    )
    # The enqueue wakes an idle thread: no waiting for the 5 s poll.
    assert len(smtp_server.wait_for_messages(1, timeout=2)) == 1


def test_stopping_the_pool_finishes_and_closes(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], smtp_server: SmtpServer
) -> None:
    app = make_app(make_config(**smtp_server.config_kwargs(), dispatcher_threads=2))
    pool = runtime(app).dispatchers
    assert pool is not None and all(t.is_alive() for t in pool.threads)
    runtime(app).close()
    assert not any(t.is_alive() for t in pool.threads)


def test_a_stop_that_gives_up_on_a_send_says_so(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An SMTP server that accepts the connection and never greets: the send hangs.
    hung = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(hung.accept()[0]), daemon=True).start()
    config = make_config(
        smtp_host="127.0.0.1",
        smtp_port=hung.getsockname()[1],
        smtp_security="none",
        smtp_timeout=3.0,
        dispatcher_threads=1,
    )
    app = make_app(config)
    email = {"to": "someone@example.com", "subject": "s", "text": "t"}
    assert app.test_client().post("/email", json=email).status_code == 202
    started = time.monotonic()
    while not accepted and time.monotonic() - started < 5:
        time.sleep(0.05)
    assert accepted, "the dispatcher never connected"
    pool = runtime(app).dispatchers
    assert pool is not None
    with caplog.at_level(logging.WARNING, logger="notification_service.dispatcher"):
        pool.stop(timeout=0.2)
    assert "1 dispatcher thread(s) still sending" in caplog.text
    assert "sent again" in caplog.text
    for connection in accepted:
        connection.close()
    hung.close()


# --- pure pieces -----------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    delays = [backoff_seconds(n, 2.0, 60.0, rng) for n in range(1, 9)]
    assert 1.0 <= delays[0] <= 2.0  # the first retry comes within seconds
    assert 4.0 <= delays[2] <= 8.0
    assert all(30.0 <= d <= 60.0 for d in delays[5:])
    assert len({round(backoff_seconds(1, 2.0, 60.0, rng), 6) for _ in range(20)}) > 1


def test_any_text_email_is_delivered_and_its_state_says_sent(
    mail_app: Flask, dispatcher: Dispatcher, smtp_server: SmtpServer
) -> None:
    client = mail_app.test_client()
    body = {"to": "x@example.com", "subject": "Привет", "text": "Любой текст", "html": "<b>hi</b>"}
    email_id = client.post("/email", json=body).get_json()["data"]["email_id"]
    assert drain(dispatcher) == 1
    [received] = smtp_server.wait_for_messages(1)
    assert received.message["Subject"] == "Привет"
    assert received.message.get_body(("plain",)).get_content().strip() == "Любой текст"
    state = client.get(f"/email/{email_id}").get_json()["data"]
    assert (state["status"], state["attempts"], state["last_error"]) == ("sent", 1, None)
    assert state["sent_at"] is not None and state["next_attempt_at"] is None


def test_worker_logs_the_backlog_and_stops_cleanly(
    mail_app: Flask, smtp_server: SmtpServer
) -> None:
    services = runtime(mail_app).services
    now = datetime.now(UTC)
    for i in range(5):
        services.outbox.enqueue(
            {"kind": "custom", "to": f"u{i}@example.com", "subject": "s", "text": "t",
             "html": None, "message_id": f"<{i}.progress@test>"},
            now,
        )  # fmt: skip
    smtp_server.stop()  # nothing can leave: the backlog stays
    env = worker_env(services.config, smtp_server, LOG_LEVEL="INFO")
    worker = subprocess.Popen(  # its stderr read here
        [sys.executable, "-m", "notification_service", "worker"],
        env={**os.environ, **env},
        cwd="/",
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stderr is not None
        lines = []
        for line in worker.stderr:
            lines.append(line)
            if "outbox backlog:" in line:
                break
        assert "outbox backlog: 5 queued" in lines[-1]
    finally:
        worker.send_signal(signal.SIGTERM)
        _, rest = worker.communicate(timeout=30)  # drains and closes the pipe
    assert worker.returncode == 0, rest


def test_one_address_greylisted_neither_stops_the_batch_nor_loses_its_backoff(
    mail_setup: Any, smtp_factory: Any, db: Any
) -> None:
    server = smtp_factory(fail_first=1, fail_code=450, fail_at="RCPT")
    client, d = mail_setup(
        server, dispatch_backoff_base_seconds=60, dispatch_backoff_max_seconds=60
    )
    for i in range(3):
        client.post("/email", json={"to": f"u{i}@example.com", "subject": "s", "text": "t"})
    assert d.dispatch_once() == 3  # the 450 did not end the batch
    assert len(server.wait_for_messages(2)) == 2
    [grey] = [r for r in outbox(db) if r["status"] == "queued"]
    assert grey["last_error"]["code"] == 450
    assert grey["last_error"]["outage"] is False
    # Later sends succeed, yet the greylisted email keeps waiting out its backoff.
    client.post("/email", json={"to": "late@example.com", "subject": "s", "text": "t"})
    assert drain(d) == 1
    again = db.email_outbox.find_one({"_id": grey["_id"]})
    assert again["status"] == "queued"
    assert again["next_attempt_at"] > datetime.now(UTC) + timedelta(seconds=20)


def test_a_slow_batch_renews_its_claim_so_no_one_sends_it_again(
    mail_app: Flask, smtp_server: SmtpServer, db: Any
) -> None:
    context = context_of(mail_app, dispatch_lease_seconds=2)
    client = mail_app.test_client()
    for i in range(5):
        client.post("/email", json={"to": f"u{i}@example.com", "subject": "s", "text": "t"})
    slow = make_dispatcher(context, "slow", per_second=2)  # 5 sends take about 2 s
    rival = make_dispatcher(context, "rival")
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(slow.dispatch_once()))
    try:
        worker.start()
        # The rival starts once the slow one holds the batch: the test is about a claim
        # outliving its first lease, not about who claims first (with journaled writes
        # the rival's first claim could otherwise win the race).
        deadline = time.monotonic() + 10
        while not db.email_outbox.count_documents({"claimed_by": {"$regex": "^slow:"}}):
            assert time.monotonic() < deadline, "the slow dispatcher claimed nothing"
            time.sleep(0.01)
        stolen = 0
        while worker.is_alive():
            stolen += rival.dispatch_once()
            time.sleep(0.1)
        worker.join()
    finally:
        slow.close()
        rival.close()
    assert (done, stolen) == ([5], 0)
    received = smtp_server.wait_for_messages(5)
    time.sleep(0.2)
    assert len(smtp_server.messages) == 5
    assert len({m.message["Message-ID"] for m in received}) == 5
    assert {(r["status"], r["attempts"]) for r in outbox(db)} == {("sent", 1)}


def test_an_email_whose_claims_keep_running_out_is_given_up(
    dispatcher: Dispatcher, smtp_server: SmtpServer, db: Any
) -> None:
    max_attempts = dispatcher.context.config.dispatch_max_attempts
    now = datetime.now(UTC)
    db.email_outbox.insert_one(
        {"_id": ObjectId(), "kind": "custom", "to": "x@example.com", "subject": "s",
         "text": "t", "html": None, "message_id": "<stuck@test>", "status": "sending",
         "attempts": max_attempts, "created_at": now, "claimed_by": "dead:1",
         "next_attempt_at": now - timedelta(seconds=1), "last_error": None, "sent_at": None}
    )  # fmt: skip
    assert dispatcher.dispatch_once() == 1
    [record] = outbox(db)
    assert record["status"] == "failed"
    assert "gave up" in record["last_error"]["message"]
    time.sleep(0.2)
    assert smtp_server.messages == []


class CheckRecorded(DispatchEvents):
    """At each accepted send, how many accepted sends the outbox does not say sent yet."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.accepted = 0
        self.unrecorded: list[int] = []

    def send_finished(self, outcome: SendOutcome, seconds: float | None) -> None:
        if outcome == "sent":
            self.accepted += 1
            recorded = self.outbox.records.count_documents({"status": "sent"})
            self.unrecorded.append(self.accepted - recorded)


def test_never_more_than_sent_flush_sends_are_unrecorded(mail_app: Flask, db: Any) -> None:
    context = context_of(mail_app)
    check = CheckRecorded(context.outbox)
    d = make_dispatcher(replace(context, events=check))
    total = 3 * SENT_FLUSH + 3
    queue_emails(context.outbox, total)
    try:
        while drain(d, total):
            pass
    finally:
        d.close()
    assert check.accepted == total
    assert max(check.unrecorded) <= SENT_FLUSH  # the duplicate window a crash can cost
    records = outbox(db)
    assert {r["status"] for r in records} == {"sent"}
    # Emails recorded by one write share its sent_at: a write per SENT_FLUSH / 2 or so.
    writes = len(Counter(r["sent_at"] for r in records))
    assert writes <= total // (SENT_FLUSH // 2) + 2


# --- the next batch, claimed while one is sent -------------------------------------------


class OnSend(DispatchEvents):
    """Calls `action` with the number of the accepted send (1, 2, ...)."""

    def __init__(self, action: Callable[[int], None]) -> None:
        self.action = action
        self.sends = 0
        self.claims: list[int] = []

    def batch_claimed(self, size: int) -> None:
        self.claims.append(size)

    def send_finished(self, outcome: SendOutcome, seconds: float | None) -> None:
        self.sends += 1
        self.action(self.sends)


def test_the_next_batch_is_claimed_while_one_is_sent(
    mail_app: Flask, smtp_server: SmtpServer, db: Any
) -> None:
    context = context_of(mail_app, dispatch_batch_size=2)
    queue_emails(context.outbox, 5)
    d = make_dispatcher(context)
    try:
        assert d.dispatch_once() == 2
        # Claimed during the first batch: held (leased) by this dispatcher already.
        wait_until(lambda: len(by_status(db)["sending"]) == 2, 10, "the next batch's claim")
        assert len(by_status(db)["queued"]) == 1
        assert d.dispatch_once() == 2
        assert d.dispatch_once() == 1
        assert d.dispatch_once() == 0
    finally:
        d.close()
    assert {(r["status"], r["attempts"]) for r in outbox(db)} == {("sent", 1)}
    assert len(smtp_server.wait_for_messages(5)) == 5


def by_status(db: Any) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {"queued": [], "sending": [], "sent": []}
    for record in outbox(db):
        found.setdefault(record["status"], []).append(record)
    return found


def test_a_claimed_ahead_batch_is_renewed_while_it_waits(
    mail_setup: Any, smtp_server: SmtpServer, db: Any, clock: FakeClock
) -> None:
    _, d = mail_setup(smtp_server, dispatch_batch_size=2, dispatch_lease_seconds=8, smtp_timeout=2)
    start = clock.now()
    queue_emails(d.context.outbox, 4, start)

    def slow_slot(seconds: float) -> bool:
        # Each send waits 3 s of the test's clock for its slot, once the batch claimed
        # ahead has its answer (it is claimed on a helper thread, in real time).
        wait_until(lambda: d._prefetch is None or d._prefetch.future.done(), 10, "the claim")
        clock.advance(seconds)
        return False

    d.limiter = RateLimiter(1, lambda interval: 3.0, sleep=slow_slot)
    rival = make_dispatcher(d.context, "rival")
    try:
        assert d.dispatch_once() == 2  # at 6 s, past half the lease: both claims renewed
        waiting = by_status(db)["sending"]
        assert len(waiting) == 2
        renewed_until = start + timedelta(seconds=6 + 8)  # stored to the millisecond
        assert all(abs(r["next_attempt_at"] - renewed_until) < timedelta(milliseconds=1)
                   for r in waiting)  # fmt: skip
        clock.set(start + timedelta(seconds=9))  # past the lease it was claimed with
        assert rival.dispatch_once() == 0  # still held: no one else sends it
        assert d.dispatch_once() == 2
    finally:
        d.close()
        rival.close()
    assert {(r["status"], r["attempts"]) for r in outbox(db)} == {("sent", 1)}
    received = smtp_server.wait_for_messages(4)
    time.sleep(0.2)
    assert len(smtp_server.messages) == len({m.message["Message-ID"] for m in received}) == 4


def test_a_batch_cut_short_gives_back_the_batch_claimed_ahead(
    mail_app: Flask, smtp_server: SmtpServer, db: Any
) -> None:
    context = context_of(mail_app, dispatch_batch_size=2)
    d = make_dispatcher(context)
    d.context = replace(context, events=OnSend(lambda n: d.stopping.set()))
    queue_emails(context.outbox, 5)
    try:
        assert d.dispatch_once() == 1  # the stop comes during the first batch
    finally:
        d.close()
    state = by_status(db)
    assert len(state["sent"]) == 1
    # The rest of this batch and the whole next one: due now, no attempt counted.
    assert len(state["queued"]) == 4 and not state["sending"]
    assert {(r["claimed_by"], r["attempts"]) for r in state["queued"]} == {(None, 0)}
    assert len(smtp_server.wait_for_messages(1)) == 1


def test_a_stopping_dispatcher_gives_back_the_batch_it_claimed_ahead(
    mail_app: Flask, smtp_server: SmtpServer, db: Any
) -> None:
    context = context_of(mail_app, dispatch_batch_size=2)
    d = make_dispatcher(context)
    # The stop comes with the last send of the first batch, which ends as a whole.
    d.context = replace(context, events=OnSend(lambda n: n == 2 and d.stopping.set()))
    queue_emails(context.outbox, 5)
    d.run()  # returns once stopped; closes the sender
    state = by_status(db)
    assert len(state["sent"]) == 2
    assert len(state["queued"]) == 3 and not state["sending"]
    assert {(r["claimed_by"], r["attempts"]) for r in state["queued"]} == {(None, 0)}
    assert len(smtp_server.wait_for_messages(2)) == 2


def test_two_pools_claiming_ahead_send_each_email_once(
    mail_app: Flask, smtp_server: SmtpServer, db: Any
) -> None:
    context = context_of(mail_app, dispatch_batch_size=4)
    total = 120
    queue_emails(context.outbox, total)
    pools = [DispatcherPool.start(context, 2) for _ in range(2)]
    try:
        wait_until(
            lambda: db.email_outbox.count_documents({"status": "sent"}) == total, 60, "delivery"
        )
    finally:
        for pool in pools:
            pool.stop()
    received = smtp_server.wait_for_messages(total, timeout=10)
    time.sleep(0.2)
    ids = [m.message["Message-ID"] for m in received]
    assert len(smtp_server.messages) == len(set(ids)) == total
    assert {(r["status"], r["attempts"], r["claimed_by"]) for r in outbox(db)} == {
        ("sent", 1, None)
    }


# --- claims and outcomes across database faults ------------------------------------------


class OnCommand(monitoring.CommandListener):
    """Run `action` once, just before the first command that `matches` goes out."""

    def __init__(self, matches: Callable[[dict[str, Any]], bool], action: Callable[[], None]):
        self.matches = matches
        self.action = action
        self.done = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if not self.done and self.matches(event.command):
            self.done = True
            self.action()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def sets_status(status: str) -> Callable[[dict[str, Any]], bool]:
    """Whether an outbox command is an update that sets `status` (a claim, a record)."""

    def matches(command: dict[str, Any]) -> bool:
        updates = command.get("updates", []) if "update" in command else []
        return any(u.get("u", {}).get("$set", {}).get("status") == status for u in updates)

    return matches


LinkedContext = Callable[..., DispatchContext]


@pytest.fixture
def linked_context(db_link: DatabaseLink) -> Iterator[LinkedContext]:
    """A dispatch context whose client reaches the database through `db_link` and reports
    its commands to a listener (the service's own client options otherwise)."""
    clients: list[MongoClient[dict[str, Any]]] = []

    def make(
        config: Config, listener: monitoring.CommandListener, clock: Clock = SYSTEM_CLOCK
    ) -> DispatchContext:
        client: MongoClient[dict[str, Any]] = MongoClient(
            db_link.uri(config.database_name),
            tz_aware=True,
            timeoutMS=config.db_timeout_ms,
            serverSelectionTimeoutMS=config.db_timeout_ms,
            w="majority",
            journal=True,
            event_listeners=[listener],
        )
        clients.append(client)
        db = client[config.database_name]
        return DispatchContext(
            config=config,
            outbox=Outbox(db, config.outbox_collection),
            clock=clock,
            is_recorded=InboxStore(db, config).has_notification,
        )

    yield make
    for client in clients:
        client.close()


def queue_emails(outbox: Outbox, n: int, now: datetime | None = None) -> None:
    for i in range(n):
        outbox.enqueue(
            {"kind": "custom", "to": f"u{i}@example.com", "subject": "s", "text": "t",
             "html": None, "message_id": f"<{uuid.uuid4().hex}@test>"},
            now or datetime.now(UTC),
        )  # fmt: skip


def wait_for_database(outbox: Outbox) -> None:
    wait_until(lambda: _answers(outbox), 20, "the database to answer again")


def _answers(outbox: Outbox) -> bool:
    try:
        outbox.backlog()
    except DatabaseUnavailable:
        return False
    return True


def test_sends_are_recorded_even_when_the_claim_was_lost_meanwhile(
    mail_app: Flask, smtp_server: SmtpServer, db: Any
) -> None:
    context = context_of(mail_app)
    client = mail_app.test_client()
    for i in range(4):
        client.post("/email", json={"to": f"u{i}@example.com", "subject": "s", "text": "t"})
    slow = make_dispatcher(context, "slow", per_second=5)  # 4 sends take about 0.6 s
    worker = threading.Thread(target=slow.dispatch_once)
    rival = make_dispatcher(context, "rival")
    try:
        worker.start()
        smtp_server.wait_for_messages(2)
        # The claim vanishes, as an unjournaled one did when the database was killed:
        # every record is queued and due again while the batch is being sent.
        db.email_outbox.update_many(
            {},
            {"$set": {"status": "queued", "claimed_by": None},
             "$currentDate": {"next_attempt_at": True}},
        )  # fmt: skip
        worker.join()
        # What was sent is recorded as sent, so no one sends it again.
        assert {r["status"] for r in outbox(db)} == {"sent"}
        assert drain(rival) == 0
    finally:
        slow.close()
        rival.close()
    time.sleep(0.2)
    received = smtp_server.messages
    assert len(received) == 4
    assert len({m.message["Message-ID"] for m in received}) == 4


def test_sends_an_outage_left_unrecorded_are_recorded_before_the_next_claim(
    linked_context: LinkedContext,
    make_config: Callable[..., Config],
    db_link: DatabaseLink,
    smtp_server: SmtpServer,
    db: Any,
) -> None:
    # A short lease (and the SMTP_TIMEOUT it allows, ample for the local server): on the
    # fake clock it costs no waiting, and it bounds how long the outcome write retries.
    config = make_config(
        **smtp_server.config_kwargs(), dispatch_lease_seconds=2, smtp_timeout=0.5, db_timeout_ms=500
    )
    # The database becomes unreachable just as the sends are to be recorded, and stays
    # so past the end of the claim's lease (the clock is moved past it).
    clock = FakeClock()
    context = linked_context(config, OnCommand(sets_status("sent"), db_link.cut), clock)
    queue_emails(context.outbox, 3, clock.now())
    d = make_dispatcher(context)
    try:
        assert d.dispatch_once() == 3
        assert len(smtp_server.wait_for_messages(3)) == 3
        assert {r["status"] for r in outbox(db)} == {"sending"}
        lease_end = min(r["next_attempt_at"] for r in outbox(db))
        clock.set(lease_end + timedelta(milliseconds=1))
        db_link.heal()
        wait_for_database(context.outbox)
        # The lease has run out: the emails are due again. What was sent is recorded
        # first, so nothing is sent twice.
        assert drain(d) == 0
    finally:
        d.close()
    assert {(r["status"], r["attempts"]) for r in outbox(db)} == {("sent", 1)}
    time.sleep(0.2)
    assert len(smtp_server.messages) == 3


def test_a_claim_whose_reply_was_lost_is_given_back_when_the_database_answers(
    linked_context: LinkedContext,
    make_config: Callable[..., Config],
    db_link: DatabaseLink,
    smtp_server: SmtpServer,
    db: Any,
) -> None:
    config = make_config(**smtp_server.config_kwargs(), db_timeout_ms=500)
    # The claim reaches the database and is stored; its reply is lost.
    context = linked_context(config, OnCommand(sets_status("sending"), db_link.drop_replies))
    queue_emails(context.outbox, 2)
    d = make_dispatcher(context)
    try:
        with pytest.raises(DatabaseUnavailable):
            d.dispatch_once()
        db_link.heal()
        assert {r["status"] for r in outbox(db)} == {"sending"}  # held for 60 s
        wait_for_database(context.outbox)
        # Nothing of that claim was tried: it is given back and sent now, not after
        # its lease.
        assert drain(d) == 2
    finally:
        d.close()
    assert {(r["status"], r["attempts"]) for r in outbox(db)} == {("sent", 1)}
    assert len(smtp_server.wait_for_messages(2)) == 2


# --- pending emails of requests that ended between their writes ---------------------------


def login_email(user_id: str, notification_id: str) -> dict[str, Any]:
    return {"kind": "notification", "to": "user@example.com", "subject": "New login",
            "text": "t", "html": None, "message_id": f"<{uuid.uuid4().hex}@test>",
            "user_id": user_id, "notification_id": notification_id, "key": "new_login"}  # fmt: skip


@pytest.fixture
def stored_notification(make_user: Callable[..., str]) -> tuple[str, str]:
    """A user whose array holds one notification: (user_id, notification_id)."""
    notification_id = str(ObjectId())
    user_id = make_user(notifications=[{"id": notification_id, "key": "new_login"}])
    return user_id, notification_id


def test_the_sweep_sends_what_was_recorded_drops_what_was_not_and_waits_for_the_young(
    mail_app: Flask, smtp_server: SmtpServer, stored_notification: tuple[str, str], db: Any
) -> None:
    user_id, notification_id = stored_notification
    start = datetime.now(UTC)
    clock = FakeClock(start)
    context = replace(context_of(mail_app), clock=clock)
    outbox, window = context.outbox, timedelta(seconds=context.config.write_window_seconds)
    recorded = outbox.enqueue(login_email(user_id, notification_id), start, pending=True)
    failed = outbox.enqueue(login_email(user_id, str(ObjectId())), start, pending=True)
    young = outbox.enqueue(login_email(user_id, notification_id), start + window, pending=True)
    d = make_dispatcher(context)
    try:
        clock.set(start + window - timedelta(seconds=1))  # no request is over yet
        assert d.sweep_pending() == (0, 0)
        clock.set(start + window + timedelta(seconds=1))
        assert d.sweep_pending() == (1, 1)
        state = {str(r["_id"]): r["status"] for r in outbox.records.find()}
        assert state == {recorded: "queued", young: "pending"}
        assert failed not in state
        assert drain(d) == 1
    finally:
        d.close()
    [received] = smtp_server.wait_for_messages(1)
    [sent] = outbox.records.find({"status": "sent"})
    assert received.message["Message-ID"] == sent["message_id"]
    assert str(sent["_id"]) == recorded


def test_a_running_dispatcher_sweeps_as_it_starts(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    stored_notification: tuple[str, str],
    db: Any,
) -> None:
    user_id, notification_id = stored_notification
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    Outbox(db, "email_outbox").enqueue(
        login_email(user_id, notification_id), an_hour_ago, pending=True
    )
    make_app(make_config(**smtp_server.config_kwargs(), dispatcher_threads=1))
    assert len(smtp_server.wait_for_messages(1, timeout=5)) == 1


def test_a_sweep_the_database_did_not_answer_is_tried_again(
    linked_context: LinkedContext,
    make_config: Callable[..., Config],
    db_link: DatabaseLink,
    smtp_server: SmtpServer,
    stored_notification: tuple[str, str],
    db: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user_id, notification_id = stored_notification
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    email_id = Outbox(db, "email_outbox").enqueue(
        login_email(user_id, notification_id), an_hour_ago, pending=True
    )
    config = make_config(
        **smtp_server.config_kwargs(), db_timeout_ms=300, dispatch_poll_seconds=0.1
    )
    context = linked_context(config, OnCommand(lambda command: False, lambda: None))
    db_link.cut()
    d = make_dispatcher(context)
    thread = threading.Thread(target=d.run)
    thread.start()
    try:
        wait_until(lambda: "pending emails not swept" in caplog.text, 10, "a failed sweep")
        db_link.heal()
        assert len(smtp_server.wait_for_messages(1, timeout=10)) == 1
    finally:
        d.stopping.set()
        d.wake.set()
        thread.join(10)
    assert db.email_outbox.find_one({"_id": ObjectId(email_id)})["status"] == "sent"
