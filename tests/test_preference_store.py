"""Preferences in the user's document: the pure builders (storage/preference_updates.py)
and the store (PreferenceStore) against a real SecantusDB server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bson import ObjectId
from conftest import DatabaseLink

from notification_service.config import Config
from notification_service.errors import UserDocumentInvalid, UserNotFound
from notification_service.keys import KeySpec
from notification_service.storage import preference_updates as prefs
from notification_service.storage.mongo_connector import DatabaseUnavailable, connect, database
from notification_service.storage.preference_store import PreferenceStore
from notification_service.storage.updates import Layout

LAYOUT = Layout("notifications", "notifications_meta", 100, None)
OID = ObjectId()


# --- the builders, without a database ---------------------------------------------------


def test_a_partial_update_sets_only_the_given_paths_and_bumps_the_version() -> None:
    update = prefs.set_channels(LAYOUT, {"new_post": {"email": False}, "b": {"in_app": True}})
    assert update == {
        "$set": {"notifications_prefs.new_post.email": False, "notifications_prefs.b.in_app": True},
        "$inc": {"notifications_meta.version": 1},
    }


def test_the_prefs_live_beside_the_configured_array() -> None:
    layout = Layout.of(Config(notifications_field="inbox"))
    assert prefs.prefs_field(layout) == "inbox_prefs"
    assert prefs.in_app_allowed(layout, "new_post") == {
        "inbox_prefs.new_post.in_app": {"$ne": False}
    }


def test_only_an_explicit_false_opts_out() -> None:
    user = {
        "notifications_prefs": {
            "new_post": {"in_app": False, "email": True},
            "new_message": {"email": False},
            "odd": {"email": "false", "in_app": 0},
        }
    }
    assert prefs.opted_out(LAYOUT, user, "new_post") == {"in_app"}
    assert prefs.opted_out(LAYOUT, user, "new_message") == {"email"}
    assert prefs.opted_out(LAYOUT, user, "odd") == set()  # not booleans: not set
    assert prefs.opted_out(LAYOUT, user, "absent") == set()
    assert prefs.opted_out(LAYOUT, {}, "new_post") == set()
    assert prefs.opted_out(LAYOUT, {"notifications_prefs": "junk"}, "new_post") == set()


def test_a_one_channel_write_matches_only_when_it_changes_something() -> None:
    assert prefs.changing(LAYOUT, OID, "new_post", "email", False) == {
        "_id": OID,
        "notifications_prefs.new_post.email": {"$ne": False},
    }


# --- the store --------------------------------------------------------------------------


@pytest.fixture
def store(config: Config) -> Iterator[PreferenceStore]:
    client = connect(config)
    yield PreferenceStore(database(client, config), config)
    client.close()


def test_a_new_user_has_set_nothing(store: PreferenceStore, user_id: str) -> None:
    assert store.get(user_id) == {}


def test_an_unknown_user_is_not_found(store: PreferenceStore) -> None:
    with pytest.raises(UserNotFound):
        store.get(str(ObjectId()))
    with pytest.raises(UserNotFound):
        store.update(str(ObjectId()), {"new_post": {"email": False}})


def test_an_update_keeps_the_other_settings_and_the_rest_of_the_document(
    store: PreferenceStore, user_id: str, db: Any, config: Config
) -> None:
    store.update(user_id, {"new_post": {"in_app": False, "email": False}})
    after = store.update(user_id, {"new_post": {"email": True}, "new_message": {"in_app": False}})
    assert after == {
        "new_post": {"in_app": False, "email": True},
        "new_message": {"in_app": False},
    }
    doc = db[config.users_collection].find_one({"_id": ObjectId(user_id)})
    assert doc["email"] == "user@example.com"
    assert doc["notifications_meta"]["version"] == 2  # each write moves the version


def test_opt_outs_outlive_the_erasure_of_the_notifications(
    store: PreferenceStore, user_id: str, db: Any, config: Config
) -> None:
    store.update(user_id, {"new_post": {"email": False}})
    # What an erasure of the user's data unsets (issue 18): the array and its meta.
    db[config.users_collection].update_one(
        {"_id": ObjectId(user_id)}, {"$unset": {"notifications": "", "notifications_meta": ""}}
    )
    assert store.get(user_id) == {"new_post": {"email": False}}


def test_a_one_channel_write_is_idempotent_and_writes_nothing_the_second_time(
    store: PreferenceStore, user_id: str, db: Any, config: Config
) -> None:
    assert store.set_channel(user_id, "new_post", "email", False) is True
    assert store.set_channel(user_id, "new_post", "email", False) is False
    doc = db[config.users_collection].find_one({"_id": ObjectId(user_id)})
    assert doc["notifications_meta"]["version"] == 1
    assert store.set_channel(user_id, "new_post", "email", True) is True
    assert store.get(user_id) == {"new_post": {"email": True}}


def test_a_one_channel_write_to_a_user_who_is_gone_changes_nothing(
    store: PreferenceStore, db: Any, config: Config
) -> None:
    assert store.set_channel(str(ObjectId()), "new_post", "email", False) is False
    assert db[config.users_collection].count_documents({}) == 0  # no upsert


def test_email_allowed_is_the_users_that_exist_and_did_not_opt_out(
    store: PreferenceStore, make_user: Callable[..., str]
) -> None:
    users = [make_user() for _ in range(120)]  # more than one batch of ids
    off = users[::7]
    for user in off:
        store.set_channel(user, "new_post", "email", False)
    store.set_channel(users[1], "new_post", "in_app", False)  # another channel
    store.set_channel(users[2], "new_message", "email", False)  # another key
    gone = str(ObjectId())
    assert store.email_allowed([*users, gone], "new_post") == set(users) - set(off)
    assert store.email_allowed([users[0]], "new_post") == set()
    assert store.email_allowed([users[1]], "new_post") == {users[1]}
    assert store.email_allowed([], "new_post") == set()


def test_opted_out_reads_a_user_document_as_the_create_path_has_it(
    store: PreferenceStore, user_id: str, db: Any, config: Config
) -> None:
    store.update(user_id, {"new_post": {"in_app": False}})
    doc = db[config.users_collection].find_one({"_id": ObjectId(user_id)})
    assert store.opted_out(doc, "new_post") == {"in_app"}
    assert store.opted_out(doc, "new_message") == set()


def test_skipped_is_the_keys_channels_the_user_turned_off_and_none_when_mandatory(
    store: PreferenceStore,
) -> None:
    user = {"notifications_prefs": {"k": {"email": False, "in_app": False}}}
    both = KeySpec("k", in_app=True, email="always")
    assert store.skipped(user, both) == ["in_app", "email"]
    assert store.skipped(user, KeySpec("k", in_app=True, email="never")) == ["in_app"]
    assert store.skipped(user, KeySpec("k", in_app=False, email="always")) == ["email"]
    assert store.skipped(user, KeySpec("k", in_app=True, email="always", mandatory=True)) == []
    assert store.skipped({}, both) == []


def test_the_in_app_condition_keeps_a_push_from_a_user_who_opted_out(
    store: PreferenceStore, make_user: Callable[..., str], db: Any, config: Config
) -> None:
    on, off = make_user(), make_user()
    store.set_channel(off, "new_post", "in_app", False)
    users = db[config.users_collection]
    for user in (on, off):
        users.update_one(
            {"_id": ObjectId(user), **store.in_app_allowed("new_post")},
            {"$push": {"notifications": {"id": "n"}}},
        )
    assert users.find_one({"_id": ObjectId(on)})["notifications"] == [{"id": "n"}]
    assert "notifications" not in users.find_one({"_id": ObjectId(off)})


def test_a_prefs_field_that_is_not_a_document_is_a_409_and_left_as_it_is(
    store: PreferenceStore, make_user: Callable[..., str], db: Any, config: Config
) -> None:
    user = make_user(notifications_prefs="the application's own")
    with pytest.raises(UserDocumentInvalid):
        store.update(user, {"new_post": {"email": False}})
    with pytest.raises(UserDocumentInvalid):
        store.set_channel(user, "new_post", "email", False)
    assert store.get(user) == {}
    doc = db[config.users_collection].find_one({"_id": ObjectId(user)})
    assert doc["notifications_prefs"] == "the application's own"


def test_a_database_that_does_not_answer_is_unavailable(
    make_config: Callable[..., Config], db_link: DatabaseLink, db_name: str
) -> None:
    config = make_config(db_uri=db_link.uri(db_name), db_timeout_ms=300)
    client = connect(config)
    try:
        store = PreferenceStore(database(client, config), config)
        db_link.cut()
        user = str(ObjectId())
        with pytest.raises(DatabaseUnavailable):
            store.get(user)
        with pytest.raises(DatabaseUnavailable):
            store.email_allowed([user], "new_post")
        with pytest.raises(DatabaseUnavailable):
            store.set_channel(user, "new_post", "email", False)
    finally:
        client.close()
