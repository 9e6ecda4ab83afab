"""Storage operations and database faults, against real SecantusDB servers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId
from conftest import MongoServer, free_port
from flask import Flask
from pymongo.errors import AutoReconnect, OperationFailure

from notification_service.config import Config
from notification_service.errors import (
    NotificationNotFound,
    UserHasNoEmail,
    UserNotFound,
)
from notification_service.schemas import Notification
from notification_service.storage.inbox_store import InboxStore
from notification_service.storage.mongo_connector import (
    DatabaseUnavailable,
    connect,
    database,
    guarded,
)

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


def test_database_name_comes_from_the_uri_path() -> None:
    assert Config(db_uri="mongodb://h:1/app?x=1").database_name == "app"
    assert Config(db_uri="mongodb://h:1/").database_name == "notifications"
    assert Config(db_uri="mongodb://h:1").database_name == "notifications"


def test_append_capped_returns_the_user_without_the_array(store: InboxStore, user_id: str) -> None:
    user = store.append_capped(user_id, notification(user_id), NOW, require_email=True)
    assert user["email"] == "user@example.com"
    assert "notifications" not in user


def test_append_capped_keeps_newest_first_within_the_cap(
    make_config: Callable[..., Config], db: Any, user_id: str
) -> None:
    config = make_config(notifications_limit=4)
    client = connect(config)
    try:
        store = InboxStore(database(client, config), config)
        for n in range(6):
            store.append_capped(user_id, notification(user_id, n), NOW, require_email=False)
        page = store.inbox_page(user_id, 0, 10, NOW)
    finally:
        client.close()
    assert [item["data"]["n"] for item in page["list"]] == [5, 4, 3, 2]
    assert page["elements"] == 4


def test_append_capped_refuses_missing_user_and_missing_email(
    store: InboxStore, db: Any, make_user: Callable[..., str]
) -> None:
    missing = str(ObjectId())
    with pytest.raises(UserNotFound):
        store.append_capped(missing, notification(missing), NOW, require_email=False)
    no_email = make_user(email=None)
    with pytest.raises(UserHasNoEmail):
        store.append_capped(no_email, notification(no_email), NOW, require_email=True)
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
        store.append_capped(
            user_id,
            notification(user_id, n, is_new=n % 2 == 0),
            NOW,
            require_email=False,
        )
    page = store.inbox_page(user_id, 1, 2, NOW)
    assert (page["elements"], page["new"]) == (5, 3)
    assert [item["data"]["n"] for item in page["list"]] == [3, 2]


def test_mark_read_distinguishes_user_and_notification(store: InboxStore, user_id: str) -> None:
    item = notification(user_id)
    store.append_capped(user_id, item, NOW, require_email=False)
    store.mark_read(user_id, item["id"], NOW)
    store.mark_read(user_id, item["id"], NOW)
    assert store.inbox_page(user_id, 0, 1, NOW)["new"] == 0
    with pytest.raises(NotificationNotFound):
        store.mark_read(user_id, str(ObjectId()), NOW)
    with pytest.raises(UserNotFound):
        store.mark_read(str(ObjectId()), item["id"], NOW)


# --- faults: bounded waits, 503 with Retry-After, recovery --------------------------


@pytest.fixture
def own_server() -> Iterator[MongoServer]:
    """A server of this test's own, so freezing it cannot disturb other tests."""
    server = MongoServer.start()
    yield server
    server.stop()


def test_frozen_database_gives_503_within_the_timeout_then_recovers(
    own_server: MongoServer, make_app: Callable[..., Flask], make_user: Callable[..., str]
) -> None:
    config = Config(db_uri=own_server.uri("frozen"), dispatcher_threads=0, db_timeout_ms=1500)
    client = make_app(config).test_client()
    user_id = str(ObjectId())
    assert client.post("/create", json={"user_id": user_id, "key": "new_post"}).status_code == 404

    own_server.freeze()
    try:
        for request in (
            lambda: client.get(f"/list?user_id={user_id}"),
            lambda: client.post("/create", json={"user_id": user_id, "key": "new_post"}),
        ):
            started = time.monotonic()
            response = request()
            elapsed = time.monotonic() - started
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "2"
            assert response.get_json()["error"]["code"] == "database_unavailable"
            assert elapsed < 5, f"took {elapsed:.1f}s"
    finally:
        own_server.thaw()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        response = client.get(f"/list?user_id={user_id}")
        if response.status_code != 503:
            break
        time.sleep(0.2)
    assert response.status_code == 404  # answered again: the user just does not exist


def test_unreachable_database_gives_503_quickly(make_app: Callable[..., Flask]) -> None:
    config = Config(
        db_uri=f"mongodb://127.0.0.1:{free_port()}/none", dispatcher_threads=0, db_timeout_ms=1000
    )
    started = time.monotonic()
    client = make_app(config).test_client()  # starts even though the database is down
    response = client.get(f"/list?user_id={ObjectId()}")
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert time.monotonic() - started < 6


def test_guarded_maps_outages_to_503_and_lets_bugs_through() -> None:
    @guarded
    def outage() -> None:
        raise AutoReconnect("connection reset")

    @guarded
    def bug() -> None:
        raise OperationFailure("unknown operator: $foo", code=2)

    with pytest.raises(DatabaseUnavailable):
        outage()
    with pytest.raises(OperationFailure):
        bug()
