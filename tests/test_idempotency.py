"""Idempotency-Key on POST /create and POST /email, against a real database.

Records that a first attempt would have left (running, its lease live or over) are
arranged directly in the collection; a `/probe` route on a test app shows what the
flow hands a handler (its seed, whether it is a takeover) and how it treats failures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from conftest import MongoServer
from flask import Flask
from flask.testing import FlaskClient
from flask.typing import ResponseReturnValue
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from notification_service import notifications
from notification_service.config import Config
from notification_service.idempotency import (
    LEASE_MARGIN_SECONDS,
    fingerprint,
    idempotent,
    lease_seconds,
    request_ids,
    retry_after,
)
from notification_service.schemas import CreateRequest
from notification_service.server import runtime_of
from notification_service.storage.idempotency_store import IdempotencyStore
from notification_service.storage.ids import IdBlock
from notification_service.storage.mongo_connector import DatabaseUnavailable
from notification_service.web import ok

KEY = "order-1234 attempt"


def keys(db: Any, config: Config) -> Any:
    return db[config.idempotency_collection]


def post(client: FlaskClient, path: str, body: Any, key: str | None = KEY) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post(path, json=body, headers=headers)


def notifications_of(db: Any, user_id: str) -> list[dict[str, Any]]:
    user = db.users.find_one({"_id": ObjectId(user_id)})
    assert user is not None
    return list(user.get("notifications", []))


def arrange_running(
    db: Any, config: Config, scope_key: str, body: Any, lease_until: datetime
) -> str:
    """A running record as a first attempt leaves it; returns its seed."""
    seed = IdBlock().seed
    now = datetime.now(UTC)
    keys(db, config).insert_one(
        {
            "_id": scope_key,
            "fingerprint": fingerprint(body),
            "state": "running",
            "seed": seed,
            "lease_until": lease_until,
            "created_at": now,
        }
    )
    return seed


def reconnect(app: Flask) -> None:
    """Wait until the app's client reaches the database again (it rediscovers it)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            runtime_of(app).client.admin.command("ping")
            return
        except PyMongoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Clock:
    """The one thing a test may fake: the service's clock."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def fake_clock(app: Flask) -> Clock:
    clock = Clock()
    runtime = runtime_of(app)
    runtime.services = replace(runtime.services, clock=clock)
    return clock


class Probe:
    """A `/probe` route under @idempotent("probe"): records what each run was handed."""

    def __init__(self, app: Flask) -> None:
        self.runs: list[tuple[str, bool]] = []
        self.failures: list[Exception] = []
        self.during: Callable[[], None] | None = None

        @idempotent("probe")
        def probe() -> ResponseReturnValue:
            block, takeover = request_ids()
            self.runs.append((block.seed, takeover))
            if self.during is not None:
                self.during()
            if self.failures:
                raise self.failures.pop(0)
            return ok({"seed": block.seed, "takeover": takeover}, 201)

        app.add_url_rule("/probe", "probe", probe, methods=["POST"])


@pytest.fixture
def probe_app(make_app: Callable[..., Flask], config: Config) -> tuple[Flask, Probe]:
    app = make_app(config)
    return app, Probe(app)


# --- the fingerprint ---------------------------------------------------------------


def test_fingerprint_ignores_key_order_and_whitespace_but_not_values() -> None:
    one = fingerprint({"a": 1, "b": {"x": [1, 2], "y": "é"}})
    assert one == fingerprint({"b": {"y": "é", "x": [1, 2]}, "a": 1})
    assert one != fingerprint({"a": 1, "b": {"x": [2, 1], "y": "é"}})
    assert one != fingerprint({"a": "1", "b": {"x": [1, 2], "y": "é"}})


# --- replay and reuse --------------------------------------------------------------


def test_same_key_and_body_replays_the_first_answer_and_writes_nothing_more(
    client: FlaskClient, db: Any, config: Config, user_id: str
) -> None:
    body = {"user_id": user_id, "key": "new_login", "data": {"ip": "10.0.0.1"}}
    first = post(client, "/create", body)
    assert first.status_code == 201
    assert "Idempotent-Replay" not in first.headers
    again = post(client, "/create", body)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replay"] == "true"
    assert again.get_json() == first.get_json()
    assert again.data == first.data  # the same JSON, field order included
    assert len(notifications_of(db, user_id)) == 1
    assert db.email_outbox.count_documents({}) == 1
    record = keys(db, config).find_one({"_id": f"create {KEY}"})
    assert record["state"] == "done"
    assert record["status"] == 201
    assert record["body"] == first.get_json()


def test_body_with_other_key_order_and_spacing_is_the_same_request(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    headers = {"Idempotency-Key": KEY, "Content-Type": "application/json"}
    first = client.post(
        "/create", data=f'{{"user_id": "{user_id}", "key": "new_post"}}', headers=headers
    )
    again = client.post(
        "/create", data=f'{{ "key":"new_post",\n"user_id":"{user_id}" }}', headers=headers
    )
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replay"] == "true"
    assert len(notifications_of(db, user_id)) == 1


def test_email_route_replays_its_202(client: FlaskClient, db: Any) -> None:
    body = {"to": "someone@example.com", "subject": "Hello", "text": "Any text."}
    first = post(client, "/email", body)
    again = post(client, "/email", body)
    assert first.status_code == again.status_code == 202
    assert again.headers["Idempotent-Replay"] == "true"
    assert again.get_json() == first.get_json()
    assert db.email_outbox.count_documents({}) == 1


def test_a_key_is_scoped_by_route(client: FlaskClient, db: Any, user_id: str) -> None:
    create = post(client, "/create", {"user_id": user_id, "key": "registration"})
    email = post(client, "/email", {"to": "a@example.com", "subject": "s", "text": "t"})
    assert create.status_code == 201 and email.status_code == 202
    assert "Idempotent-Replay" not in email.headers
    assert db.email_outbox.count_documents({}) == 2


def test_same_key_with_another_body_is_422_and_writes_nothing(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    assert post(client, "/create", {"user_id": user_id, "key": "new_post"}).status_code == 201
    response = post(client, "/create", {"user_id": user_id, "key": "new_message"})
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "idempotency_key_reused"
    assert [n["key"] for n in notifications_of(db, user_id)] == ["new_post"]


def test_requests_without_a_key_store_no_key(
    client: FlaskClient, db: Any, config: Config, user_id: str
) -> None:
    body = {"user_id": user_id, "key": "new_post"}
    assert post(client, "/create", body, key=None).status_code == 201
    assert post(client, "/create", body, key=None).status_code == 201
    assert len(notifications_of(db, user_id)) == 2
    assert keys(db, config).count_documents({}) == 0


def test_keys_survive_a_new_app(
    make_app: Callable[..., Flask], config: Config, db: Any, user_id: str
) -> None:
    body = {"user_id": user_id, "key": "new_login"}
    first = post(make_app(config).test_client(), "/create", body)
    again = post(make_app(config).test_client(), "/create", body)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replay"] == "true"
    assert again.get_json() == first.get_json()
    assert len(notifications_of(db, user_id)) == 1
    assert db.email_outbox.count_documents({}) == 1


# --- leases ------------------------------------------------------------------------


NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("left", "expected"),
    [(7.2, 8), (7.0, 7), (0.001, 1), (0.5, 1), (0.0, 1), (-30.0, 1), (40.0, 40)],
)
def test_retry_after_is_the_lease_left_rounded_up_and_at_least_one_second(
    left: float, expected: int
) -> None:
    assert retry_after(NOW + timedelta(seconds=left), NOW) == expected


def test_retry_after_without_a_lease_is_one_second() -> None:
    assert retry_after(None, NOW) == 1


def test_a_lease_is_the_holders_deadline_and_a_margin(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(db_timeout_ms=3000)
    one = lease_seconds(config, {"user_id": "u", "key": "new_post"})
    assert one == 3.0 + LEASE_MARGIN_SECONDS
    assert lease_seconds(config, {"to": "a@example.com", "subject": "s", "text": "t"}) == one
    # A fan-out's own deadline starts after the claim, which may take DB_TIMEOUT_MS.
    fan_out = lease_seconds(config, {"user_ids": ["u"], "key": "new_post"})
    assert fan_out == 3.0 + config.fan_out_timeout_seconds + LEASE_MARGIN_SECONDS


def test_a_keyed_create_is_leased_for_its_own_deadline_a_fan_out_for_its_window(
    app: Flask, db: Any, config: Config, user_id: str
) -> None:
    clock = fake_clock(app)
    client = app.test_client()
    assert (
        post(client, "/create", {"user_id": user_id, "key": "new_post"}, "one").status_code == 201
    )
    fan_out = post(client, "/create", {"user_ids": [user_id], "key": "new_post"}, "many")
    assert fan_out.status_code == 201

    def leased(key: str) -> float:
        record = keys(db, config).find_one({"_id": f"create {key}"})
        return float((record["lease_until"] - clock.now).total_seconds())

    timeout = config.db_timeout_ms / 1000
    assert leased("one") == timeout + LEASE_MARGIN_SECONDS
    assert leased("many") == timeout + config.fan_out_timeout_seconds + LEASE_MARGIN_SECONDS


# --- a key held by another request -------------------------------------------------


def test_key_held_by_a_running_request_is_409_with_the_lease_left_in_retry_after(
    app: Flask, db: Any, config: Config, user_id: str
) -> None:
    clock = fake_clock(app)
    body = {"user_id": user_id, "key": "new_post"}
    live = clock.now + timedelta(seconds=7.2)
    seed = arrange_running(db, config, f"create {KEY}", body, live)
    client = app.test_client()
    response = post(client, "/create", body)
    assert response.status_code == 409
    assert response.headers["Retry-After"] == "8"
    clock.now += timedelta(seconds=6.5)
    assert post(client, "/create", body).headers["Retry-After"] == "1"
    assert response.get_json()["error"]["code"] == "idempotency_key_in_use"
    assert notifications_of(db, user_id) == []
    record = keys(db, config).find_one({"_id": f"create {KEY}"})
    assert record["seed"] == seed and record["state"] == "running"


def test_a_running_key_whose_lease_is_over_is_taken_over_and_run_once(
    client: FlaskClient, db: Any, config: Config, user_id: str
) -> None:
    body = {"user_id": user_id, "key": "new_post"}
    seed = arrange_running(db, config, f"create {KEY}", body, datetime.now(UTC))
    response = post(client, "/create", body)
    assert response.status_code == 201
    assert "Idempotent-Replay" not in response.headers
    record = keys(db, config).find_one({"_id": f"create {KEY}"})
    assert record["state"] == "done"
    assert record["seed"] == seed
    assert record["body"] == response.get_json()
    assert post(client, "/create", body).headers["Idempotent-Replay"] == "true"
    assert len(notifications_of(db, user_id)) == 1


def test_a_retried_collapsing_create_counts_once_and_answers_the_kept_id(
    client: FlaskClient, db: Any, user_id: str
) -> None:
    body = {"user_id": user_id, "key": "new_post", "collapse_key": "t1"}
    kept = post(client, "/create", body, key=None).get_json()["data"]["notification_id"]
    first = post(client, "/create", body)
    again = post(client, "/create", body)
    assert again.headers["Idempotent-Replay"] == "true"
    assert again.get_json() == first.get_json()
    assert first.get_json()["data"]["notification_id"] == kept
    assert first.get_json()["data"]["collapsed"] is True
    assert [n["count"] for n in notifications_of(db, user_id)] == [2]


def test_a_takeover_of_a_collapse_whose_answer_was_lost_counts_it_once(
    client: FlaskClient, app: Flask, db: Any, config: Config, user_id: str
) -> None:
    body = {"user_id": user_id, "key": "new_login", "collapse_key": "t1"}
    kept = post(client, "/create", body, key=None).get_json()["data"]["notification_id"]
    # The first attempt wrote (records and email), then its answer was lost.
    seed = arrange_running(db, config, f"create {KEY}", body, datetime.now(UTC))
    svc = runtime_of(app).services
    lost = notifications.create_notification(svc, CreateRequest(**body), IdBlock(seed))
    response = post(client, "/create", body)
    assert response.status_code == 201
    assert "Idempotent-Replay" not in response.headers  # run again, as a repeat
    assert response.get_json()["data"] == lost
    assert (lost["notification_id"], lost["collapsed"]) == (kept, True)
    assert [n["count"] for n in notifications_of(db, user_id)] == [2]
    assert db.email_outbox.count_documents({}) == 2


def test_a_collapsing_create_run_again_as_a_repeat_counts_once(
    app: Flask, db: Any, make_user: Callable[..., str]
) -> None:
    svc = runtime_of(app).services
    users = [make_user(), make_user()]
    earlier = CreateRequest(user_id=users[0], key="new_post", collapse_key="t1")
    kept = notifications.create_notification(svc, earlier, IdBlock())["notification_id"]
    one, ids = CreateRequest(user_id=users[0], key="new_post", collapse_key="t1"), IdBlock()
    answers = [notifications.create_notification(svc, one, ids, repeat=True) for _ in range(2)]
    assert answers[0] == answers[1]
    assert (answers[0]["notification_id"], answers[0]["collapsed"]) == (kept, True)
    assert [n["count"] for n in notifications_of(db, users[0])] == [2]
    # A fan-out: each user's outcome the same each time, each counted once.
    many, ids = CreateRequest(user_ids=users, key="new_post", collapse_key="t1"), IdBlock()
    outcomes = [notifications.fan_out(svc, many, ids, repeat=True) for _ in range(2)]
    assert outcomes[0] == outcomes[1]
    assert [(r["notification_id"] == kept, r["collapsed"]) for r in outcomes[0]["results"]] == [
        (True, True),
        (False, False),
    ]
    assert [n["count"] for n in notifications_of(db, users[0])] == [3]
    assert [n["count"] for n in notifications_of(db, users[1])] == [1]


def test_a_takeover_hands_the_handler_the_stored_seed(
    probe_app: tuple[Flask, Probe], db: Any, config: Config
) -> None:
    app, probe = probe_app
    seed = arrange_running(db, config, f"probe {KEY}", {"n": 1}, datetime.now(UTC))
    response = post(app.test_client(), "/probe", {"n": 1})
    assert response.status_code == 201
    assert probe.runs == [(seed, True)]


def test_a_first_claim_hands_the_handler_its_fresh_seed(
    probe_app: tuple[Flask, Probe], db: Any, config: Config
) -> None:
    app, probe = probe_app
    response = post(app.test_client(), "/probe", {"n": 1})
    [(seed, takeover)] = probe.runs
    assert takeover is False
    assert keys(db, config).find_one({"_id": f"probe {KEY}"})["seed"] == seed
    assert response.get_json()["data"]["seed"] == seed


def test_without_a_key_the_handler_gets_a_fresh_block(probe_app: tuple[Flask, Probe]) -> None:
    app, probe = probe_app
    client = app.test_client()
    post(client, "/probe", {"n": 1}, key=None)
    post(client, "/probe", {"n": 1}, key=None)
    [(one, takeover_one), (two, takeover_two)] = probe.runs
    assert one != two
    assert takeover_one is takeover_two is False


# --- what a failed request does to its key -----------------------------------------


def test_a_4xx_forgets_the_key_so_a_retry_after_the_fix_runs(
    client: FlaskClient, db: Any, config: Config, make_user: Callable[..., str]
) -> None:
    missing = str(ObjectId())
    body = {"user_id": missing, "key": "new_login"}
    response = post(client, "/create", body)
    assert response.status_code == 404
    assert keys(db, config).count_documents({}) == 0
    make_user(_id=ObjectId(missing))
    retry = post(client, "/create", body)
    assert retry.status_code == 201
    assert "Idempotent-Replay" not in retry.headers
    assert len(notifications_of(db, missing)) == 1


def test_a_rejected_body_forgets_the_key_so_a_corrected_body_may_use_it(
    client: FlaskClient, db: Any, config: Config, user_id: str
) -> None:
    response = post(client, "/create", {"user_id": user_id, "key": "no_such_key"})
    assert response.status_code == 422
    assert keys(db, config).count_documents({}) == 0
    assert post(client, "/create", {"user_id": user_id, "key": "new_post"}).status_code == 201


def test_bad_json_with_a_key_is_400_and_claims_nothing(
    client: FlaskClient, db: Any, config: Config
) -> None:
    response = client.post(
        "/create",
        data="{not json",
        headers={"Idempotency-Key": KEY, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_json"
    assert keys(db, config).count_documents({}) == 0


def test_a_bug_ends_the_lease_so_the_retry_takes_over_at_once(
    probe_app: tuple[Flask, Probe], db: Any, config: Config
) -> None:
    app, probe = probe_app
    client = app.test_client()
    probe.failures.append(RuntimeError("a bug"))
    response = post(client, "/probe", {"n": 1})
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"  # the original error
    record = keys(db, config).find_one({"_id": f"probe {KEY}"})
    assert record["state"] == "running"
    assert record["lease_until"] <= datetime.now(UTC)
    retry = post(client, "/probe", {"n": 1})
    assert retry.status_code == 201
    [(seed, first_takeover), (retry_seed, retry_takeover)] = probe.runs
    assert (first_takeover, retry_seed, retry_takeover) == (False, seed, True)


def test_a_503_keeps_its_answer_and_ends_the_lease(
    probe_app: tuple[Flask, Probe], db: Any, config: Config
) -> None:
    app, probe = probe_app
    probe.failures.append(DatabaseUnavailable("gone"))
    response = post(app.test_client(), "/probe", {"n": 1})
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "database_unavailable"
    record = keys(db, config).find_one({"_id": f"probe {KEY}"})
    assert record["lease_until"] <= datetime.now(UTC)


def test_the_answer_stands_when_recording_it_fails_and_a_retry_takes_over_later(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    db_link: Any,
    db_name: str,
    db: Any,
) -> None:
    config = make_config(db_uri=db_link.uri(db_name), db_timeout_ms=500)
    app = make_app(config)
    probe = Probe(app)
    probe.during = db_link.cut  # the handler's writes are done; the database goes
    client = app.test_client()
    response = post(client, "/probe", {"n": 1})
    assert response.status_code == 201
    db_link.heal()
    probe.during = None
    reconnect(app)
    record = keys(db, config).find_one({"_id": f"probe {KEY}"})
    assert record["state"] == "running"  # unrecorded: held until the lease ends
    assert post(client, "/probe", {"n": 1}).status_code == 409
    keys(db, config).update_one(
        {"_id": record["_id"]}, {"$set": {"lease_until": datetime.now(UTC)}}
    )
    retry = post(client, "/probe", {"n": 1})
    assert retry.status_code == 201
    assert retry.get_json() == response.get_json() | {
        "data": {"seed": record["seed"], "takeover": True}
    }


def test_a_claim_the_database_applies_after_its_503_frees_the_key_for_the_next_retry(
    own_server: MongoServer, make_app: Callable[..., Flask]
) -> None:
    # Issue 16 item 6b: the database froze during the claim; the claim's insert timed
    # out (503) and was applied when the database came back, leaving the key running.
    # The retry 1 s after the thaw must complete the request, with the first ids.
    timeout = 0.5
    config = Config(
        db_uri=own_server.uri("late_claim"), dispatcher_threads=0, db_timeout_ms=int(timeout * 1000)
    )
    app = make_app(config)
    clock = fake_clock(app)
    client = app.test_client()
    with MongoClient(own_server.uri("late_claim"), tz_aware=True) as admin:
        db = admin["late_claim"]
        user_id = str(db.users.insert_one({"email": "user@example.com"}).inserted_id)
        body = {"user_id": user_id, "key": "new_login"}
        runtime_of(app).client.admin.command("ping")  # connected: the insert gets sent
        start = clock.now
        own_server.freeze()
        try:
            first = post(client, "/create", body)
        finally:
            own_server.thaw()
        assert first.status_code == 503
        assert first.get_json()["error"]["code"] == "database_unavailable"
        deadline = time.monotonic() + 10
        while (record := keys(db, config).find_one({"_id": f"create {KEY}"})) is None:
            assert time.monotonic() < deadline, "the claim's insert was never applied"
            time.sleep(0.02)
        assert record["state"] == "running"
        reconnect(app)
        # As in the fault run: the client gave up after DB_TIMEOUT_MS, the database came
        # back 0.5 s later; a retry then is told when the lease ends.
        clock.now = start + timedelta(seconds=timeout + 0.5)
        early = post(client, "/create", body)
        assert early.status_code == 409
        assert early.headers["Retry-After"] == "1"
        clock.now += timedelta(seconds=1)  # the retry 1 s after the thaw
        retry = post(client, "/create", body)
        assert retry.status_code == 201, retry.get_json()
        ids = IdBlock(record["seed"])
        assert retry.get_json()["data"]["notification_id"] == ids.id(0)
        assert retry.get_json()["data"]["email_id"] == ids.id(1)
        assert len(notifications_of(db, user_id)) == 1
        assert db.email_outbox.count_documents({}) == 1
        assert keys(db, config).find_one({"_id": f"create {KEY}"})["state"] == "done"


# --- the header --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "must not be empty or only spaces"),
        ("   ", "must not be empty or only spaces"),
        ("k" * 256, "must be at most 255 characters"),
        ("a\x01b", "must be printable ASCII (0x21-0x7E, with spaces only between them)"),
        ("a\tb", "must be printable ASCII (0x21-0x7E, with spaces only between them)"),
        ("a\x7fb", "must be printable ASCII (0x21-0x7E, with spaces only between them)"),
        ("clé", "must be printable ASCII (0x21-0x7E, with spaces only between them)"),
    ],
)
def test_bad_key_is_422_and_stores_nothing(
    client: FlaskClient, db: Any, config: Config, user_id: str, value: str, problem: str
) -> None:
    response = post(client, "/create", {"user_id": user_id, "key": "new_post"}, key=value)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_failed"
    assert error["details"] == [{"field": "Idempotency-Key", "problem": problem}]
    assert keys(db, config).count_documents({}) == 0
    assert notifications_of(db, user_id) == []


def test_a_key_of_255_printable_characters_with_inner_spaces_is_taken(
    client: FlaskClient, db: Any, config: Config, user_id: str
) -> None:
    key = ("!~ a" * 64)[:254] + "~"
    assert len(key) == 255
    response = post(client, "/create", {"user_id": user_id, "key": "new_post"}, key=key)
    assert response.status_code == 201
    assert keys(db, config).find_one({"_id": f"create {key}"})["state"] == "done"


# --- concurrency -------------------------------------------------------------------


def test_twenty_concurrent_identical_requests_make_one_record_and_one_email(
    app: Flask, db: Any, user_id: str
) -> None:
    body = {"user_id": user_id, "key": "new_login", "data": {"ip": "10.0.0.9"}}
    start = threading.Barrier(20)
    answers: list[tuple[int, bool, Any]] = []
    lock = threading.Lock()

    def worker() -> None:
        client = app.test_client()
        start.wait()
        response = post(client, "/create", body)
        with lock:
            answers.append(
                (response.status_code, "Idempotent-Replay" in response.headers, response.get_json())
            )

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ran = [json for status, replay, json in answers if status == 201 and not replay]
    assert len(ran) == 1
    for status, _, json in answers:
        if status == 201:
            assert json == ran[0]
        else:
            assert status == 409
            assert json["error"]["code"] == "idempotency_key_in_use"
    assert len(answers) == 20
    assert len(notifications_of(db, user_id)) == 1
    assert db.email_outbox.count_documents({}) == 1


# --- the store's index -------------------------------------------------------------


def test_ttl_index_is_created_and_a_new_ttl_applied_with_collmod(
    make_config: Callable[..., Config], db: Any
) -> None:
    def expires() -> Any:
        [index] = [i for i in db.idempotency_keys.list_indexes() if i["name"] == "expires"]
        return index

    IdempotencyStore(db, make_config(idempotency_ttl_hours=24)).ensure_indexes()
    assert dict(expires()["key"]) == {"created_at": 1}
    assert expires()["expireAfterSeconds"] == 24 * 3600
    IdempotencyStore(db, make_config(idempotency_ttl_hours=2)).ensure_indexes()
    assert expires()["expireAfterSeconds"] == 2 * 3600
    IdempotencyStore(db, make_config(idempotency_ttl_hours=2)).ensure_indexes()  # unchanged
    # _id, expires, and refs (whom a stored answer is about: a user's erasure finds it)
    assert {i["name"] for i in db.idempotency_keys.list_indexes()} == {"_id_", "expires", "refs"}
