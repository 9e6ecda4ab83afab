"""The users' notification arrays (InboxStore), against a real SecantusDB server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId

from notification_service.config import Config
from notification_service.errors import NotificationNotFound, UserHasNoEmail, UserNotFound
from notification_service.schemas import Notification
from notification_service.storage.inbox_store import InboxStore
from notification_service.storage.mongo_connector import connect, database

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def notification(user_id: str, n: int = 0, is_new: bool = True) -> Notification:
    return {
        "id": str(ObjectId()),
        "timestamp": n,
        "is_new": is_new,
        "user_id": user_id,
        "key": "new_post",
        "target_id": None,
        "data": {"n": n},
    }


@pytest.fixture
def store(config: Config) -> Iterator[InboxStore]:
    client = connect(config)
    yield InboxStore(database(client, config), config)
    client.close()


def test_append_writes_each_user_and_says_who(
    store: InboxStore, user_id: str, make_user: Callable[..., str]
) -> None:
    other, missing = make_user(), str(ObjectId())
    entries = [(u, notification(u)) for u in (user_id, missing, other)]
    done, refused = store.append(entries, NOW, require_email=True)
    assert (done, refused) == ({user_id, other}, {})
    assert store.counts(other, NOW)["elements"] == 1


def test_append_of_a_repeat_writes_nothing_twice(store: InboxStore, user_id: str) -> None:
    entries = [(user_id, notification(user_id))]
    store.append(entries, NOW, require_email=False)
    done, _ = store.append(entries, NOW, require_email=False, repeat=True)
    assert done == {user_id}
    assert store.counts(user_id, NOW)["elements"] == 1


def test_append_refuses_a_field_that_is_not_an_array_and_leaves_it(
    store: InboxStore, db: Any, make_user: Callable[..., str], user_id: str
) -> None:
    odd = make_user(notifications="not a list")
    done, refused = store.append(
        [(u, notification(u)) for u in (odd, user_id)], NOW, require_email=False
    )
    assert done == {user_id}
    assert refused[odd].details == [{"field": "notifications", "problem": "is not an array"}]
    assert db.users.find_one({"_id": ObjectId(odd)})["notifications"] == "not a list"


def test_append_capped_keeps_newest_first_within_the_cap(
    make_config: Callable[..., Config], db: Any, user_id: str
) -> None:
    config = make_config(notifications_limit=4)
    client = connect(config)
    try:
        store = InboxStore(database(client, config), config)
        for n in range(6):
            store.append([(user_id, notification(user_id, n))], NOW, require_email=False)
        page = store.inbox_page(user_id, 0, 10, NOW)
    finally:
        client.close()
    assert [item["data"]["n"] for item in page["list"]] == [5, 4, 3, 2]
    assert page["elements"] == 4


def test_append_leaves_out_missing_users_and_those_without_email_and_says_why(
    store: InboxStore, db: Any, make_user: Callable[..., str]
) -> None:
    missing = str(ObjectId())
    assert store.append([(missing, notification(missing))], NOW, require_email=False) == (
        set(),
        {},
    )
    assert isinstance(store.why_not_appended(missing, require_email=False), UserNotFound)
    no_email = make_user(email=None)
    done, _ = store.append([(no_email, notification(no_email))], NOW, require_email=True)
    assert done == set()
    assert isinstance(store.why_not_appended(no_email, require_email=True), UserHasNoEmail)
    assert db.users.find_one({"_id": ObjectId(no_email)}) == {"_id": ObjectId(no_email)}
    assert db.users.count_documents({}) == 1


def test_ensure_user_creates_a_profile_once_and_never_changes_one(
    store: InboxStore, db: Any, make_user: Callable[..., str]
) -> None:
    new = str(ObjectId())
    store.ensure_user(new, "test@example.com")
    store.ensure_user(new, "other@example.com")
    assert db.users.find_one({"_id": ObjectId(new)}, {"_id": 0}) == {
        "email": "test@example.com",
        "notifications": [],
    }
    no_email = make_user(email=None, name="kept")
    store.ensure_user(no_email, "test@example.com")
    assert db.users.find_one({"_id": ObjectId(no_email)}, {"_id": 0}) == {"name": "kept"}


def test_inbox_page_counts_unread(store: InboxStore, user_id: str) -> None:
    for n in range(5):
        store.append(
            [(user_id, notification(user_id, n, is_new=n % 2 == 0))], NOW, require_email=False
        )
    page = store.inbox_page(user_id, 1, 2, NOW)
    assert (page["elements"], page["new"]) == (5, 3)
    assert [item["data"]["n"] for item in page["list"]] == [3, 2]


def test_mark_read_distinguishes_user_and_notification(store: InboxStore, user_id: str) -> None:
    item = notification(user_id)
    store.append([(user_id, item)], NOW, require_email=False)
    store.mark_read(user_id, item["id"], NOW)
    store.mark_read(user_id, item["id"], NOW)
    assert store.inbox_page(user_id, 0, 1, NOW)["new"] == 0
    with pytest.raises(NotificationNotFound):
        store.mark_read(user_id, str(ObjectId()), NOW)
    with pytest.raises(UserNotFound):
        store.mark_read(str(ObjectId()), item["id"], NOW)
