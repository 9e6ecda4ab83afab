"""The inbox API beyond the seed: counts kept in the document, /count with ETag,
read-all with a watermark, delete, list filters, fan-out, retention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from flask import Flask
from flask.testing import FlaskClient

from notification_service.config import Config
from notification_service.server import runtime_of

MISSING = "0123456789abcdef01234567"


def create(client: FlaskClient, user_id: str, key: str = "new_post", **extra: Any) -> str:
    response = client.post("/create", json={"user_id": user_id, "key": key, **extra})
    assert response.status_code == 201, response.get_json()
    notification_id: str = response.get_json()["data"]["notification_id"]
    return notification_id


def counts(client: FlaskClient, user_id: str) -> tuple[int, int]:
    data = client.get(f"/count?user_id={user_id}").get_json()["data"]
    return data["elements"], data["new"]


def listed(client: FlaskClient, user_id: str, query: str = "") -> dict[str, Any]:
    response = client.get(f"/list?user_id={user_id}&limit=100{query}")
    assert response.status_code == 200, response.get_json()
    data: dict[str, Any] = response.get_json()["data"]
    return data


def stored_meta(db: Any, user_id: str) -> dict[str, Any]:
    user = db.users.find_one({"_id": ObjectId(user_id)})
    return dict(user["notifications_meta"])


class Clock:
    """The one thing a test may fake: the service's clock."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(app: Flask) -> Clock:
    fake = Clock()
    runtime = runtime_of(app)
    runtime.services = replace(runtime.services, clock=fake)
    return fake


# --- counts -----------------------------------------------------


def test_count_answers_the_totals_with_an_etag(client: FlaskClient, user_id: str) -> None:
    first = create(client, user_id)
    create(client, user_id)
    client.post(f"/read?user_id={user_id}&notification_id={first}")
    response = client.get(f"/count?user_id={user_id}")
    assert response.status_code == 200
    assert response.get_json() == {"success": True, "data": {"elements": 2, "new": 1}}
    assert response.headers["ETag"]
    assert response.headers["Cache-Control"] == "no-cache"


def test_count_with_the_current_etag_is_304_without_a_body(
    client: FlaskClient, user_id: str
) -> None:
    create(client, user_id)
    tag = client.get(f"/count?user_id={user_id}").headers["ETag"]
    again = client.get(f"/count?user_id={user_id}", headers={"If-None-Match": tag})
    assert again.status_code == 304
    assert again.data == b""
    assert again.headers["ETag"] == tag
    assert (
        client.get(f"/count?user_id={user_id}", headers={"If-None-Match": "*"}).status_code == 304
    )


def test_etag_changes_exactly_when_the_counts_change(client: FlaskClient, user_id: str) -> None:
    first = create(client, user_id)
    tag = client.get(f"/count?user_id={user_id}").headers["ETag"]
    client.post(f"/read?user_id={user_id}&notification_id={first}")
    after_read = client.get(f"/count?user_id={user_id}", headers={"If-None-Match": tag})
    assert after_read.status_code == 200
    assert after_read.headers["ETag"] != tag
    # Reading it again changes nothing, so the tag holds.
    client.post(f"/read?user_id={user_id}&notification_id={first}")
    held = client.get(
        f"/count?user_id={user_id}", headers={"If-None-Match": after_read.headers["ETag"]}
    )
    assert held.status_code == 304


def test_count_of_an_unknown_user_is_404(client: FlaskClient) -> None:
    response = client.get(f"/count?user_id={MISSING}")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "user_not_found"


def test_count_refuses_bad_input(client: FlaskClient, user_id: str) -> None:
    for query in (
        "",
        "user_id=nope",
        f"user_id={user_id}&user_id={user_id}",
        f"user_id={user_id}&x=1",
    ):
        response = client.get(f"/count?{query}")
        assert response.status_code == 422, query


def test_counts_stay_exact_while_the_cap_drops_new_and_read_ones(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], user_id: str, db: Any
) -> None:
    client = make_app(make_config(notifications_limit=3)).test_client()
    ids = [create(client, user_id) for _ in range(3)]
    client.post(f"/read?user_id={user_id}&notification_id={ids[1]}")
    assert counts(client, user_id) == (3, 2)
    create(client, user_id)  # drops ids[0], which is new
    assert counts(client, user_id) == (3, 2)
    create(client, user_id)  # drops ids[1], which is read
    assert counts(client, user_id) == (3, 3)
    stored = db.users.find_one({"_id": ObjectId(user_id)})["notifications"]
    assert counts(client, user_id) == (len(stored), sum(n["is_new"] for n in stored))


def test_every_write_answers_the_fresh_counts(client: FlaskClient, user_id: str) -> None:
    response = client.post("/create", json={"user_id": user_id, "key": "new_post"})
    assert response.get_json()["data"] | {"notification_id": None} == {
        "notification_id": None,
        "email_id": None,
        "collapsed": False,
        "skipped": [],
        "elements": 1,
        "new": 1,
    }
    nid = response.get_json()["data"]["notification_id"]
    read = client.post(f"/read?user_id={user_id}&notification_id={nid}").get_json()
    assert read["data"] == {"elements": 1, "new": 0}


def test_a_document_of_an_earlier_release_is_counted_from_its_array(
    client: FlaskClient, db: Any, make_user: Callable[..., str]
) -> None:
    # Earlier releases stored counts beside the array: they are never trusted.
    old = [
        {"id": str(ObjectId()), "timestamp": 1, "is_new": flag, "user_id": "x", "key": "new_post",
         "target_id": None, "data": {}}
        for flag in (True, False, True)
    ]  # fmt: skip
    stale = {"elements": 9, "new": 9, "version": 5, "log": []}
    user_id = make_user(notifications=old, notifications_counts=stale)
    assert counts(client, user_id) == (3, 2)
    assert listed(client, user_id)["elements"] == 3
    create(client, user_id)
    assert counts(client, user_id) == (4, 3)
    assert db.users.find_one({"_id": ObjectId(user_id)})["notifications_meta"] == {"version": 1}


def test_counts_follow_an_array_the_application_rewrote(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    for _ in range(3):
        create(client, user_id)
    db.users.update_one({"_id": ObjectId(user_id)}, {"$set": {"notifications": []}})
    assert counts(client, user_id) == (0, 0)
    create(client, user_id)
    assert counts(client, user_id) == (1, 1)


def test_data_that_looks_like_an_expression_is_stored_as_given(
    client: FlaskClient, user_id: str
) -> None:
    # The record is written by an update pipeline, where "$email" would mean a field.
    data = {"a": "$email", "b": {"$literal": 1}.keys().__iter__().__next__(), "c": "$$ROOT"}
    create(client, user_id, data=data)
    assert listed(client, user_id)["list"][0]["data"] == data


def test_a_field_that_is_not_an_array_is_409_and_unchanged(
    client: FlaskClient, db: Any, make_user: Callable[..., str]
) -> None:
    user_id = make_user(notifications="oops")
    response = client.post("/create", json={"user_id": user_id, "key": "new_post"})
    assert response.status_code == 409
    assert response.get_json()["error"]["code"] == "user_document_invalid"
    assert db.users.find_one({"_id": ObjectId(user_id)})["notifications"] == "oops"


# --- read-all --------------------------------------------------------------------------


def test_read_all_marks_everything_and_says_how_many(client: FlaskClient, user_id: str) -> None:
    for _ in range(4):
        create(client, user_id)
    response = client.post(f"/read-all?user_id={user_id}")
    assert response.status_code == 200
    assert response.get_json()["data"] == {"changed": 4, "elements": 4, "new": 0}
    again = client.post("/read-all", json={"user_id": user_id})
    assert again.get_json()["data"] == {"changed": 0, "elements": 4, "new": 0}


def test_read_all_up_to_a_watermark_leaves_newer_ones_unread(
    client: FlaskClient, user_id: str
) -> None:
    ids = [create(client, user_id) for _ in range(5)]  # ids[4] is the newest
    response = client.post("/read-all", json={"user_id": user_id, "up_to": ids[2]})
    assert response.get_json()["data"] == {"changed": 3, "elements": 5, "new": 2}
    flags = {n["id"]: n["is_new"] for n in listed(client, user_id)["list"]}
    assert [flags[i] for i in ids] == [False, False, False, True, True]


def test_read_all_404s(client: FlaskClient, user_id: str) -> None:
    create(client, user_id)
    unknown_user = client.post(f"/read-all?user_id={MISSING}")
    assert unknown_user.status_code == 404
    assert unknown_user.get_json()["error"]["code"] == "user_not_found"
    unknown_mark = client.post(f"/read-all?user_id={user_id}&up_to={MISSING}")
    assert unknown_mark.status_code == 404
    assert unknown_mark.get_json()["error"]["code"] == "notification_not_found"
    assert counts(client, user_id) == (1, 1)


def test_read_all_refuses_bad_input_and_changes_nothing(client: FlaskClient, user_id: str) -> None:
    create(client, user_id)
    for query in ("", "user_id=x", f"user_id={user_id}&up_to=x", f"user_id={user_id}&all=1"):
        assert client.post(f"/read-all?{query}").status_code == 422, query
    assert client.post("/read-all", json={"user_id": {"$ne": None}}).status_code == 422
    assert counts(client, user_id) == (1, 1)


# --- delete --------------------------------------------------------------------------------


def test_delete_removes_one_and_is_idempotent(client: FlaskClient, user_id: str) -> None:
    keep, gone = create(client, user_id), create(client, user_id)
    first = client.post("/delete", json={"user_id": user_id, "notification_id": gone})
    assert first.get_json()["data"] == {"deleted": 1, "elements": 1, "new": 1}
    second = client.post(f"/delete?user_id={user_id}&notification_id={gone}")
    assert second.status_code == 200
    assert second.get_json()["data"] == {"deleted": 0, "elements": 1, "new": 1}
    assert [n["id"] for n in listed(client, user_id)["list"]] == [keep]


def test_delete_of_an_unknown_user_is_404(client: FlaskClient) -> None:
    response = client.post(f"/delete?user_id={MISSING}&notification_id={MISSING}")
    assert response.status_code == 404


def test_delete_all_read_keeps_the_unread(client: FlaskClient, user_id: str) -> None:
    ids = [create(client, user_id) for _ in range(4)]
    for nid in ids[:3]:
        client.post(f"/read?user_id={user_id}&notification_id={nid}")
    response = client.post(f"/delete-all?user_id={user_id}&read=true")
    assert response.get_json()["data"] == {"deleted": 3, "elements": 1, "new": 1}
    assert [n["id"] for n in listed(client, user_id)["list"]] == [ids[3]]
    everything = client.post("/delete-all", json={"user_id": user_id})
    assert everything.get_json()["data"] == {"deleted": 1, "elements": 0, "new": 0}
    nothing = client.post("/delete-all", json={"user_id": user_id, "read": False})
    assert nothing.get_json()["data"] == {"deleted": 0, "elements": 0, "new": 0}


def test_delete_all_refuses_a_read_flag_that_is_not_a_boolean(
    client: FlaskClient, user_id: str
) -> None:
    create(client, user_id)
    for query in ("read=yes", "read=1", "read=True", "read="):
        assert client.post(f"/delete-all?user_id={user_id}&{query}").status_code == 422, query
    assert counts(client, user_id) == (1, 1)


# --- list filters ------------------------------------------------------------------------


def test_list_filters_keep_the_totals_and_count_the_matches(
    client: FlaskClient, user_id: str
) -> None:
    posts = [create(client, user_id, "new_post") for _ in range(3)]
    messages = [create(client, user_id, "new_message") for _ in range(2)]
    client.post(f"/read?user_id={user_id}&notification_id={posts[0]}")
    unread = listed(client, user_id, "&is_new=true")
    assert (unread["elements"], unread["new"], unread["matched"]) == (5, 4, 4)
    assert all(n["is_new"] for n in unread["list"])
    assert unread["request"]["is_new"] is True
    read_posts = listed(client, user_id, "&is_new=false&key=new_post")
    assert [n["id"] for n in read_posts["list"]] == [posts[0]]
    assert read_posts["matched"] == 1
    page = client.get(f"/list?user_id={user_id}&key=new_message&skip=1&limit=1").get_json()["data"]
    assert page["matched"] == 2
    assert [n["id"] for n in page["list"]] == [messages[0]]


def test_list_refuses_unknown_filter_values(client: FlaskClient, user_id: str) -> None:
    for query in ("is_new=1", "is_new=yes", "key=nope", "key=new_post&key=new_post"):
        assert client.get(f"/list?user_id={user_id}&{query}").status_code == 422, query


# --- fan-out ---------------------------------------------------------------------------


def test_fan_out_records_for_each_user_and_reports_the_others(
    client: FlaskClient, db: Any, make_user: Callable[..., str]
) -> None:
    users = [make_user() for _ in range(3)]
    broken = make_user(notifications={"not": "an array"})
    response = client.post(
        "/create", json={"user_ids": [*users, MISSING, broken], "key": "new_post", "data": {"p": 1}}
    )
    assert response.status_code == 201
    data = response.get_json()["data"]
    assert data["totals"] == {
        "created": 3, "skipped": 0, "user_not_found": 1, "user_has_no_email": 0,
        "user_document_invalid": 1,
    }  # fmt: skip
    assert [r["status"] for r in data["results"]] == [
        "created", "created", "created", "user_not_found", "user_document_invalid"
    ]  # fmt: skip
    for user_id, result in zip(users, data["results"], strict=False):
        assert result["user_id"] == user_id
        assert listed(client, user_id)["list"][0]["id"] == result["notification_id"]
        assert counts(client, user_id) == (1, 1)
    assert len({r["notification_id"] for r in data["results"][:3]}) == 3


def test_fan_out_of_new_login_emails_those_with_an_address(
    client: FlaskClient, db: Any, make_user: Callable[..., str]
) -> None:
    with_email, without = make_user(), make_user(email=None)
    response = client.post("/create", json={"user_ids": [with_email, without], "key": "new_login"})
    data = response.get_json()["data"]
    assert [r["status"] for r in data["results"]] == ["created", "user_has_no_email"]
    email_id = data["results"][0]["email_id"]
    record = db.email_outbox.find_one({"_id": ObjectId(email_id)})
    assert record["status"] == "queued"
    assert record["notification_id"] == data["results"][0]["notification_id"]
    assert db.email_outbox.count_documents({}) == 1
    assert db.users.find_one({"_id": ObjectId(without)}).get("notifications") is None


def test_fan_out_with_a_collapse_key_collapses_per_user(
    client: FlaskClient, make_user: Callable[..., str]
) -> None:
    users = [make_user() for _ in range(3)]
    kept = create(client, users[0], collapse_key="daily")
    read = create(client, users[1], collapse_key="daily")
    client.post(f"/read?user_id={users[1]}&notification_id={read}")
    response = client.post(
        "/create",
        json={"user_ids": [*users, MISSING], "key": "new_post", "collapse_key": "daily"},
    )
    assert response.status_code == 201
    results = response.get_json()["data"]["results"]
    assert [(r["status"], r.get("collapsed")) for r in results] == [
        ("created", True), ("created", False), ("created", False), ("user_not_found", None)
    ]  # fmt: skip
    assert results[0]["notification_id"] == kept
    for user_id, result, shape in zip(users, results, [(1, 1), (2, 1), (1, 1)], strict=False):
        assert listed(client, user_id)["list"][0]["id"] == result["notification_id"]
        assert counts(client, user_id) == shape
    assert listed(client, users[0])["list"][0]["count"] == 2


def test_fan_out_of_new_login_with_a_collapse_key_reports_a_broken_document(
    client: FlaskClient, db: Any, make_user: Callable[..., str]
) -> None:
    # A key that emails: records and emails in one transaction, which a user whose
    # field is not an array must not take down for the others.
    user, broken = make_user(), make_user(notifications="not an array")
    body = {"user_ids": [user, broken], "key": "new_login", "collapse_key": "logins"}
    first = client.post("/create", json=body).get_json()["data"]
    assert [r["status"] for r in first["results"]] == ["created", "user_document_invalid"]
    second = client.post("/create", json=body).get_json()["data"]
    assert second["results"][0]["collapsed"] is True
    assert second["results"][0]["notification_id"] == first["results"][0]["notification_id"]
    assert db.email_outbox.count_documents({"user_id": user}) == 2
    assert db.email_outbox.count_documents({"user_id": broken}) == 0
    assert db.users.find_one({"_id": ObjectId(broken)})["notifications"] == "not an array"


def test_fan_out_where_no_one_is_found_is_200(client: FlaskClient) -> None:
    response = client.post("/create", json={"user_ids": [MISSING], "key": "new_post"})
    assert response.status_code == 200
    assert response.get_json()["data"]["totals"]["created"] == 0


def test_fan_out_refuses_bad_lists(client: FlaskClient, user_id: str) -> None:
    too_many = [str(ObjectId()) for _ in range(1001)]
    for body in (
        {"user_ids": [], "key": "new_post"},
        {"user_ids": too_many, "key": "new_post"},
        {"user_ids": [user_id, user_id.upper()], "key": "new_post"},
        {"user_ids": [user_id], "user_id": user_id, "key": "new_post"},
        {"user_ids": ["nope"], "key": "new_post"},
        {"user_ids": user_id, "key": "new_post"},
    ):
        assert client.post("/create", json=body).status_code == 422, body
    assert counts(client, user_id) == (0, 0)


# --- retention -------------------------------------------------------------------------


def test_expired_notifications_are_neither_listed_nor_counted(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], user_id: str, db: Any
) -> None:
    app = make_app(make_config(notifications_ttl_days=7))
    clock = Clock()
    runtime = runtime_of(app)
    runtime.services = replace(runtime.services, clock=clock)
    client = app.test_client()
    old = create(client, user_id)
    clock.now += timedelta(days=5)
    recent = create(client, user_id)
    clock.now += timedelta(days=3)  # `old` is 8 days old, `recent` 3
    assert counts(client, user_id) == (1, 1)
    page = listed(client, user_id)
    assert [n["id"] for n in page["list"]] == [recent]
    assert page["elements"] == 1
    # Still in the document until the next write, which drops it.
    assert len(db.users.find_one({"_id": ObjectId(user_id)})["notifications"]) == 2
    read = client.post(f"/read?user_id={user_id}&notification_id={old}")
    assert read.status_code == 404
    client.post(f"/read?user_id={user_id}&notification_id={recent}")
    stored = db.users.find_one({"_id": ObjectId(user_id)})
    assert [n["id"] for n in stored["notifications"]] == [recent]


def test_the_stored_meta_keeps_no_scratch_fields(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    nid = create(client, user_id)
    client.post(f"/read-all?user_id={user_id}")
    client.post(f"/delete-all?user_id={user_id}")
    stored = stored_meta(db, user_id)
    assert set(stored) == {"version", "log"}
    assert stored["version"] == 3
    assert [entry["changed"] for entry in stored["log"]] == [1, 1]  # delete-all, read-all
    assert nid not in str(stored)
