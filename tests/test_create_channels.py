"""A create honours the key's channels and the user's preferences (notifications._create):
what is skipped and said so, the unsubscribe link of an optional key's email, and an
if_unread key's digest opened by the create itself. Real SecantusDB and aiosmtpd; time
moved by the test's clock."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from smtp_fixtures import SmtpServer
from test_digests import DELAY, DIGESTED, NEWS, PUBLIC_URL, Setup, digests_of, make_setup, setup
from test_dispatcher import drain

from notification_service.storage.mongo_connector import Document

__all__ = ["make_setup", "setup"]  # the fixtures, imported for this module's tests
MISSING = "0123456789abcdef01234567"


def create(setup: Setup, expect: int | None = None, **body: Any) -> Document:
    answer = setup.app.test_client().post("/create", json={"data": {}, **body})
    if expect is not None:
        assert answer.status_code == expect, answer.get_json()
    data: Document = answer.get_json()["data"]
    return data


def turn_off(setup: Setup, user_id: str, key: str, channel: str) -> None:
    answer = setup.app.test_client().put(
        "/preferences", json={"user_id": user_id, "keys": {key: {channel: False}}}
    )
    assert answer.status_code == 200, answer.get_json()


def listed(setup: Setup, user_id: str) -> list[Document]:
    page = setup.app.test_client().get(f"/list?user_id={user_id}").get_json()["data"]
    items: list[Document] = page["list"]
    return items


# --- preferences ---------------------------------------------------------------------


def test_a_create_of_a_key_turned_off_answers_200_with_null_ids_and_writes_nothing(
    setup: Setup, user_id: str, db: Any
) -> None:
    turn_off(setup, user_id, "new_post", "in_app")
    data = create(setup, 200, user_id=user_id, key="new_post")
    assert data == {
        "notification_id": None, "email_id": None, "collapsed": False,
        "skipped": ["in_app"], "elements": 0, "new": 0,
    }  # fmt: skip
    assert listed(setup, user_id) == []
    # Another key of the same user still arrives.
    assert create(setup, 201, user_id=user_id, key="new_message")["skipped"] == []


def test_a_fan_out_says_skipped_for_each_user_who_turned_the_key_off_and_counts_them(
    setup: Setup, make_user: Any
) -> None:
    users = [make_user() for _ in range(3)]
    turn_off(setup, users[1], "new_post", "in_app")
    data = create(setup, 201, user_ids=[*users, MISSING], key="new_post")
    assert [r["status"] for r in data["results"]] == [
        "created", "skipped", "created", "user_not_found"
    ]  # fmt: skip
    assert data["results"][1] == {"user_id": users[1], "status": "skipped", "skipped": ["in_app"]}
    assert data["results"][0]["skipped"] == []
    assert data["totals"]["skipped"] == 1 and data["totals"]["created"] == 2
    assert listed(setup, users[1]) == []
    assert len(listed(setup, users[0])) == 1


def test_email_turned_off_records_the_notification_and_queues_no_email(
    setup: Setup, user_id: str, db: Any
) -> None:
    turn_off(setup, user_id, NEWS.name, "email")
    data = create(setup, 201, user_id=user_id, key=NEWS.name)
    assert data["email_id"] is None and data["notification_id"] is not None
    assert data["skipped"] == ["email"]
    assert db.email_outbox.count_documents({}) == 0


def test_an_optional_key_s_email_carries_its_unsubscribe_link_and_a_mandatory_one_none(
    setup: Setup, user_id: str, db: Any, smtp_server: SmtpServer
) -> None:
    optional = create(setup, 201, user_id=user_id, key=NEWS.name)["email_id"]
    mandatory = create(setup, 201, user_id=user_id, key="new_login")["email_id"]
    records = {str(r["_id"]): r for r in db.email_outbox.find()}
    assert records[optional]["unsubscribe_url"].startswith(f"{PUBLIC_URL}/unsubscribe/")
    assert records[mandatory]["unsubscribe_url"] is None
    drain(setup.dispatcher())
    by_key = {m.message["List-Unsubscribe"] is not None: m.message for m in smtp_server.messages}
    assert set(by_key) == {True, False}
    assert by_key[True]["List-Unsubscribe"] == f"<{records[optional]['unsubscribe_url']}>"
    assert by_key[True]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert by_key[False]["List-Unsubscribe-Post"] is None


def test_a_mandatory_key_ignores_a_stored_opt_out(setup: Setup, user_id: str, db: Any) -> None:
    # PUT refuses to turn a mandatory key off; a value stored some other way is ignored.
    db.users.update_one(
        {"_id": ObjectId(user_id)},
        {"$set": {"notifications_prefs": {"new_login": {"in_app": False, "email": False}}}},
    )
    data = create(setup, 201, user_id=user_id, key="new_login")
    assert data["skipped"] == []
    assert data["notification_id"] is not None and data["email_id"] is not None


# --- email if unread ------------------------------------------------------------------


def test_an_if_unread_create_queues_no_email_and_its_digest_goes_at_due_time(
    setup: Setup, user_id: str, db: Any, smtp_server: SmtpServer
) -> None:
    first = create(setup, 201, user_id=user_id, key=DIGESTED.name, data={"n": 1})
    assert first["email_id"] is None and first["skipped"] == []
    second = create(setup, 201, user_id=user_id, key=DIGESTED.name, data={"n": 2})
    [digest] = digests_of(db)
    assert digest["status"] == "scheduled"
    assert set(digest["notification_ids"]) == {first["notification_id"], second["notification_id"]}
    assert drain(setup.dispatcher()) == 0  # not due yet
    setup.clock.advance(DELAY + 1)
    assert drain(setup.dispatcher()) == 1
    assert len(smtp_server.messages) == 1
    assert digests_of(db)[0]["status"] == "sent"


def test_an_if_unread_create_for_a_user_who_turned_its_email_off_opens_no_digest(
    setup: Setup, user_id: str, db: Any
) -> None:
    turn_off(setup, user_id, DIGESTED.name, "email")
    data = create(setup, 201, user_id=user_id, key=DIGESTED.name)
    assert data["skipped"] == ["email"] and data["notification_id"] is not None
    assert digests_of(db) == []


def test_an_if_unread_fan_out_opens_a_digest_only_for_those_it_can_email(
    setup: Setup, make_user: Any, db: Any
) -> None:
    users = [make_user(), make_user(email=None), make_user()]
    turn_off(setup, users[2], DIGESTED.name, "email")
    data = create(setup, 201, user_ids=[*users, MISSING], key=DIGESTED.name)
    assert [r["status"] for r in data["results"]] == [
        "created", "created", "created", "user_not_found"
    ]  # fmt: skip
    assert [r["skipped"] for r in data["results"][:3]] == [[], ["email"], ["email"]]
    assert [d["user_id"] for d in digests_of(db)] == [users[0]]


def test_a_collapsed_if_unread_create_puts_the_kept_notification_in_the_next_digest(
    setup: Setup, user_id: str, db: Any, smtp_server: SmtpServer
) -> None:
    thread = {"user_id": user_id, "key": DIGESTED.name, "collapse_key": "thread-1"}
    kept = create(setup, 201, **thread, data={"n": 1})["notification_id"]
    setup.clock.advance(DELAY + 1)
    assert drain(setup.dispatcher()) == 1  # the first batch's email, the thread unread
    again = create(setup, 201, **thread, data={"n": 2})
    assert again["collapsed"] is True and again["notification_id"] == kept
    opened = [d for d in digests_of(db) if d["status"] == "scheduled"]
    assert len(opened) == 1 and kept in opened[0]["notification_ids"]
    setup.clock.advance(DELAY + 1)
    assert drain(setup.dispatcher()) == 1
    assert len(smtp_server.messages) == 2  # the thread's new message was emailed too


# A `<field>_prefs` another writer left in a shape other than {key: {channel: bool}}, in
# which the database's condition `prefs.new_post.in_app != false` (it looks into arrays)
# finds an in-app opt-out all the same.
ODD_OPT_OUTS = [
    [{"new_post": {"in_app": False}}],
    {"new_post": [{"in_app": False}]},
    {"new_post": {"in_app": [False, True]}},
]


def test_a_create_and_the_preferences_agree_on_an_opt_out_stored_in_another_shape(
    setup: Setup, make_user: Any
) -> None:
    # The write's condition and the read of the preferences must say the same: else a
    # create answers 409 (one user) or user_not_found (a fan-out) for an existing user
    # whose preferences, as GET shows them, leave the key on.
    client = setup.app.test_client()
    for prefs in ODD_OPT_OUTS:
        user = make_user(notifications_prefs=prefs)
        shown = client.get(f"/preferences?user_id={user}").get_json()["data"]
        assert shown["keys"]["new_post"]["in_app"] is False, prefs
        assert create(setup, 200, user_id=user, key="new_post")["skipped"] == ["in_app"], prefs
        fanned = create(setup, 201, user_ids=[user, make_user()], key="new_post")["results"]
        assert fanned[0] == {"user_id": user, "status": "skipped", "skipped": ["in_app"]}, prefs
        assert listed(setup, user) == []
