"""The seed's HTTP API against a real database: shapes, routing by key, cap, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from bson import ObjectId
from flask import Flask
from flask.testing import FlaskClient

from notification_service.config import Config

OTHER_ID = "0399ea67638f394d4b7243fc"


def create(client: FlaskClient, **body: Any) -> Any:
    return client.post("/create", json=body)


def stored(db: Any, user_id: str) -> list[dict[str, Any]]:
    user = db.users.find_one({"_id": ObjectId(user_id)})
    assert user is not None
    return list(user.get("notifications", []))


# --- /create -----------------------------------------------------------------------


def test_create_new_message_stores_the_seed_shape(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    before = int(time.time())
    response = create(client, user_id=user_id, key="new_message", target_id=OTHER_ID, data={"a": 1})
    assert response.status_code == 201
    body = response.get_json()
    assert body["success"] is True
    assert body["data"]["email_id"] is None
    assert body["data"]["collapsed"] is False
    [notification] = stored(db, user_id)
    assert set(notification) == {
        "id", "timestamp", "is_new", "user_id", "key", "target_id", "data", "count",
        "collapse_key",
    }  # fmt: skip
    assert (notification["count"], notification["collapse_key"]) == (1, None)
    assert notification["id"] == body["data"]["notification_id"]
    assert ObjectId.is_valid(notification["id"]) and len(notification["id"]) == 24
    assert before <= notification["timestamp"] <= int(time.time())
    assert notification["is_new"] is True
    assert notification["user_id"] == user_id
    assert notification["key"] == "new_message"
    assert notification["target_id"] == OTHER_ID
    assert notification["data"] == {"a": 1}
    assert db.email_outbox.count_documents({}) == 0


def test_create_defaults_target_and_data(client: FlaskClient, db: Any, user_id: str) -> None:
    assert create(client, user_id=user_id, key="new_post").status_code == 201
    [notification] = stored(db, user_id)
    assert notification["target_id"] is None
    assert notification["data"] == {}


def test_create_registration_queues_email_and_stores_no_record(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    response = create(client, user_id=user_id, key="registration")
    assert response.status_code == 201
    data = response.get_json()["data"]
    assert data["notification_id"] is None
    assert stored(db, user_id) == []
    email = db.email_outbox.find_one({"_id": ObjectId(data["email_id"])})
    assert email["status"] == "queued"
    assert email["to"] == "user@example.com"
    assert "registration" in email["subject"] and "registration" in email["text"]
    # No notification was stored: the email names none (GET /email/<id>, an export).
    assert email["notification_id"] is None
    assert client.get(f"/email/{data['email_id']}").get_json()["data"]["notification_id"] is None


def test_create_new_login_records_and_queues_email(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    response = create(client, user_id=user_id, key="new_login", data={"ip": "10.0.0.1"})
    data = response.get_json()["data"]
    [notification] = stored(db, user_id)
    assert notification["id"] == data["notification_id"]
    email = db.email_outbox.find_one({"_id": ObjectId(data["email_id"])})
    assert email["notification_id"] == notification["id"]
    assert "new_login" in email["subject"]
    assert "10.0.0.1" in email["text"]


@pytest.mark.parametrize("key", ["new_message", "new_post"])
def test_record_only_keys_queue_no_email(
    client: FlaskClient, db: Any, user_id: str, key: str
) -> None:
    assert create(client, user_id=user_id, key=key).status_code == 201
    assert db.email_outbox.count_documents({}) == 0


def test_cap_drops_oldest(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], db: Any, user_id: str
) -> None:
    client = make_app(make_config(notifications_limit=3)).test_client()
    for i in range(5):
        create(client, user_id=user_id, key="new_post", data={"n": i})
    assert [n["data"]["n"] for n in stored(db, user_id)] == [4, 3, 2]


def test_concurrent_creates_lose_nothing_and_cap_holds(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], db: Any, user_id: str
) -> None:
    app = make_app(make_config(notifications_limit=25))
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        client = app.test_client()
        for i in range(8):
            status = create(
                client, user_id=user_id, key="new_post", data={"t": t, "i": i}
            ).status_code
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [201] * 48
    notifications = stored(db, user_id)
    assert len(notifications) == 25
    assert len({n["id"] for n in notifications}) == 25
    # Each thread's own notifications stay in its order (newest first).
    for t in range(6):
        mine = [n["data"]["i"] for n in notifications if n["data"]["t"] == t]
        assert mine == sorted(mine, reverse=True)


def test_concurrent_creates_below_cap_keep_every_notification(
    app: Flask, db: Any, user_id: str
) -> None:
    def worker(t: int) -> None:
        client = app.test_client()
        for i in range(10):
            create(client, user_id=user_id, key="new_message", data={"t": t, "i": i})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = {(n["data"]["t"], n["data"]["i"]) for n in stored(db, user_id)}
    assert got == {(t, i) for t in range(5) for i in range(10)}


# --- collapse keys -----------------------------------------------------------------


def test_a_create_with_a_collapse_key_collapses_into_the_unread_one_and_answers_its_id(
    client: FlaskClient, user_id: str
) -> None:
    first = create(client, user_id=user_id, key="new_message", collapse_key="thread:1",
                   data={"text": "hi"})  # fmt: skip
    assert first.get_json()["data"]["collapsed"] is False
    kept = first.get_json()["data"]["notification_id"]
    create(client, user_id=user_id, key="new_message", data={"text": "other"})
    again = create(client, user_id=user_id, key="new_message", collapse_key="thread:1",
                   target_id=OTHER_ID, data={"text": "hello again"})  # fmt: skip
    assert again.status_code == 201
    assert again.get_json()["data"] == {
        "notification_id": kept, "email_id": None, "collapsed": True, "skipped": [],
        "elements": 2, "new": 2,
    }  # fmt: skip
    top, other = client.get(f"/list?user_id={user_id}").get_json()["data"]["list"]
    assert (top["id"], top["count"], top["collapse_key"]) == (kept, 2, "thread:1")
    assert (top["data"], top["target_id"]) == ({"text": "hello again"}, OTHER_ID)
    assert (other["count"], other["collapse_key"]) == (1, None)


def test_a_list_shows_count_and_collapse_key_of_notifications_stored_before_them(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    old = {"id": str(ObjectId()), "timestamp": 1, "is_new": True, "user_id": user_id,
           "key": "new_post", "target_id": None, "data": {}}  # fmt: skip
    db.users.update_one({"_id": ObjectId(user_id)}, {"$set": {"notifications": [old]}})
    [shown] = client.get(f"/list?user_id={user_id}").get_json()["data"]["list"]
    assert shown == {**old, "count": 1, "collapse_key": None}


@pytest.mark.parametrize(
    "value", ["", "x" * 129, "two words", "tab\tkey", "caf\u00e9", "line\n", 7, ["a"]]
)
def test_a_bad_collapse_key_is_422_and_writes_nothing(
    client: FlaskClient, db: Any, user_id: str, value: Any
) -> None:
    response = create(client, user_id=user_id, key="new_post", collapse_key=value)
    assert response.status_code == 422
    assert response.get_json()["error"]["details"][0]["field"] == "collapse_key"
    assert stored(db, user_id) == []


def test_a_collapse_key_of_128_printable_characters_is_taken(
    client: FlaskClient, user_id: str
) -> None:
    for value in ("$where:{}" + "~" * 119, None):
        assert (
            create(client, user_id=user_id, key="new_post", collapse_key=value).status_code == 201
        )


def test_a_collapsing_new_login_still_queues_its_email(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    answers = [
        create(
            client, user_id=user_id, key="new_login", collapse_key="logins", data={"ip": ip}
        ).get_json()["data"]
        for ip in ("10.0.0.1", "10.0.0.2")
    ]
    assert [a["collapsed"] for a in answers] == [False, True]
    assert answers[1]["notification_id"] == answers[0]["notification_id"]
    [notification] = stored(db, user_id)
    assert (notification["count"], notification["data"]) == (2, {"ip": "10.0.0.2"})
    emails = [db.email_outbox.find_one({"_id": ObjectId(a["email_id"])}) for a in answers]
    assert [e["status"] for e in emails] == ["queued", "queued"]
    assert "10.0.0.2" in emails[1]["text"]


@pytest.mark.parametrize("key", ["new_post", "new_login"])
def test_a_collapsing_create_for_a_missing_user_or_a_field_not_an_array_fails_as_a_plain_one(
    client: FlaskClient, db: Any, make_user: Callable[..., str], key: str
) -> None:
    missing = create(client, user_id=str(ObjectId()), key=key, collapse_key="t")
    assert (missing.status_code, missing.get_json()["error"]["code"]) == (404, "user_not_found")
    odd = make_user(notifications="not an array")
    refused = create(client, user_id=odd, key=key, collapse_key="t")
    assert (refused.status_code, refused.get_json()["error"]["code"]) == (
        409, "user_document_invalid"
    )  # fmt: skip
    assert db.users.find_one({"_id": ObjectId(odd)})["notifications"] == "not an array"
    assert db.email_outbox.count_documents({}) == 0


def test_sixteen_threads_collapsing_into_one_user_end_with_one_notification_counting_each(
    app: Flask, db: Any, user_id: str
) -> None:
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        client = app.test_client()
        for i in range(4):
            response = create(client, user_id=user_id, key="new_post", collapse_key="busy",
                              data={"t": t, "i": i})  # fmt: skip
            assert response.status_code == 201
            with lock:
                answers.append(response.get_json()["data"])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [notification] = stored(db, user_id)
    assert notification["count"] == len(answers) == 64
    assert {a["notification_id"] for a in answers} == {notification["id"]}
    assert sorted(a["collapsed"] for a in answers) == [False] + [True] * 63
    assert {(a["elements"], a["new"]) for a in answers} == {(1, 1)}


def test_unknown_user_is_404_and_creates_nothing(client: FlaskClient, db: Any) -> None:
    missing = str(ObjectId())
    for key in ("new_message", "registration", "new_login"):
        response = create(client, user_id=missing, key=key)
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "user_not_found"
    assert db.users.count_documents({}) == 0
    assert db.email_outbox.count_documents({}) == 0


def test_email_mode_creates_the_profile(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], db: Any
) -> None:
    client = make_app(make_config(email="test@example.com")).test_client()
    new_user = str(ObjectId())
    assert create(client, user_id=new_user, key="new_login").status_code == 201
    user = db.users.find_one({"_id": ObjectId(new_user)})
    assert user["email"] == "test@example.com"
    assert len(user["notifications"]) == 1
    assert db.email_outbox.find_one({})["to"] == "test@example.com"
    other = str(ObjectId())
    assert create(client, user_id=other, key="registration").status_code == 201
    assert db.users.find_one({"_id": ObjectId(other)}) == {
        "_id": ObjectId(other),
        "email": "test@example.com",
        "notifications": [],
    }


def test_email_mode_concurrent_first_creates_make_one_profile(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], db: Any
) -> None:
    app = make_app(make_config(email="test@example.com"))
    new_user = str(ObjectId())
    statuses: list[int] = []

    def worker() -> None:
        statuses.append(create(app.test_client(), user_id=new_user, key="new_message").status_code)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [201] * 6
    assert db.users.count_documents({}) == 1
    assert len(stored(db, new_user)) == 6


def test_email_key_for_user_without_email_is_422_and_writes_nothing(
    client: FlaskClient, db: Any, make_user: Callable[..., str]
) -> None:
    user_id = make_user(email=None)
    for key in ("new_login", "registration"):
        response = create(client, user_id=user_id, key=key)
        assert response.status_code == 422
        assert response.get_json()["error"]["code"] == "user_has_no_email"
    assert stored(db, user_id) == []
    assert db.email_outbox.count_documents({}) == 0
    assert create(client, user_id=user_id, key="new_message").status_code == 201


@pytest.mark.parametrize("value", [None, "x", {"a": 1}])
def test_a_user_document_without_an_array_is_409_on_create_and_empty_on_list(
    client: FlaskClient, db: Any, make_user: Callable[..., str], value: Any
) -> None:
    user_id = make_user(notifications=value)
    response = create(client, user_id=user_id, key="new_login")
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "user_document_invalid"
    assert db.users.find_one({"_id": ObjectId(user_id)})["notifications"] == value
    assert db.email_outbox.count_documents({}) == 0
    listed = client.get(f"/list?user_id={user_id}")
    assert listed.status_code == 200
    assert listed.get_json()["data"]["elements"] == 0


def test_user_id_is_normalised_to_lowercase(client: FlaskClient, db: Any, user_id: str) -> None:
    assert create(client, user_id=user_id.upper(), key="new_post").status_code == 201
    assert stored(db, user_id)[0]["user_id"] == user_id


# --- bad input: a clear JSON error and nothing changed --------------------------------

VALID = {"key": "new_message"}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_BODIES: list[tuple[str, Any, int, str, str]] = [
    ("user_id operator", {"user_id": {"$ne": None}, **VALID}, 422, "validation_failed", "user_id"),
    ("user_id number", {"user_id": 12345, **VALID}, 422, "validation_failed", "user_id"),
    ("user_id short", {"user_id": "abc", **VALID}, 422, "validation_failed", "user_id"),
    (
        "user_id newline",
        {"user_id": "638f394d4b7243fc0399ea67\n", **VALID},
        422,
        "validation_failed",
        "user_id",
    ),
    ("user_id missing", {**VALID}, 422, "validation_failed", "user_id"),
    ("key unknown", {"key": "new_comment"}, 422, "validation_failed", "key"),
    ("key missing", {}, 422, "validation_failed", "key"),
    ("key list", {"key": ["new_post"]}, 422, "validation_failed", "key"),
    ("target_id bad", {**VALID, "target_id": "zz"}, 422, "validation_failed", "target_id"),
    (
        "target_id operator",
        {**VALID, "target_id": {"$gt": ""}},
        422,
        "validation_failed",
        "target_id",
    ),
    ("data list", {**VALID, "data": [1, 2]}, 422, "validation_failed", "data"),
    ("data string", {**VALID, "data": "x"}, 422, "validation_failed", "data"),
    ("data dollar key", {**VALID, "data": {"$set": 1}}, 422, "validation_failed", "data"),
    (
        "data nested dollar",
        {**VALID, "data": {"a": [{"$where": "1"}]}},
        422,
        "validation_failed",
        "data",
    ),
    ("data dotted key", {**VALID, "data": {"a.b": 1}}, 422, "validation_failed", "data"),
    ("data too large", {**VALID, "data": {"x": "y" * 17000}}, 422, "validation_failed", "data"),
    ("data huge int", {**VALID, "data": {"x": 2**70}}, 422, "validation_failed", "data"),
    ("data lone surrogate", {**VALID, "data": {"x": "\ud800"}}, 422, "validation_failed", "data"),
    ("data too deep", {**VALID, "data": {"a": _nested(40)}}, 422, "validation_failed", "data"),
    ("unknown field", {**VALID, "priority": 1}, 422, "validation_failed", "priority"),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "code", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
def test_bad_create_body_is_rejected_and_changes_nothing(
    client: FlaskClient,
    db: Any,
    user_id: str,
    name: str,
    body: dict[str, Any],
    status: int,
    code: str,
    field: str,
) -> None:
    if "user_id" not in body and name != "user_id missing":
        body = {"user_id": user_id, **body}
    response = client.post("/create", json=body)
    assert response.status_code == status, response.get_json()
    assert response.is_json
    error = response.get_json()["error"]
    assert response.get_json()["success"] is False
    assert error["code"] == code
    assert error["message"]
    assert any(d["field"].split(".")[0] == field for d in error["details"]), error
    assert stored(db, user_id) == []
    assert db.email_outbox.count_documents({}) == 0


RAW_BODIES: list[tuple[str, bytes, str, int, str]] = [
    ("not json", b"{user_id:", "application/json", 400, "invalid_json"),
    ("empty", b"", "application/json", 400, "invalid_json"),
    ("array", b"[1,2]", "application/json", 400, "invalid_json"),
    ("string", b'"x"', "application/json", 400, "invalid_json"),
    ("NaN", b'{"key": NaN}', "application/json", 400, "invalid_json"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "invalid_json"),
    ("bad utf-8", b'{"key": "\xff\xfe"}', "application/json", 400, "invalid_json"),
    (
        "form",
        b"user_id=1&key=new_post",
        "application/x-www-form-urlencoded",
        400,
        "unsupported_content_type",
    ),
    ("text", b'{"key": "new_post"}', "text/plain", 400, "unsupported_content_type"),
    # The last of two equal keys would win here, the first in many proxies and validators.
    (
        "duplicate key",
        b'{"user_id": "638f394d4b7243fc0399ea67", "key": "new_post", "key": "new_login"}',
        "application/json",
        400,
        "invalid_json",
    ),
    (
        "nested duplicate key",
        b'{"user_id": "638f394d4b7243fc0399ea67", "key": "new_post", "data": {"a": 1, "a": 2}}',
        "application/json",
        400,
        "invalid_json",
    ),
]


@pytest.mark.parametrize(
    ("name", "raw", "ctype", "status", "code"), RAW_BODIES, ids=[b[0] for b in RAW_BODIES]
)
def test_malformed_create_body_is_400_json(
    client: FlaskClient, db: Any, name: str, raw: bytes, ctype: str, status: int, code: str
) -> None:
    response = client.post("/create", data=raw, headers={"Content-Type": ctype})
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert db.users.count_documents({}) == 0


def test_oversized_body_is_413_json(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], db: Any, user_id: str
) -> None:
    client = make_app(make_config(max_body_bytes=4096)).test_client()
    response = client.post(
        "/create", json={"user_id": user_id, "key": "new_post", "data": {"x": "y" * 5000}}
    )
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"
    assert stored(db, user_id) == []


# --- /list ---------------------------------------------------------------------------


def test_list_answers_the_seed_shape(client: FlaskClient, db: Any, user_id: str) -> None:
    for i in range(23):
        create(client, user_id=user_id, key="new_message", target_id=OTHER_ID, data={"i": i})
    ids = [n["id"] for n in stored(db, user_id)]
    for nid in ids[12:]:  # 11 oldest read, 12 stay new
        client.post(f"/read?user_id={user_id}&notification_id={nid}")
    response = client.get(f"/list?user_id={user_id}")
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["success", "data"]
    assert body["success"] is True
    data = body["data"]
    # The seed's fields in the seed's order; `matched` (the filtered count) is added.
    assert list(data) == ["elements", "new", "request", "list", "matched"]
    assert data["matched"] == 23
    assert data["elements"] == 23
    assert data["new"] == 12
    assert data["request"] == {"user_id": user_id, "skip": 0, "limit": 10}
    assert [n["id"] for n in data["list"]] == ids[:10]
    assert data["list"][0]["data"] == {"i": 22}
    assert list(data["list"][0]) == [
        "id",
        "timestamp",
        "is_new",
        "user_id",
        "key",
        "target_id",
        "data",
        "count",
        "collapse_key",
    ]


def test_list_pages_with_skip_and_limit(client: FlaskClient, db: Any, user_id: str) -> None:
    for i in range(7):
        create(client, user_id=user_id, key="new_post", data={"i": i})
    page = client.get(f"/list?user_id={user_id}&skip=2&limit=3").get_json()["data"]
    assert [n["data"]["i"] for n in page["list"]] == [4, 3, 2]
    assert page["request"] == {"user_id": user_id, "skip": 2, "limit": 3}
    beyond = client.get(f"/list?user_id={user_id}&skip=50").get_json()["data"]
    assert beyond["list"] == [] and beyond["elements"] == 7
    huge = client.get(f"/list?user_id={user_id}&skip={2**40}")
    assert huge.status_code == 200
    assert huge.get_json()["data"]["request"]["skip"] == 2**40
    assert huge.get_json()["data"]["list"] == []


def test_list_limit_zero_gives_counts_only(client: FlaskClient, user_id: str) -> None:
    create(client, user_id=user_id, key="new_post")
    data = client.get(f"/list?user_id={user_id}&limit=0").get_json()["data"]
    assert (data["elements"], data["new"], data["list"]) == (1, 1, [])


def test_list_of_user_with_no_array_is_empty(client: FlaskClient, user_id: str) -> None:
    data = client.get(f"/list?user_id={user_id}").get_json()["data"]
    assert (data["elements"], data["new"], data["list"]) == (0, 0, [])


def test_list_unknown_user_is_404(client: FlaskClient) -> None:
    response = client.get(f"/list?user_id={ObjectId()}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "user_not_found"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("skip=-1", "skip"),
        ("skip=abc", "skip"),
        ("limit=-1", "limit"),
        ("limit=101", "limit"),
        ("limit=1e3", "limit"),
        ("limit=", "limit"),
        ("limt=5", "limt"),
        ("limit=1&limit=2", "limit"),
    ],
)
def test_bad_list_query_is_422(client: FlaskClient, user_id: str, query: str, field: str) -> None:
    response = client.get(f"/list?user_id={user_id}&{query}")
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_failed"
    assert [d["field"] for d in error["details"]] == [field]


@pytest.mark.parametrize("query", ["", "user_id=nothex", "user_id[$ne]=1"])
def test_list_without_valid_user_id_is_422(client: FlaskClient, query: str) -> None:
    response = client.get(f"/list?{query}")
    assert response.status_code == 422


def test_list_max_limit_is_configurable(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], user_id: str
) -> None:
    client = make_app(make_config(list_max_limit=5)).test_client()
    assert client.get(f"/list?user_id={user_id}&limit=5").status_code == 200
    assert client.get(f"/list?user_id={user_id}&limit=6").status_code == 422


# --- /read ---------------------------------------------------------------------------


def test_read_marks_one_notification_and_is_idempotent(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    first = create(client, user_id=user_id, key="new_post").get_json()["data"]["notification_id"]
    create(client, user_id=user_id, key="new_post")
    for _ in range(2):
        response = client.post(f"/read?user_id={user_id}&notification_id={first}")
        assert response.status_code == 200
        # The seed answered {"success": true}; the user's counts are added.
        assert response.get_json() == {"success": True, "data": {"elements": 2, "new": 1}}
    flags = {n["id"]: n["is_new"] for n in stored(db, user_id)}
    assert flags[first] is False
    assert sorted(flags.values()) == [False, True]


def test_read_with_query_and_an_empty_json_body_works(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    nid = create(client, user_id=user_id, key="new_post").get_json()["data"]["notification_id"]
    response = client.post(
        f"/read?user_id={user_id}&notification_id={nid}",
        data=b"",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert stored(db, user_id)[0]["is_new"] is False


def test_read_accepts_the_same_id_in_query_and_body_in_any_case(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    nid = create(client, user_id=user_id, key="new_post").get_json()["data"]["notification_id"]
    body = {"user_id": user_id.upper(), "notification_id": nid}
    response = client.post(f"/read?user_id={user_id}", json=body)
    assert response.status_code == 200
    assert stored(db, user_id)[0]["is_new"] is False


def test_read_accepts_a_json_body(client: FlaskClient, db: Any, user_id: str) -> None:
    nid = create(client, user_id=user_id, key="new_post").get_json()["data"]["notification_id"]
    response = client.post("/read", json={"user_id": user_id, "notification_id": nid})
    assert response.status_code == 200
    assert stored(db, user_id)[0]["is_new"] is False


def test_read_unknown_notification_or_user_is_404(client: FlaskClient, user_id: str) -> None:
    response = client.post(f"/read?user_id={user_id}&notification_id={ObjectId()}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "notification_not_found"
    response = client.post(f"/read?user_id={ObjectId()}&notification_id={ObjectId()}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "user_not_found"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"query_string": "user_id=x&notification_id=y"},
        {"query_string": f"user_id={OTHER_ID}"},
        {"json": {"user_id": OTHER_ID, "notification_id": {"$ne": None}}},
        {"json": {"user_id": OTHER_ID, "notification_id": OTHER_ID, "extra": 1}},
        {
            "query_string": f"user_id={OTHER_ID}&notification_id={OTHER_ID}",
            "json": {"user_id": "638f394d4b7243fc0399ea67"},
        },
    ],
)
def test_bad_read_is_422(client: FlaskClient, kwargs: dict[str, Any]) -> None:
    response = client.post("/read", **kwargs)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_failed"


# --- routes, methods, failures -------------------------------------------------------


def test_unknown_route_is_404_json(client: FlaskClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"), [("get", "/create"), ("post", "/list"), ("delete", "/read")]
)
def test_wrong_method_is_405_json(client: FlaskClient, method: str, path: str) -> None:
    response = getattr(client, method)(path)
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert response.headers["Allow"]


def test_bug_is_500_with_request_id_and_no_trace(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_url_rule("/boom", view_func=boom)
    response = app.test_client().get("/boom", headers={"X-Request-ID": "req-123"})
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert error["code"] == "internal_error"
    assert error["request_id"] == "req-123"
    assert "secret" not in response.get_data(as_text=True)
    assert any("req-123" in r.getMessage() for r in caplog.records)


def test_every_response_carries_a_request_id(client: FlaskClient, user_id: str) -> None:
    response = client.get(f"/list?user_id={user_id}")
    assert len(response.headers["X-Request-ID"]) == 32


# --- /email and /email/<id> ------------------------------------------------------------


def test_email_to_an_address_is_queued_and_its_state_shown(client: FlaskClient, db: Any) -> None:
    body = {
        "to": "someone@example.com",
        "subject": "Hello",
        "text": "Any text.",
        "html": "<p>x</p>",
    }
    response = client.post("/email", json=body)
    assert response.status_code == 202
    email_id = response.get_json()["data"]["email_id"]
    record = db.email_outbox.find_one({"_id": ObjectId(email_id)})
    assert (record["to"], record["subject"], record["text"], record["html"]) == (
        "someone@example.com",
        "Hello",
        "Any text.",
        "<p>x</p>",
    )
    state = client.get(f"/email/{email_id}").get_json()["data"]
    assert state["id"] == email_id
    assert state["status"] == "queued"
    assert state["kind"] == "custom"
    assert state["attempts"] == 0
    assert state["created_at"].endswith("Z")
    assert state["message_id"] == record["message_id"]


def test_email_to_a_user_uses_their_address(
    client: FlaskClient, db: Any, make_user: Callable[..., str]
) -> None:
    user_id = make_user(email="reader@example.com")
    body = {"user_id": user_id, "subject": "Hi", "text": "t"}
    email_id = client.post("/email", json=body).get_json()["data"]["email_id"]
    assert db.email_outbox.find_one({"_id": ObjectId(email_id)})["to"] == "reader@example.com"
    missing = client.post("/email", json={**body, "user_id": str(ObjectId())})
    assert missing.status_code == 404
    no_email = client.post("/email", json={**body, "user_id": make_user(email=None)})
    assert no_email.get_json()["error"]["code"] == "user_has_no_email"


@pytest.mark.parametrize(
    "body",
    [
        {"subject": "s", "text": "t"},
        {"to": "a@example.com", "user_id": OTHER_ID, "subject": "s", "text": "t"},
        {"to": "not an address", "subject": "s", "text": "t"},
        {"to": "a@example.com\r\nBcc: victim@example.com", "subject": "s", "text": "t"},
        {"to": "a@example.com", "subject": "s\r\nBcc: victim@example.com", "text": "t"},
        {"to": "a@example.com", "subject": "", "text": "t"},
        {"to": "a@example.com", "subject": "s", "text": ""},
        {"to": "a@example.com", "subject": "s" * 999, "text": "t"},
        {"to": "a@example.com", "subject": "s", "text": "t", "html": "x" * (512 * 1024 + 1)},
        {"to": "a@example.com", "subject": "s", "text": "t", "cc": "b@example.com"},
        {"to": ["a@example.com"], "subject": "s", "text": "t"},
        {"to": "\ud800@example.com", "subject": "s", "text": "t"},
        {"to": "a@example.com", "subject": "s\u2028Bcc: x@example.com", "text": "t"},
        {"to": "a@example.com", "subject": "s\x85x", "text": "t"},
        # An encoded word in an address: a reader could decode it into other headers.
        {"to": "=?utf-8?q?a=0D=0ABcc:_v@evil.example?=@example.com", "subject": "s", "text": "t"},
        {"to": "a=?utf-8?b?DQpCY2M6IHY=?=@example.com", "subject": "s", "text": "t"},
        # Control characters, and a local part the sender cannot send (no SMTPUTF8):
        # queued, it could only fail later.
        {"to": "a\x01b@example.com", "subject": "s", "text": "t"},
        {"to": "a\x7fb@example.com", "subject": "s", "text": "t"},
        {"to": "a\x1db@example.com", "subject": "s", "text": "t"},
        {"to": "a\ufeffb@example.com", "subject": "s", "text": "t"},
        {"to": "jörg@example.com", "subject": "s", "text": "t"},
        # A dot first or last in either part: the dispatcher's parser refuses it.
        {"to": "a@.example.com", "subject": "s", "text": "t"},
        {"to": "a@example.com.", "subject": "s", "text": "t"},
        {"to": ".a@example.com", "subject": "s", "text": "t"},
    ],
)
def test_bad_email_request_is_422_and_queues_nothing(
    client: FlaskClient, db: Any, body: dict[str, Any]
) -> None:
    response = client.post("/email", json=body)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_failed"
    assert db.email_outbox.count_documents({}) == 0


def test_email_state_of_a_bad_or_unknown_id(client: FlaskClient) -> None:
    assert client.get("/email/nope").status_code == 422
    response = client.get(f"/email/{ObjectId()}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "email_not_found"
