"""Email if unread: digests against a real database and a real SMTP server, with time
moved by the test's clock instead of waited for."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from clocks import FakeClock
from conftest import runtime
from flask import Flask
from smtp_fixtures import SmtpServer
from test_dispatcher import FAST_RETRY, context_of, drain, make_dispatcher

from notification_service.config import Config, Secret
from notification_service.digests import Digests, open_digest
from notification_service.dispatcher import DispatchContext, Dispatcher
from notification_service.keys import DEFAULT_EMAIL_AFTER_SECONDS, DEFAULT_KEYS, KeySpec, KeyTable
from notification_service.notifications import Services
from notification_service.runtime import build_runtime
from notification_service.schemas import Notification
from notification_service.storage.ids import new_id
from notification_service.storage.mongo_connector import Document

DELAY = 600
PUBLIC_URL = "https://notify.example.com"
DIGESTED = KeySpec("new_message", in_app=True, email="if_unread", email_after_seconds=DELAY)
ALERT = KeySpec("alert", in_app=True, email="if_unread", email_after_seconds=60, mandatory=True)
NEWS = KeySpec("news", in_app=True, email="always")  # emailed at once, and optional
KEYS = KeyTable([*(s for s in DEFAULT_KEYS if s.name != DIGESTED.name), DIGESTED, ALERT, NEWS])


@dataclass
class Setup:
    """An app on the test's clock, its services, and a way to make dispatchers."""

    app: Flask
    clock: FakeClock
    context: DispatchContext
    made: list[Dispatcher]

    @property
    def svc(self) -> Services:
        return runtime(self.app).services

    def dispatcher(self, name: str = "test") -> Dispatcher:
        self.made.append(make_dispatcher(self.context, name))
        return self.made[-1]


@pytest.fixture
def make_setup(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    db: Any,
) -> Iterator[Callable[[], Setup]]:
    made: list[Dispatcher] = []
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))

    def make() -> Setup:
        config = make_config(
            **smtp_server.config_kwargs(),
            **FAST_RETRY,
            keys=KEYS,
            unsubscribe_secret=Secret("s" * 32),
            public_url=PUBLIC_URL,
        )
        app = make_app(config, runtime=build_runtime(config, clock=clock))
        svc = runtime(app).services
        digests = Digests.of(config, svc.outbox, svc.templates, svc.preferences)
        context = replace(context_of(app), clock=clock, digests=digests)
        return Setup(app, clock, context, made)

    yield make
    for d in made:
        d.close()


@pytest.fixture
def setup(make_setup: Callable[[], Setup]) -> Setup:
    return make_setup()


def create_unread(setup: Setup, user_id: str, spec: KeySpec = DIGESTED) -> str:
    """What the create path does for an `if_unread` key: open (or join) the digest,
    THEN push the notification; return the notification's id."""
    now = setup.clock.now()
    notification: Notification = {
        "id": new_id(),
        "timestamp": int(now.timestamp()),
        "is_new": True,
        "user_id": user_id,
        "key": spec.name,
        "target_id": None,
        "data": {},
    }
    notification["data"] = {"n": notification["id"]}  # shown by the generic template
    open_digest(setup.svc.outbox, spec, user_id, notification["id"], now)
    done, _ = setup.svc.store.append([(user_id, notification)], now, require_email=False)
    assert done == {user_id}
    return notification["id"]


def digests_of(db: Any) -> list[Document]:
    return list(db.email_outbox.find({"kind": "digest"}).sort("created_at", 1))


def state(setup: Setup, email_id: Any) -> Document:
    answer = setup.app.test_client().get(f"/email/{email_id}")
    assert answer.status_code == 200
    data: Document = answer.get_json()["data"]
    return data


# --- a batch, from its first notification to its one email ------------------------------


def test_the_first_unread_opens_a_batch_and_one_email_at_due_time_lists_the_still_unread(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    first = create_unread(setup, user_id)
    setup.clock.advance(100)
    read = create_unread(setup, user_id)
    setup.clock.advance(100)
    last = create_unread(setup, user_id)
    [digest] = digests_of(db)
    shown = state(setup, digest["_id"])
    assert (shown["status"], shown["kind"]) == ("scheduled", "digest")
    assert shown["notification_ids"] == [first, read, last]
    assert (shown["to"], shown["cancel_reason"], shown["cancelled_at"]) == (None, None, None)
    due = digest["next_attempt_at"]
    assert due == digest["created_at"] + timedelta(seconds=DELAY)  # the first one's delay
    assert shown["next_attempt_at"] == due.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    setup.svc.store.mark_read(user_id, read, setup.clock.now())

    d = setup.dispatcher()
    setup.clock.set(due - timedelta(seconds=1))
    assert drain(d) == 0  # not due yet
    assert d._idle_seconds() <= 1  # an idle dispatcher wakes for it
    setup.clock.set(due)
    assert drain(d) == 1
    [received] = smtp_server.wait_for_messages(1)
    body = received.message.get_body(("plain",)).get_content()
    listed = [line for line in body.splitlines() if line.startswith("n: ")]
    assert listed == [f"n: {last}", f"n: {first}"]  # newest first, the read one left out
    assert received.message["Subject"] == "2 new notifications (new_message)"
    link = received.message["List-Unsubscribe"]
    assert link.startswith(f"<{PUBLIC_URL}/unsubscribe/{user_id}.new_message.")
    assert received.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f"unsubscribe: {link[1:-1]}" in body
    shown = state(setup, digest["_id"])
    assert (shown["status"], shown["attempts"]) == ("sent", 1)
    assert shown["to"] == "user@example.com"
    assert shown["notification_ids"] == [first, read, last]  # the batch, kept
    assert received.message["Message-ID"] == shown["message_id"]
    assert drain(d) == 0
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize("how", ["read", "read_all", "delete"])
def test_a_batch_all_read_or_deleted_before_due_is_cancelled_and_nothing_is_sent(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any, how: str
) -> None:
    ids = [create_unread(setup, user_id) for _ in range(2)]
    store, now = setup.svc.store, setup.clock.now()
    for notification_id in ids:
        if how == "read":
            store.mark_read(user_id, notification_id, now)
        elif how == "delete":
            store.delete(user_id, notification_id, now)
    if how == "read_all":
        store.mark_all_read(user_id, None, now)
    setup.clock.advance(DELAY)
    assert drain(setup.dispatcher()) == 1  # handled: cancelled
    [digest] = digests_of(db)
    shown = state(setup, digest["_id"])
    assert (shown["status"], shown["cancel_reason"]) == ("cancelled", "nothing_unread")
    assert shown["cancelled_at"] is not None and shown["to"] is None
    assert smtp_server.messages == []


def test_email_turned_off_before_due_cancels_the_digest_as_unsubscribed(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    create_unread(setup, user_id)
    setup.svc.preferences.update(user_id, {"new_message": {"email": False}})
    setup.clock.advance(DELAY)
    assert drain(setup.dispatcher()) == 1
    [digest] = digests_of(db)
    assert (digest["status"], digest["cancel_reason"]) == ("cancelled", "unsubscribed")
    assert smtp_server.messages == []


def test_a_mandatory_key_s_digest_ignores_the_preference_and_carries_no_unsubscribe_link(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    alert = ALERT
    create_unread(setup, user_id, alert)
    # An opt-out written before the key became mandatory: ignored now.
    db.users.update_one(
        {"_id": ObjectId(user_id)}, {"$set": {"notifications_prefs.alert.email": False}}
    )
    setup.clock.advance(alert.email_after_seconds)
    assert drain(setup.dispatcher()) == 1
    [received] = smtp_server.wait_for_messages(1)
    assert "unsubscribe" not in received.message.get_body(("plain",)).get_content()
    assert received.message["List-Unsubscribe"] is None
    assert digests_of(db)[0]["unsubscribe_url"] is None


def test_a_queued_email_of_a_key_turned_off_is_cancelled_at_send_time(
    setup: Setup, smtp_server: SmtpServer, make_user: Callable[..., str], db: Any
) -> None:
    off, on = make_user(), make_user()
    setup.svc.preferences.update(off, {"news": {"email": False}})
    outbox, now = setup.svc.outbox, setup.clock.now()
    ids = {}
    for user in (off, on):
        ids[user] = outbox.enqueue(
            {"kind": "notification", "to": "user@example.com", "subject": "s", "text": "t",
             "html": None, "message_id": f"<{new_id()}@test>", "user_id": user,
             "notification_id": new_id(), "key": "news"},
            now,
        )  # fmt: skip
    mandatory = outbox.enqueue(
        {"kind": "notification", "to": "user@example.com", "subject": "login", "text": "t",
         "html": None, "message_id": f"<{new_id()}@test>", "user_id": off,
         "notification_id": new_id(), "key": "new_login"},
        now,
    )  # fmt: skip
    # An opt-out of a mandatory key (written before it became one) is ignored.
    db.users.update_one(
        {"_id": ObjectId(off)}, {"$set": {"notifications_prefs.new_login.email": False}}
    )
    assert drain(setup.dispatcher()) == 3
    assert len(smtp_server.wait_for_messages(2)) == 2
    assert state(setup, ids[off])["cancel_reason"] == "unsubscribed"
    assert state(setup, ids[on])["status"] == "sent"
    assert state(setup, mandatory)["status"] == "sent"


def test_a_user_gone_or_without_address_at_due_time_cancels_with_that_reason(
    setup: Setup, smtp_server: SmtpServer, make_user: Callable[..., str], db: Any
) -> None:
    gone, no_address = make_user(), make_user()
    create_unread(setup, gone)
    create_unread(setup, no_address)
    db.users.delete_one({"_id": ObjectId(gone)})
    db.users.update_one({"_id": ObjectId(no_address)}, {"$unset": {"email": ""}})
    setup.clock.advance(DELAY)
    assert drain(setup.dispatcher()) == 2
    reasons = {d["user_id"]: d["cancel_reason"] for d in digests_of(db)}
    assert reasons == {gone: "user_not_found", no_address: "user_has_no_email"}
    assert smtp_server.messages == []


def test_the_batch_closes_once_claimed_and_the_next_unread_opens_another(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    first = create_unread(setup, user_id)
    setup.clock.advance(DELAY)
    d = setup.dispatcher()
    assert drain(d) == 1
    second = create_unread(setup, user_id)
    old, new = digests_of(db)
    assert (old["status"], old["notification_ids"]) == ("sent", [first])
    assert (new["status"], new["notification_ids"]) == ("scheduled", [second])
    assert new["next_attempt_at"] == setup.clock.now() + timedelta(seconds=DELAY)
    setup.clock.advance(DELAY)
    assert drain(d) == 1
    first_mail, second_mail = smtp_server.wait_for_messages(2)
    assert first in first_mail.message.get_body(("plain",)).get_content()
    text = second_mail.message.get_body(("plain",)).get_content()
    assert second in text and first not in text  # first is still unread, but was sent


def test_two_racing_opens_end_in_one_scheduled_digest_and_one_email(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    barrier = threading.Barrier(2)
    created: list[str] = []

    def create() -> None:
        barrier.wait()
        created.append(create_unread(setup, user_id))

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [digest] = digests_of(db)
    assert sorted(digest["notification_ids"]) == sorted(created)
    setup.clock.advance(DELAY)
    assert drain(setup.dispatcher()) == 1
    [received] = smtp_server.wait_for_messages(1)
    assert all(n in received.message.get_body(("plain",)).get_content() for n in created)


# --- crashes and restarts -------------------------------------------------------------------


def test_a_crash_between_the_digest_s_open_and_the_push_sends_nothing(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    # The create path died after open_digest, before its push: the id is never stored.
    open_digest(setup.svc.outbox, DIGESTED, user_id, new_id(), setup.clock.now())
    setup.clock.advance(DELAY)
    assert drain(setup.dispatcher()) == 1
    [digest] = digests_of(db)
    assert (digest["status"], digest["cancel_reason"]) == ("cancelled", "nothing_unread")
    assert smtp_server.messages == []


@pytest.mark.parametrize("rendered", [False, True], ids=["claimed", "claimed_and_rendered"])
def test_a_digest_whose_dispatcher_died_after_claiming_it_is_sent_once_by_another(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any, rendered: bool
) -> None:
    notification_id = create_unread(setup, user_id)
    setup.clock.advance(DELAY)
    lease = setup.context.config.dispatch_lease_seconds
    outbox = setup.svc.outbox
    claimed = outbox.claim_batch("dead", setup.clock.now(), lease, 10)
    assert len(claimed) == 1
    if rendered:  # it died after writing the content, before the send
        assert setup.context.digests is not None
        setup.context.digests.prepare(claimed, setup.clock.now())
    d = setup.dispatcher("rescuer")
    assert drain(d) == 0  # the dead one's lease still holds
    setup.clock.advance(lease + 1)
    assert drain(d) == 1
    [received] = smtp_server.wait_for_messages(1)
    assert notification_id in received.message.get_body(("plain",)).get_content()
    [digest] = digests_of(db)
    assert (digest["status"], digest["attempts"]) == ("sent", 2)
    assert received.message["Message-ID"] == digest["message_id"]
    assert drain(d) == 0
    assert len(smtp_server.messages) == 1


def test_a_restart_loses_no_scheduled_digest(
    make_setup: Callable[[], Setup], smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    before = make_setup()
    notification_id = create_unread(before, user_id)
    runtime(before.app).close()  # the process stops: only the database remembers
    after = make_setup()  # a new process: new client, services and dispatcher
    after.clock.advance(DELAY)
    assert drain(after.dispatcher()) == 1
    [received] = smtp_server.wait_for_messages(1)
    assert notification_id in received.message.get_body(("plain",)).get_content()
    assert digests_of(db)[0]["status"] == "sent"


def test_a_digest_that_cannot_be_rendered_fails_alone_and_the_rest_of_its_claim_goes(
    setup: Setup, smtp_server: SmtpServer, make_user: Callable[..., str], db: Any
) -> None:
    broken, fine = make_user(), make_user()
    # A key that no longer emails (the operator changed KEYS_FILE while it waited).
    create_unread(setup, broken, KeySpec("new_post", in_app=True, email="if_unread"))
    create_unread(setup, fine)
    setup.clock.advance(DEFAULT_EMAIL_AFTER_SECONDS)
    assert drain(setup.dispatcher()) == 2
    assert len(smtp_server.wait_for_messages(1)) == 1
    states = {d["user_id"]: (d["status"], d["last_error"]) for d in digests_of(db)}
    assert states[fine] == ("sent", None)
    status, error = states[broken]
    assert (status, error["permanent"]) == ("failed", True)
    assert "cannot build message" in error["message"]


def test_an_in_server_dispatcher_sends_a_digest_soon_after_its_due_time(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    user_id: str,
) -> None:
    soon = KeySpec("soon", in_app=True, email="if_unread", email_after_seconds=1)
    config = make_config(
        **smtp_server.config_kwargs(),
        keys=KeyTable([*KEYS, soon]),
        unsubscribe_secret=Secret("s" * 32),
        public_url=PUBLIC_URL,
        dispatcher_threads=1,
        dispatch_poll_seconds=30,  # only the due time, or a wake, brings the thread back
    )
    svc = runtime(make_app(config)).services
    now = datetime.now(UTC)
    note: Notification = {
        "id": new_id(),
        "timestamp": int(now.timestamp()),
        "is_new": True,
        "user_id": user_id,
        "key": "soon",
        "target_id": None,
        "data": {},
    }
    opened_at = time.monotonic()
    open_digest(svc.outbox, soon, user_id, note["id"], now)
    svc.store.append([(user_id, note)], now, require_email=False)
    assert len(smtp_server.wait_for_messages(1, timeout=10)) == 1
    assert 0.9 <= time.monotonic() - opened_at < 4  # at its due time, not the poll's end


def test_a_digest_due_as_late_as_the_give_up_age_allows_still_goes_out_and_is_retried(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    # email_after_seconds may be as long as DISPATCH_MAX_AGE_SECONDS (keys.py). The
    # give-up age of a digest counts from its due time, as an email's counts from when
    # it was queued: counted from when the batch opened, it was spent before the first
    # attempt, and the digest failed unsent ("gave up after 0 attempts").
    config = replace(setup.context.config, dispatch_max_age_seconds=DELAY)
    setup.context = replace(setup.context, config=config)
    create_unread(setup, user_id)
    [digest] = digests_of(db)
    setup.clock.advance(DELAY + 5)  # a dispatcher a few seconds late
    smtp_server.fail_remaining = 1  # and a transient refusal: retried, not given up
    dispatcher = setup.dispatcher()
    drain(dispatcher)
    setup.clock.advance(1)
    drain(dispatcher)
    shown = state(setup, digest["_id"])
    assert shown["status"] == "sent", shown["last_error"]
    assert len(smtp_server.messages) == 1


def test_a_busy_batch_keeps_a_bounded_list_of_its_newest_ids(
    setup: Setup, smtp_server: SmtpServer, user_id: str, db: Any
) -> None:
    # Every create of the key joins the batch until it is due (and a collapsed one
    # twice: its own id, then the kept one). Kept whole, the list grew with each, and
    # so did each join's cost ($addToSet compares every element): 2.4 ms a create at 0
    # on SecantusDB, 35 ms at 5,000, 86 ms at 6,000. Only ids still in the user's array
    # (NOTIFICATIONS_LIMIT, at most 500) can ever be listed, so the newest are kept.
    outbox = setup.svc.outbox
    now = setup.clock.now()
    for _ in range(1100):
        open_digest(outbox, DIGESTED, user_id, new_id(), now)
    last = [create_unread(setup, user_id) for _ in range(3)]
    [digest] = digests_of(db)
    assert len(digest["notification_ids"]) <= 1000
    assert digest["notification_ids"][-3:] == last
    setup.clock.advance(DELAY)
    assert drain(setup.dispatcher()) == 1
    [received] = smtp_server.wait_for_messages(1)
    assert all(n in received.message.get_body(("plain",)).get_content() for n in last)


def test_a_queued_email_of_a_user_gone_at_send_time_is_cancelled_as_user_not_found(
    setup: Setup, smtp_server: SmtpServer, make_user: Callable[..., str], db: Any
) -> None:
    # The send-time preference check finds no document: the user did not unsubscribe
    # (an operator reading "unsubscribed" looks for an opt-out that is not there); the
    # reason is the digest's for the same case.
    gone = make_user()
    email_id = setup.svc.outbox.enqueue(
        {"kind": "notification", "to": "user@example.com", "subject": "s", "text": "t",
         "html": None, "message_id": f"<{new_id()}@test>", "user_id": gone,
         "notification_id": new_id(), "key": "news"},
        setup.clock.now(),
    )  # fmt: skip
    db.users.delete_one({"_id": ObjectId(gone)})
    drain(setup.dispatcher())
    shown = state(setup, email_id)
    assert (shown["status"], shown["cancel_reason"]) == ("cancelled", "user_not_found")
    assert smtp_server.messages == []
