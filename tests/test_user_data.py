"""A user's data exported and erased (user_data.py, user_data_handler.py), against a
real SecantusDB server, real SMTP servers and real dispatchers."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from bson import ObjectId
from conftest import runtime
from flask import Flask
from flask.testing import FlaskClient
from smtp_fixtures import SmtpServer
from test_dispatcher import FAST_RETRY, context_of, drain, make_dispatcher
from werkzeug.test import TestResponse

from notification_service.config import Config, Secret
from notification_service.digests import open_digest
from notification_service.embedded import free_port
from notification_service.keys import KeySpec, KeyTable
from notification_service.storage.idempotency_store import refs_of
from notification_service.storage.ids import new_id

API_KEY = "user-data-test-api-key-0123456"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADDRESS = "alice@example.com"
# Another user, as near as can be: an id one digit off, an address that holds Alice's.
NEAR_ADDRESS = "xalice@example.com"
DIGESTED = KeySpec("news_digest", in_app=True, email="if_unread", email_after_seconds=3600)
KEYS = KeyTable(
    [
        KeySpec("registration", in_app=False, email="always", mandatory=True),
        KeySpec("new_post", in_app=True, email="never"),
        KeySpec("news", in_app=True, email="always"),
        DIGESTED,
    ]
)


def near(user_id: str) -> str:
    """An id that differs from `user_id` in one hexadecimal digit only: the last of its
    random part (digit 18 of 24), not of its counter, so that it is never an id this
    process's `ObjectId()` makes next (a counter neighbour once collided as a duplicate
    key)."""
    digit = "0" if user_id[17] != "0" else "1"
    return user_id[:17] + digit + user_id[18:]


@pytest.fixture
def mail_config(make_config: Callable[..., Config], smtp_server: SmtpServer) -> Config:
    return make_config(
        **smtp_server.config_kwargs(),
        **FAST_RETRY,
        keys=KEYS,
        api_keys=(Secret(API_KEY),),
        unsubscribe_secret=Secret("u" * 32),
        public_url="https://notify.example.com",
    )


@pytest.fixture
def app(make_app: Callable[..., Flask], mail_config: Config) -> Flask:
    return make_app(mail_config)


@pytest.fixture
def web(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def users(db: Any, mail_config: Config) -> tuple[str, str]:
    """Alice and her near twin, as the application stores them (with fields of its own)."""
    alice = ObjectId()
    twin = ObjectId(near(str(alice)))
    db[mail_config.users_collection].insert_many(
        [
            {"_id": alice, "email": ADDRESS, "name": "Alice", "plan": "pro"},
            {"_id": twin, "email": NEAR_ADDRESS, "name": "Alicia", "plan": "free"},
        ]
    )
    return str(alice), str(twin)


@pytest.fixture
def dispatchers(app: Flask) -> Iterator[Callable[[], Any]]:
    made: list[Any] = []

    def make() -> Any:
        made.append(make_dispatcher(context_of(app)))
        return made[-1]

    yield make
    for dispatcher in made:
        dispatcher.close()


def data(response: TestResponse, status: int = 200) -> Any:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    return response.get_json()["data"]


def post(web: FlaskClient, path: str, body: Any, key: str | None = None) -> Any:
    headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
    return web.post(path, json=body, headers=headers)


def export(web: FlaskClient, user_id: str, query: str = "") -> Any:
    return data(web.get(f"/users/{user_id}/export{query}", headers=AUTH))


def erase(web: FlaskClient, user_id: str, query: str = "") -> Any:
    return data(web.delete(f"/users/{user_id}/data{query}", headers=AUTH))


def holds(value: Any, text: str) -> bool:
    """Whether `text` appears anywhere in `value` (any depth, any case), as a whole: an
    address that holds it (x + it) is not it."""
    if isinstance(value, str):
        pattern = rf"(?<![\w.+-]){re.escape(text)}(?![\w-]|\.\w)"
        return re.search(pattern, value, re.IGNORECASE) is not None
    if isinstance(value, dict):
        return any(holds(k, text) or holds(v, text) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(holds(item, text) for item in value)
    return False


def found_in(db: Any, text: str) -> list[tuple[str, Any]]:
    """(collection, _id) of every document of every collection of the test's database
    that holds `text` anywhere; of the users' documents, in the fields the service owns
    (`notifications`, `_meta`, `_prefs`): the others are the application's."""
    found = []
    for name in db.list_collection_names():
        for doc in db[name].find():
            if name == "users":
                doc = {k: v for k, v in doc.items() if k.startswith("notifications")}
            if holds(doc, text):
                found.append((name, doc.get("_id")))
    return found


def test_the_scan_finds_an_address_as_a_whole_only() -> None:
    assert holds({"a": [{"b": f"To <{ADDRESS.upper()}>."}]}, ADDRESS)
    assert not holds({"a": NEAR_ADDRESS}, ADDRESS) and not holds(ADDRESS + ".uk", ADDRESS)


def fill(web: FlaskClient, app: Flask, server: SmtpServer, who: list[tuple[str, str]]) -> None:
    """Give each (user, address) something of every kind, in every state: sent, failed,
    queued and scheduled emails, notifications, an opt-out, keyed answers."""
    dispatcher = make_dispatcher(context_of(app))
    try:
        for user_id, address in who:
            # Sent: the registration email, and one to the address with no user.
            assert (
                post(web, "/create", {"user_id": user_id, "key": "registration"}).status_code == 201
            )
            by_address = {"to": address, "subject": "Hi", "text": "Sent by address."}
            data(post(web, "/email", by_address, key=f"email-{user_id}"), 202)
        assert drain(dispatcher) == 2 * len(who)
        # Failed: the SMTP server refuses the next ones for good (its reply lands in
        # the record's last_error).
        for user_id, _ in who:
            failing = {"user_id": user_id, "subject": "Failed", "text": "Refused."}
            data(post(web, "/email", failing), 202)
        server.permanent_code = 550
        assert drain(dispatcher) == len(who)
        server.permanent_code = None
    finally:
        dispatcher.close()
    svc = runtime(app).services
    for user_id, address in who:
        # Queued: notifications that email, and a custom email to the user.
        for n in range(3):
            body = {"user_id": user_id, "key": "news", "data": {"n": n}}
            assert post(web, "/create", body, key=f"news-{user_id}-{n}").status_code == 201
        assert post(web, "/create", {"user_id": user_id, "key": "new_post"}).status_code == 201
        queued = {"user_id": user_id, "subject": "Queued", "text": f"For {address}."}
        data(post(web, "/email", queued), 202)
        # Scheduled: a digest waiting for its due time.
        open_digest(svc.outbox, DIGESTED, user_id, new_id(), svc.clock())
        # An opt-out, which an erasure keeps.
        off = {"user_id": user_id, "keys": {"news": {"email": False}}}
        assert web.put("/preferences", json=off, headers=AUTH).status_code == 200


@pytest.fixture
def filled(
    web: FlaskClient, app: Flask, users: tuple[str, str], smtp_server: SmtpServer
) -> tuple[str, str]:
    alice, twin = users
    fill(web, app, smtp_server, [(alice, ADDRESS), (twin, NEAR_ADDRESS)])
    smtp_server.clear()
    return alice, twin


# --- export ----------------------------------------------------------------------------


def test_export_lists_notifications_preferences_and_emails_by_id_and_by_address(
    web: FlaskClient, filled: tuple[str, str]
) -> None:
    alice, twin = filled
    got = export(web, alice)
    assert got["user_id"] == alice and got["user_document"] is True
    assert got["addresses"] == [ADDRESS]
    listed = data(web.get(f"/list?user_id={alice}&limit=100", headers=AUTH))["list"]
    assert got["notifications"] == listed and len(listed) == 4
    preferences = data(web.get(f"/preferences?user_id={alice}", headers=AUTH))
    assert got["preferences"] == preferences
    assert got["preferences"]["keys"]["news"]["email"] is False
    states = sorted((e["status"], e["kind"]) for e in got["emails"])
    assert states == [
        ("failed", "custom"),
        ("queued", "custom"),
        *[("queued", "notification")] * 3,
        ("scheduled", "digest"),
        ("sent", "custom"),  # to her address, with no user: found by the address
        ("sent", "notification"),
    ]
    # Each as GET /email/<id> shows it; newest first.
    for email in got["emails"]:
        assert email == data(web.get(f"/email/{email['id']}", headers=AUTH))
    created = [e["created_at"] for e in got["emails"]]
    assert created == sorted(created, reverse=True)
    # Nothing of her twin's (the near id, the address that holds hers).
    assert not holds(got, NEAR_ADDRESS) and not holds(got, twin)


def test_export_after_the_application_deleted_its_document_uses_the_given_address(
    web: FlaskClient, filled: tuple[str, str], db: Any, mail_config: Config
) -> None:
    alice, _ = filled
    db[mail_config.users_collection].delete_one({"_id": ObjectId(alice)})
    by_id = export(web, alice)
    assert by_id["user_document"] is False and by_id["addresses"] == []
    assert by_id["notifications"] == [] and by_id["preferences"] is None
    assert len(by_id["emails"]) == 7  # all but the one sent to her address without a user
    with_address = export(web, alice, f"?email={ADDRESS}")
    assert with_address["addresses"] == [ADDRESS]
    assert len(with_address["emails"]) == 8


def test_an_id_the_service_knows_nothing_of_exports_empty_not_404(web: FlaskClient) -> None:
    # An export is the answer "this is what we hold": nothing is an answer, and an
    # export after the application deleted its document must not fail.
    unknown = str(ObjectId())
    assert export(web, unknown) == {
        "user_id": unknown,
        "user_document": False,
        "addresses": [],
        "notifications": [],
        "preferences": None,
        "emails": [],
    }


# --- erase -----------------------------------------------------------------------------


def test_erase_leaves_the_address_nowhere_and_keeps_preferences_and_the_application_s_fields(
    web: FlaskClient,
    app: Flask,
    filled: tuple[str, str],
    db: Any,
    mail_config: Config,
    smtp_server: SmtpServer,
    dispatchers: Callable[[], Any],
) -> None:
    alice, twin = filled
    before_twin = export(web, twin)
    twin_doc = db[mail_config.users_collection].find_one({"_id": ObjectId(twin)})
    twin_keys = list(db.idempotency_keys.find({"refs": f"user:{twin}"}))
    assert found_in(db, ADDRESS), "the arrangement put the address nowhere"

    report = erase(web, alice)

    assert report == {
        "notifications": 4,
        "emails_cancelled": 5,  # 3 notifications' emails, 1 custom, 1 digest
        "emails_in_flight": 0,
        "emails_erased": 3,  # sent (2) and failed (1)
        "idempotency_records": 4,  # 3 keyed creates, 1 keyed email to her address
    }
    # Nowhere: not her address, not even her id as text.
    assert found_in(db, ADDRESS) == []
    assert found_in(db, alice) == []
    # The application's document and its fields stay; the opt-out too.
    doc = db[mail_config.users_collection].find_one({"_id": ObjectId(alice)})
    # What stays of the meta is its version, moved on (a polling stream sees the change).
    meta = doc.pop("notifications_meta")
    assert list(meta) == ["version"] and meta["version"] > 0
    assert doc == {
        "_id": ObjectId(alice),
        "email": ADDRESS,  # the application's field: its own to erase
        "name": "Alice",
        "plan": "pro",
        "notifications_prefs": {"news": {"email": False}},
    }
    prefs = data(web.get(f"/preferences?user_id={alice}", headers=AUTH))
    assert prefs["keys"]["news"]["email"] is False
    # What was queued or scheduled is cancelled, and never sent: a dispatcher that
    # runs after (past the digest's due time too) finds nothing to send.
    cancelled = list(db.email_outbox.find({"cancel_reason": "erased"}))
    assert len(cancelled) == 5
    tombstone = {"_id", "kind", "key", "attempts", "created_at", "next_attempt_at"}
    tombstone |= {"status", "cancel_reason", "cancelled_at", "claimed_by"}
    assert all(set(record) <= tombstone for record in cancelled)
    db.email_outbox.update_many({}, {"$set": {"next_attempt_at": datetime(2000, 1, 1, tzinfo=UTC)}})
    drain(dispatchers())
    sent_to = [rcpt for message in smtp_server.messages for rcpt in message.rcpt_tos]
    assert ADDRESS not in sent_to
    assert sent_to.count(NEAR_ADDRESS) == 4  # the twin's queued emails went
    for record in cancelled:
        state = data(web.get(f"/email/{record['_id']}", headers=AUTH))
        assert (state["status"], state["cancel_reason"], state["to"]) == (
            "cancelled",
            "erased",
            None,
        )
    # Her twin's data is untouched.
    assert db[mail_config.users_collection].find_one({"_id": ObjectId(twin)}) == twin_doc
    after_twin = export(web, twin)
    assert after_twin["notifications"] == before_twin["notifications"]
    assert len(after_twin["emails"]) == len(before_twin["emails"]) == 8
    assert list(db.idempotency_keys.find({"refs": f"user:{twin}"})) == twin_keys
    # A keyed request's retry replays without her, and sends nothing again.
    by_address = {"to": ADDRESS, "subject": "Hi", "text": "Sent by address."}
    replay = post(web, "/email", by_address, key=f"email-{alice}")
    assert replay.headers["Idempotent-Replay"] == "true"
    assert data(replay, 202) == {"email_id": None}
    # Idempotent: nothing is left to remove.
    assert erase(web, alice) == dict.fromkeys(report, 0)
    assert erase(web, alice, f"?email={ADDRESS}") == dict.fromkeys(report, 0)
    assert export(web, alice)["emails"] == [] and export(web, alice)["notifications"] == []


def test_erase_after_the_application_deleted_its_document_uses_the_given_address(
    web: FlaskClient, filled: tuple[str, str], db: Any, mail_config: Config
) -> None:
    alice, twin = filled
    db[mail_config.users_collection].delete_one({"_id": ObjectId(alice)})
    report = erase(web, alice, f"?email={ADDRESS}")
    assert report["emails_cancelled"] == 5 and report["emails_erased"] == 3
    assert report["notifications"] == 0  # they went with the document
    assert found_in(db, ADDRESS) == [] and found_in(db, alice) == []
    assert db[mail_config.users_collection].find_one({"_id": ObjectId(alice)}) is None
    assert len(export(web, twin)["emails"]) == 8


def test_an_email_to_another_user_at_the_same_address_is_theirs_and_stays(
    web: FlaskClient, users: tuple[str, str], db: Any, mail_config: Config
) -> None:
    # Two users of one address (a family's): each one's emails are theirs alone.
    alice, _ = users
    other = str(ObjectId())
    db[mail_config.users_collection].insert_one({"_id": ObjectId(other), "email": ADDRESS})
    mine = {"user_id": alice, "subject": "Mine", "text": "A."}
    theirs = {"user_id": other, "subject": "Theirs", "text": "B."}
    assert post(web, "/email", mine).status_code == post(web, "/email", theirs).status_code == 202
    assert erase(web, alice)["emails_cancelled"] == 1
    [kept] = db.email_outbox.find({"to": ADDRESS})
    assert (kept["user_id"], kept["status"]) == (other, "queued")


class SlowSmtp:
    """An SMTP server that holds each message's data until `release` is set."""

    def __init__(self) -> None:
        self.data_started = threading.Event()
        self.release = threading.Event()
        self.accepted = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        while not self.release.is_set():
            await asyncio.sleep(0.02)
        self.accepted += 1
        return "250 2.0.0 OK queued"


@pytest.mark.parametrize("outcome", ["accepted", "refused"])
def test_an_email_in_flight_during_an_erase_ends_cancelled_without_its_address(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    users: tuple[str, str],
    db: Any,
    outcome: str,
) -> None:
    smtp = SlowSmtp()
    controller = Controller(smtp, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        config = make_config(
            smtp_host="127.0.0.1",
            smtp_port=controller.port,
            smtp_security="none",
            keys=KEYS,
            api_keys=(Secret(API_KEY),),
            **FAST_RETRY,
        )
        app = make_app(config)
        web = app.test_client()
        alice, _ = users
        body = {"user_id": alice, "subject": "In flight", "text": f"To {ADDRESS}"}
        email_id = data(post(web, "/email", body), 202)["email_id"]
        dispatcher = make_dispatcher(context_of(app))
        if outcome == "refused":
            # A transient refusal would be recorded as a retry, a permanent one as a
            # failure quoting the address: neither may land on the erased record.
            async def refuse(server: SMTP, session: Session, envelope: Envelope) -> str:
                smtp.data_started.set()
                while not smtp.release.is_set():
                    await asyncio.sleep(0.02)
                return f"451 4.3.0 <{ADDRESS}> try again later"

            smtp.handle_DATA = refuse  # type: ignore[method-assign]
        worker = threading.Thread(target=dispatcher.dispatch_once)
        worker.start()
        try:
            assert smtp.data_started.wait(10), "the dispatcher did not start the send"
            record = db.email_outbox.find_one({"_id": ObjectId(email_id)})
            assert record["status"] == "sending"
            report = erase(web, alice)
            assert (report["emails_cancelled"], report["emails_in_flight"]) == (1, 1)
        finally:
            smtp.release.set()
            worker.join(15)
            dispatcher.close()
        assert smtp.accepted == (1 if outcome == "accepted" else 0)
        record = db.email_outbox.find_one({"_id": ObjectId(email_id)})
        assert (record["status"], record["cancel_reason"]) == ("cancelled", "erased")
        assert found_in(db, ADDRESS) == [] and found_in(db, alice) == []
        # And nothing claims it again.
        assert make_dispatcher(context_of(app)).dispatch_once() == 0
    finally:
        controller.stop()


def test_a_fan_out_retried_after_an_erase_replays_without_the_user_and_creates_nothing(
    web: FlaskClient, db: Any, mail_config: Config, make_user: Callable[..., str]
) -> None:
    ids = [make_user(email=f"user{n}@example.com") for n in range(3)]
    erased = ids[1]
    body = {"user_ids": ids, "key": "new_post"}
    first = post(web, "/create", body, key="fan-out-1")
    assert first.status_code == 201
    assert erase(web, erased)["idempotency_records"] == 1
    again = post(web, "/create", body, key="fan-out-1")
    assert again.status_code == 201 and again.headers["Idempotent-Replay"] == "true"
    results = again.get_json()["data"]["results"]
    assert [r["user_id"] for r in results] == [ids[0], ids[2]]
    assert results == [r for r in first.get_json()["data"]["results"] if r["user_id"] != erased]
    assert again.get_json()["data"]["totals"]["created"] == 2
    # Nobody got the notification again, and the erased user none.
    for user_id in (ids[0], ids[2]):
        assert data(web.get(f"/count?user_id={user_id}", headers=AUTH))["elements"] == 1
    doc = db[mail_config.users_collection].find_one({"_id": ObjectId(erased)})
    assert "notifications" not in doc
    assert found_in(db, erased) == []
    # A second erasure of the same user changes no record; another user's, only theirs.
    assert erase(web, erased)["idempotency_records"] == 0
    assert erase(web, ids[0])["idempotency_records"] == 1
    final = post(web, "/create", body, key="fan-out-1").get_json()["data"]
    assert [r["user_id"] for r in final["results"]] == [ids[2]]
    assert final["totals"] == {
        "created": 1,
        "skipped": 0,
        "user_not_found": 0,
        "user_has_no_email": 0,
        "user_document_invalid": 0,
    }


def test_a_single_create_retried_after_an_erase_creates_nothing_again(
    web: FlaskClient, db: Any, users: tuple[str, str]
) -> None:
    alice, _ = users
    body = {"user_id": alice, "key": "news"}
    first = post(web, "/create", body, key="one")
    assert data(first, 201)["notification_id"] is not None
    erase(web, alice)
    again = post(web, "/create", body, key="one")
    assert again.headers["Idempotent-Replay"] == "true"
    assert data(again, 201) == {
        "notification_id": None,
        "email_id": None,
        "collapsed": False,
        "skipped": [],
        "elements": None,
        "new": None,
    }
    assert export(web, alice)["notifications"] == []
    assert db.email_outbox.count_documents({"to": ADDRESS}) == 0


# --- hostile input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/users/not-an-id/export",
        "/users/6756b2f1a4c3e0d9b8f7123/export",  # 23 characters
        "/users/6756b2f1a4c3e0d9b8f712345/export",  # 25
        "/users/6756b2f1a4c3e0d9b8f7123g/export",
        "/users/%24ne/export",
        "/users/6756b2f1a4c3e0d9b8f71234%0A/export",
        "/users/6756b2f1a4c3e0d9b8f71234/export?email=not-an-address",
        "/users/6756b2f1a4c3e0d9b8f71234/export?email=a@b.com%0D%0ABcc:x@y.com",
        "/users/6756b2f1a4c3e0d9b8f71234/export?email=a@b.com&email=c@d.com",
        "/users/6756b2f1a4c3e0d9b8f71234/export?user_id=6756b2f1a4c3e0d9b8f71235",
        "/users/6756b2f1a4c3e0d9b8f71234/export?other=1",
    ],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_hostile_id_or_address_is_a_422_in_the_one_error_shape(
    web: FlaskClient, path: str, method: str
) -> None:
    if method == "DELETE":
        path = path.replace("/export", "/data")
    response = web.open(path, method=method, headers=AUTH)
    assert response.status_code == 422, response.get_data(as_text=True)
    body = response.get_json()
    assert body["success"] is False and body["error"]["code"] == "validation_failed"


def test_both_routes_need_the_api_key(web: FlaskClient, users: tuple[str, str]) -> None:
    alice, _ = users
    for method, path in (("GET", f"/users/{alice}/export"), ("DELETE", f"/users/{alice}/data")):
        response = web.open(path, method=method)
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == "unauthorized"
    assert export(web, alice)["user_document"] is True  # nothing was erased


def test_an_id_in_upper_case_is_the_same_user(web: FlaskClient, users: tuple[str, str]) -> None:
    alice, _ = users
    assert post(web, "/create", {"user_id": alice, "key": "new_post"}).status_code == 201
    assert erase(web, alice.upper())["notifications"] == 1


def test_a_pending_email_of_a_create_in_progress_is_cancelled_and_never_released(
    app: Flask, web: FlaskClient, users: tuple[str, str], db: Any
) -> None:
    # A create on a standalone server writes its email pending, then releases it once
    # its notification is stored: an erasure between the two must win.
    alice, _ = users
    svc = runtime(app).services
    record = {"kind": "custom", "to": ADDRESS, "subject": "s", "text": "t", "user_id": alice}
    email_id = svc.outbox.enqueue(record, svc.clock(), pending=True)
    assert erase(web, alice)["emails_cancelled"] == 1
    assert svc.outbox.activate([email_id], svc.clock()) == 0
    assert svc.outbox.existing([email_id]) == {email_id}  # so the create queues no other
    assert db.email_outbox.find_one({"_id": ObjectId(email_id)})["status"] == "cancelled"
    assert found_in(db, ADDRESS) == []


def test_a_stored_answer_names_the_users_of_its_request_or_else_its_email() -> None:
    user = "6756B2F1A4C3E0D9B8F71234"
    assert refs_of({"user_id": user, "key": "k"}, {}) == [f"user:{user.lower()}"]
    assert refs_of({"user_ids": ["a" * 24, "b" * 24]}, {}) == [
        "user:" + "a" * 24,
        "user:" + "b" * 24,
    ]
    email = {"success": True, "data": {"email_id": "c" * 24}}
    assert refs_of({"to": ADDRESS, "subject": "s"}, email) == ["email:" + "c" * 24]
    assert refs_of({"user_id": user}, email) == [f"user:{user.lower()}"]
    assert refs_of("not an object", email) == []


def test_an_email_sent_to_the_address_with_its_domain_in_another_case_is_hers(
    web: FlaskClient, users: tuple[str, str], db: Any
) -> None:
    # A domain has no case (RFC 5321 2.4): "alice@EXAMPLE.com" is her mailbox. Its local
    # part may have one, so "ALICE@example.com" stays someone else's, as does the twin's.
    alice, _ = users
    local, _, domain = ADDRESS.partition("@")
    for to in (f"{local}@{domain.upper()}", f"{local}@{domain.title()}", ADDRESS):
        body = {"to": to, "subject": "Hi", "text": "By address."}
        assert post(web, "/email", body).status_code == 202
    other = {"to": f"{local.upper()}@{domain}", "subject": "Hi", "text": "Not hers."}
    assert post(web, "/email", other).status_code == 202
    assert len(export(web, alice)["emails"]) == 3
    assert erase(web, alice)["emails_cancelled"] == 3
    left = [record["to"] for record in db.email_outbox.find({"to": {"$exists": True}})]
    assert left == [f"{local.upper()}@{domain}"]
