"""What server.py adds to every route: API keys, OPTIONS, liveness, one deadline per request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bson import ObjectId
from conftest import MongoServer
from flask import Flask
from flask.testing import FlaskClient
from pymongo import MongoClient

from notification_service.config import Config

KEY = "k3y-0f-at-least-16-chars"
OTHER_KEY = "another-key-of-16-chars+"


@pytest.fixture
def keyed(make_app: Callable[..., Flask], make_config: Callable[..., Config]) -> FlaskClient:
    return make_app(make_config(api_keys=(KEY, OTHER_KEY))).test_client()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- API keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong-key-of-16-chars"},
        {"Authorization": f"Bearer {KEY[:-1]}"},  # a prefix of a real key
        {"Authorization": f"Bearer {KEY}x"},  # a real key and more
        {"Authorization": f"Basic {KEY}"},  # the right secret, the wrong scheme
        {"Authorization": KEY},
        {"X-API-Key": KEY},
        {"Authorization": "Bearer ключ-не-ascii-символы"},
    ],
)
def test_every_route_refuses_a_missing_or_wrong_key_with_401_json(
    keyed: FlaskClient, db: Any, user_id: str, headers: dict[str, str]
) -> None:
    calls = [
        keyed.get(f"/list?user_id={user_id}", headers=headers),
        keyed.post("/create", json={"user_id": user_id, "key": "new_post"}, headers=headers),
        keyed.post(f"/read?user_id={user_id}&notification_id={ObjectId()}", headers=headers),
        keyed.post("/email", json={"to": "a@example.com", "subject": "s", "text": "t"},
                   headers=headers),
        keyed.get(f"/email/{ObjectId()}", headers=headers),
        keyed.get("/no-such-route", headers=headers),  # routes are not revealed either
        keyed.open("/create", method="OPTIONS", headers=headers),
    ]  # fmt: skip
    for response in calls:
        assert response.status_code == 401, response.request.path
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.get_json()["error"]["code"] == "unauthorized"
    assert db.users.find_one({"_id": ObjectId(user_id)}, {"_id": 0}) == {
        "email": "user@example.com"
    }
    assert db.email_outbox.count_documents({}) == 0


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_any_configured_key_opens_every_route(keyed: FlaskClient, user_id: str, key: str) -> None:
    created = keyed.post(
        "/create", json={"user_id": user_id, "key": "new_post"}, headers=bearer(key)
    )
    assert created.status_code == 201
    listed = keyed.get(f"/list?user_id={user_id}", headers=bearer(key))
    assert listed.status_code == 200 and listed.get_json()["data"]["elements"] == 1
    # The scheme is case-insensitive (RFC 7235).
    lower = keyed.get(f"/list?user_id={user_id}", headers={"Authorization": f"bearer {key}"})
    assert lower.status_code == 200


def test_health_needs_no_key_and_no_database(
    make_app: Callable[..., Flask], make_config: Callable[..., Config]
) -> None:
    # A database nobody listens on: /health must still answer at once.
    config = make_config(api_keys=(KEY,), db_uri="mongodb://127.0.0.1:9/none", db_timeout_ms=500)
    client = make_app(config).test_client()
    started = time.monotonic()
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"success": True, "data": {"status": "ok"}}
    assert time.monotonic() - started < 0.4


def test_a_wrong_method_on_an_open_route_is_405_without_a_key(keyed: FlaskClient) -> None:
    # The path needs no key, so its other methods are no secret either: a 401 would
    # tell a caller without a key that GET needs one.
    for path in ("/health", "/ready", "/openapi.json", "/docs", "/docs/docs.js"):
        for method in ("POST", "DELETE", "TRACE"):
            response = keyed.open(path, method=method)
            assert response.status_code == 405, (method, path)
            assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
            assert response.get_json()["error"]["code"] == "method_not_allowed"
    # A route that needs the key reveals nothing of its methods without one.
    assert keyed.get("/create").status_code == 401
    assert keyed.get("/create", headers=bearer(KEY)).status_code == 405


def test_without_keys_the_service_is_open(client: FlaskClient, user_id: str) -> None:
    assert client.get(f"/list?user_id={user_id}").status_code == 200


def test_the_key_never_reaches_the_log(
    keyed: FlaskClient, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    keyed.get(f"/list?user_id={user_id}", headers=bearer(KEY))
    keyed.get(f"/list?user_id={user_id}", headers=bearer(KEY[:-1]))
    assert KEY[:-1] not in caplog.text


# --- OPTIONS ----------------------------------------------------------------------


def test_options_answers_204_with_allow_and_no_body(client: FlaskClient) -> None:
    response = client.open("/create", method="OPTIONS")
    assert response.status_code == 204
    assert set(response.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    assert response.data == b""
    assert "Content-Type" not in response.headers
    assert client.open("/nowhere", method="OPTIONS").status_code == 404


# --- one deadline for all the database calls of a request --------------------------


@pytest.fixture(scope="module")
def failpoint_server() -> Iterator[MongoServer]:
    server = MongoServer.start("--enable-test-commands")
    yield server
    server.stop()


BLOCK_MS = 1300  # each blocked call alone fits in the 2 s budget; two together do not
TIMEOUT_MS = 2000


def block_commands(server: MongoServer, commands: list[str]) -> None:
    with MongoClient(server.uri("admin")) as admin:
        admin.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 4},
            data={"failCommands": commands, "blockConnection": True, "blockTimeMS": BLOCK_MS},
        )


def unblock(server: MongoServer) -> None:
    with MongoClient(server.uri("admin")) as admin:
        admin.admin.command("configureFailPoint", "failCommand", mode="off")


@pytest.mark.parametrize(
    ("method", "path", "body", "email_mode"),
    [
        # An update that matches nothing, then a find to tell "no user" from "no such id".
        ("POST", "/read?user_id={user}&notification_id={other}", None, False),
        # An update that matches nothing, then a find to tell why.
        ("POST", "/create", {"user_id": "{other}", "key": "new_post"}, False),
        # The user (created in test mode), then the outbox insert.
        ("POST", "/create", {"user_id": "{other}", "key": "new_login"}, True),
        ("POST", "/create", {"user_id": "{user}", "key": "registration"}, False),
        # The user's address, then the outbox insert.
        ("POST", "/email", {"user_id": "{user}", "subject": "s", "text": "t"}, False),
    ],
)
def test_a_request_answers_within_db_timeout_however_many_calls_it_makes(
    failpoint_server: MongoServer,
    make_app: Callable[..., Flask],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    email_mode: bool,
) -> None:
    database = f"deadline_{ObjectId()}"
    config = Config(
        db_uri=failpoint_server.uri(database),
        dispatcher_threads=0,
        db_timeout_ms=TIMEOUT_MS,
        email="test@example.com" if email_mode else None,
    )
    client = make_app(config).test_client()
    with MongoClient(failpoint_server.uri(database)) as direct:
        user = direct[database].users.insert_one({"email": "user@example.com"}).inserted_id
    names = {"user": str(user), "other": str(ObjectId())}
    path = path.format(**names)
    if body is not None:
        body = {k: v.format(**names) if isinstance(v, str) else v for k, v in body.items()}
    assert client.get("/nope").status_code == 404  # warm: the app is built
    block_commands(failpoint_server, ["find", "update", "insert", "findAndModify", "aggregate"])
    try:
        started = time.monotonic()
        response = client.open(path, method=method, json=body)
        elapsed = time.monotonic() - started
    finally:
        unblock(failpoint_server)
    assert response.status_code == 503, response.get_json()
    assert response.headers["Retry-After"]
    assert elapsed < TIMEOUT_MS / 1000 + 0.5, f"took {elapsed:.2f}s"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health"), ("GET", "/nope"), ("DELETE", "/list"), ("POST", "/create"),
     ("GET", "/count?user_id=bad"), ("GET", "/openapi.json"), ("GET", "/docs")],
)  # fmt: skip
def test_every_answer_forbids_type_sniffing(client: FlaskClient, method: str, path: str) -> None:
    response = client.open(path, method=method)
    assert response.headers["X-Content-Type-Options"] == "nosniff", response.status_code


def test_every_answer_of_a_keyed_service_forbids_type_sniffing_too(keyed: FlaskClient) -> None:
    assert keyed.get("/count?user_id=x").headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/docs", "/inbox"])
def test_pages_refuse_to_be_framed_by_both_headers(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"


# --- fan-outs take at most half of the threads ---------------------------------------


def test_a_fan_out_past_the_cap_is_503_too_many_fan_outs_and_its_key_is_free_again(
    failpoint_server: MongoServer, make_app: Callable[..., Flask]
) -> None:
    database = f"cap_{ObjectId()}"
    # Two threads: one may run a fan-out, the other stays for everything else.
    config = Config(db_uri=failpoint_server.uri(database), dispatcher_threads=0, web_threads=2)
    app = make_app(config)
    with MongoClient(failpoint_server.uri(database)) as direct:
        users = [str(direct[database].users.insert_one({"email": "u@example.com"}).inserted_id)]
    body = {"user_ids": users, "key": "new_post"}
    assert app.test_client().get("/nope").status_code == 404  # warm: the app is built
    with MongoClient(failpoint_server.uri("admin")) as admin:
        admin.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 1},  # the first fan-out's bulk write is held
            data={"failCommands": ["update"], "blockConnection": True, "blockTimeMS": 1500},
        )
    held: list[int] = []
    first = threading.Thread(
        target=lambda: held.append(app.test_client().post("/create", json=body).status_code)
    )
    try:
        first.start()
        time.sleep(0.5)
        started = time.monotonic()
        refused = app.test_client().post("/create", json=body, headers={"Idempotency-Key": "k1"})
        elapsed = time.monotonic() - started
        # One user at a time is not a fan-out: never refused for the cap.
        single = app.test_client().post("/create", json={"user_id": users[0], "key": "new_post"})
        first.join(10)
    finally:
        unblock(failpoint_server)
    assert refused.status_code == 503, refused.get_json()
    assert refused.get_json()["error"]["code"] == "too_many_fan_outs"
    assert int(refused.headers["Retry-After"]) > 0
    assert elapsed < 0.5  # refused, not queued
    assert single.status_code == 201 and held == [201]
    # The slot is given back, and the refused key was released: its retry runs.
    retried = app.test_client().post("/create", json=body, headers={"Idempotency-Key": "k1"})
    assert retried.status_code == 201, retried.get_json()
