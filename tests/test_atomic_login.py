"""No half-done new_login: a request cut short between storing the notification and
queuing its email is completed or undone, never left half done, on both server modes.

Interrupted for real: the server's `failCommand` fail point (SecantusDB's
--enable-test-commands) closes the connection on the chosen command, so the request
answers 503 with one write done and the next not.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from clocks import FakeClock
from conftest import MongoServer
from flask import Flask
from pymongo import MongoClient

from notification_service.config import Config
from notification_service.dispatcher import DispatchContext, Dispatcher, RateLimiter
from notification_service.email_sender import SmtpSender, SmtpSettings
from notification_service.notifications import FAN_OUT_CHUNK
from notification_service.server import runtime_of


@pytest.fixture(scope="module", params=["replica set", "standalone"])
def server(request: pytest.FixtureRequest) -> Iterator[MongoServer]:
    flags = ["--enable-test-commands"]
    if request.param == "standalone":
        flags.append("--standalone")
    started = MongoServer.start(*flags)
    yield started
    started.stop()


@pytest.fixture
def mode(server: MongoServer) -> str:
    with MongoClient(server.uri("admin"), directConnection=True) as client:
        return "replica set" if "setName" in client.admin.command("hello") else "standalone"


@pytest.fixture
def database(server: MongoServer) -> Iterator[tuple[str, Any]]:
    name = f"t_{ObjectId()}"
    with MongoClient(server.uri(name), directConnection=True) as client:
        yield name, client[name]
        client.drop_database(name)


@pytest.fixture
def app(server: MongoServer, database: tuple[str, Any], make_app: Callable[..., Flask]) -> Flask:
    name, _ = database
    config = Config(
        db_uri=server.uri(name) + "?directConnection=true&retryWrites=false",
        dispatcher_threads=0,
        db_timeout_ms=1500,
    )
    return make_app(config)


@pytest.fixture
def user_id(database: tuple[str, Any]) -> str:
    _, db = database
    oid = ObjectId()
    db.users.insert_one({"_id": oid, "email": "someone@example.com", "notifications": []})
    return str(oid)


def arm(server: MongoServer, mode: Any, data: dict[str, Any]) -> None:
    """Set the server's `failCommand` fail point (until `heal`)."""
    with MongoClient(server.uri("admin"), directConnection=True) as admin:
        admin.admin.command("configureFailPoint", "failCommand", mode=mode, data=data)


def fail(server: MongoServer, command: str, skip: int = 0) -> None:
    """Every `command` but the first `skip` loses its connection (until `heal`)."""
    mode = {"skip": skip} if skip else "alwaysOn"
    arm(server, mode, {"failCommands": [command], "closeConnection": True})


def heal(server: MongoServer) -> None:
    with MongoClient(server.uri("admin"), directConnection=True) as admin:
        admin.admin.command("configureFailPoint", "failCommand", mode="off")


def state(db: Any, user_id: str) -> tuple[list[str], list[tuple[str, str | None]]]:
    """The user's notification ids, and every outbox record's (status, notification_id)."""
    user = db.users.find_one({"_id": ObjectId(user_id)})
    emails = [(r["status"], r.get("notification_id")) for r in db.email_outbox.find()]
    return [n["id"] for n in user.get("notifications", [])], emails


def login(client: Any, user_id: str, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/create", json={"user_id": user_id, "key": "new_login"}, headers=headers)


def sweep_later(app: Flask) -> tuple[int, int]:
    """Run the dispatcher's sweep of pending emails as it would run once the request's
    write window is over (the clock moved on; nothing else faked)."""
    services = runtime_of(app).services
    config = services.config
    later = services.clock() + timedelta(seconds=config.write_window_seconds + 1)
    dispatcher = Dispatcher(
        context=DispatchContext(
            config, services.outbox, FakeClock(later), services.store.has_notification
        ),
        sender=SmtpSender(SmtpSettings.from_config(replace(config, smtp_host="127.0.0.1"))),
        name="sweeper",
        limiter=RateLimiter(0),
        wake=threading.Event(),
        stopping=threading.Event(),
        rng=random.Random(1),
    )
    return dispatcher.sweep_pending()


# Each write of a new_login, as (command, how many of it to let through first): the
# notification is an update; then, in the transaction, the outbox insert; on a
# standalone server (pending email inserted before) the update that releases it.
RECORD = ("update", 0)
SECOND_WRITE = {"replica set": ("insert", 0), "standalone": ("update", 1)}


def cut(server: MongoServer, write: tuple[str, int]) -> None:
    fail(server, write[0], skip=write[1])


def interrupt(
    server: MongoServer, db: Any, write: tuple[str, int], call: Callable[[], Any]
) -> None:
    """`call()` answers 503 with `write` cut; then the Idempotency-Key's lease is over.

    The fail point also refuses the update that would end the lease at once; a client
    would wait it out (Config.write_window_seconds); the test ends it.
    """
    cut(server, write)
    try:
        assert call().status_code == 503
    finally:
        heal(server)
    db.idempotency_keys.update_many({}, {"$set": {"lease_until": datetime(2000, 1, 1, tzinfo=UTC)}})


def test_cut_after_the_record_leaves_nothing_half_done(
    app: Flask, server: MongoServer, database: tuple[str, Any], user_id: str, mode: str
) -> None:
    _, db = database
    client = app.test_client()
    cut(server, SECOND_WRITE[mode])
    try:
        assert login(client, user_id).status_code == 503
    finally:
        heal(server)
    ids, emails = state(db, user_id)
    if mode == "replica set":
        assert (ids, emails) == ([], [])  # the transaction took neither
    else:
        # Stored, with its email held back as pending: the sweep releases it.
        assert len(ids) == 1
        assert emails == [("pending", ids[0])]
        assert sweep_later(app) == (1, 0)
        assert state(db, user_id)[1] == [("queued", ids[0])]


def test_cut_before_the_record_is_undone(
    app: Flask, server: MongoServer, database: tuple[str, Any], user_id: str, mode: str
) -> None:
    _, db = database
    client = app.test_client()
    cut(server, RECORD)
    try:
        assert login(client, user_id).status_code == 503
    finally:
        heal(server)
    ids, emails = state(db, user_id)
    assert ids == []
    if mode == "standalone":
        assert [status for status, _ in emails] == ["pending"]
        # The request failed as a whole: its email must never go out alone.
        assert sweep_later(app) == (0, 1)
    assert state(db, user_id) == ([], [])


@pytest.mark.parametrize("command", ["record", "second write"])
def test_a_retry_with_the_same_key_completes_it_once(
    app: Flask,
    server: MongoServer,
    database: tuple[str, Any],
    user_id: str,
    mode: str,
    command: str,
) -> None:
    _, db = database
    client = app.test_client()
    write = SECOND_WRITE[mode] if command == "second write" else RECORD
    interrupt(server, db, write, lambda: login(client, user_id, key="login-1"))
    retry = login(client, user_id, key="login-1")
    assert retry.status_code == 201, retry.get_json()
    data = retry.get_json()["data"]
    ids, emails = state(db, user_id)
    assert ids == [data["notification_id"]]
    assert emails == [("queued", data["notification_id"])]
    # Nothing is left for the sweep, and a third call replays the answer.
    assert sweep_later(app) == (0, 0)
    replay = login(client, user_id, key="login-1")
    assert replay.headers.get("Idempotent-Replay") == "true"
    assert replay.get_json()["data"] == data
    assert state(db, user_id) == (ids, emails)


def collapsing_login(client: Any, user_id: str, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"user_id": user_id, "key": "new_login", "collapse_key": "logins"}
    return client.post("/create", json=body, headers=headers)


def counted(db: Any, user_id: str) -> list[int]:
    return [n["count"] for n in db.users.find_one({"_id": ObjectId(user_id)})["notifications"]]


@pytest.mark.parametrize("command", ["record", "second write"])
def test_a_cut_collapsing_login_retried_with_its_key_counts_once_and_emails_once(
    app: Flask,
    server: MongoServer,
    database: tuple[str, Any],
    user_id: str,
    mode: str,
    command: str,
) -> None:
    _, db = database
    client = app.test_client()
    kept = collapsing_login(client, user_id).get_json()["data"]["notification_id"]
    write = SECOND_WRITE[mode] if command == "second write" else RECORD
    interrupt(server, db, write, lambda: collapsing_login(client, user_id, key="login-2"))
    retry = collapsing_login(client, user_id, key="login-2")
    assert retry.status_code == 201, retry.get_json()
    data = retry.get_json()["data"]
    assert (data["notification_id"], data["collapsed"]) == (kept, True)
    assert counted(db, user_id) == [2]
    assert sorted(status for status, _ in state(db, user_id)[1]) == ["queued", "queued"]
    assert sweep_later(app) == (0, 0)


def test_a_collapsed_logins_email_cut_before_its_release_is_released_by_the_sweep(
    app: Flask, server: MongoServer, database: tuple[str, Any], user_id: str, mode: str
) -> None:
    _, db = database
    client = app.test_client()
    collapsing_login(client, user_id)
    cut(server, SECOND_WRITE[mode])
    try:
        assert collapsing_login(client, user_id).status_code == 503
    finally:
        heal(server)
    statuses = sorted(status for status, _ in state(db, user_id)[1])
    if mode == "replica set":
        assert (counted(db, user_id), statuses) == ([1], ["queued"])  # took neither
    else:
        # Collapsed, its email pending under the create's own id, which the array
        # does not hold: the collapse log tells the sweep it was stored.
        assert (counted(db, user_id), statuses) == ([2], ["pending", "queued"])
        assert sweep_later(app) == (1, 0)
        assert sorted(status for status, _ in state(db, user_id)[1]) == ["queued", "queued"]


def fan_out(client: Any, user_ids: list[str], key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"user_ids": user_ids, "key": "new_login"}
    return client.post("/create", json=body, headers=headers)


def make_users(db: Any, n: int) -> list[str]:
    oids = [ObjectId() for _ in range(n)]
    db.users.insert_many([{"_id": o, "email": f"u{i}@example.com"} for i, o in enumerate(oids)])
    return [str(o) for o in oids]


def test_fan_out_of_new_login_records_and_queues_each(
    app: Flask, database: tuple[str, Any]
) -> None:
    _, db = database
    users = make_users(db, 5)
    response = fan_out(app.test_client(), users)
    assert response.status_code == 201
    results = response.get_json()["data"]["results"]
    for user_id, result in zip(users, results, strict=True):
        assert state(db, user_id)[0] == [result["notification_id"]]
    queued = {r["notification_id"]: r["status"] for r in db.email_outbox.find()}
    assert queued == {r["notification_id"]: "queued" for r in results}


def test_a_cut_fan_out_is_all_or_nothing_then_completed_by_its_retry(
    app: Flask, server: MongoServer, database: tuple[str, Any], mode: str
) -> None:
    _, db = database
    users = make_users(db, 4)
    client = app.test_client()
    # The emails' insert in the transaction; on a standalone server the first update,
    # the bulk write of the records (the emails are already in, pending).
    write = SECOND_WRITE[mode] if mode == "replica set" else RECORD
    interrupt(server, db, write, lambda: fan_out(client, users, key="post-1"))
    stored = [n for u in users for n in state(db, u)[0]]
    statuses = [r["status"] for r in db.email_outbox.find()]
    if mode == "replica set":
        assert (stored, statuses) == ([], [])
    else:
        assert (stored, statuses) == ([], ["pending"] * 4)
    retry = fan_out(client, users, key="post-1")
    assert retry.status_code == 201, retry.get_json()
    results = retry.get_json()["data"]["results"]
    assert [r["status"] for r in results] == ["created"] * 4
    for user_id, result in zip(users, results, strict=True):
        assert state(db, user_id)[0] == [result["notification_id"]]
    assert sorted(r["status"] for r in db.email_outbox.find()) == ["queued"] * 4
    assert sweep_later(app) == (0, 0)


def test_a_fan_out_cut_between_chunks_says_which_users_were_written(
    app: Flask, server: MongoServer, database: tuple[str, Any], mode: str
) -> None:
    _, db = database
    users = make_users(db, FAN_OUT_CHUNK + 10)  # two chunks
    client = app.test_client()
    body = {"user_ids": users, "key": "new_login"}
    # The key's claim and the first chunk's emails pass; the second chunk's are cut.
    write = ("insert", 2)
    interrupt(
        server, db, write,
        lambda: check_cut(client.post("/create", json=body, headers={"Idempotency-Key": "c-1"}),
                          users[:FAN_OUT_CHUNK]),
    )  # fmt: skip
    assert sum(1 for u in users if state(db, u)[0]) == FAN_OUT_CHUNK
    retry = client.post("/create", json=body, headers={"Idempotency-Key": "c-1"})
    assert retry.status_code == 201, retry.get_json()
    assert retry.get_json()["data"]["totals"]["created"] == len(users)
    # Each user holds one notification and has one email: none doubled by the retry.
    assert all(len(state(db, u)[0]) == 1 for u in users)
    assert db.email_outbox.count_documents({}) == len(users)
    assert sweep_later(app) == (0, 0)


def check_cut(response: Any, written: list[str]) -> Any:
    """The 503 of a cut fan-out names exactly the users it wrote, in order."""
    assert response.status_code == 503, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "database_unavailable"
    assert error["written"] == written
    return response


def test_a_document_that_refuses_the_write_fails_only_its_user(
    app: Flask, database: tuple[str, Any]
) -> None:
    _, db = database
    users = make_users(db, 2)
    full = ObjectId()
    # Just under MongoDB's 16 MiB: one more notification with this data cannot fit.
    db.users.insert_one(
        {"_id": full, "email": "full@example.com", "pad": "x" * (16 * 1024 * 1024 - 8 * 1024)}
    )
    body = {
        "user_ids": [users[0], str(full), users[1]],
        "key": "new_login",
        "data": {"t": "y" * 12000},
    }
    response = app.test_client().post("/create", json=body)
    assert response.status_code == 201, response.get_json()
    statuses = [r["status"] for r in response.get_json()["data"]["results"]]
    assert statuses == ["created", "user_document_invalid", "created"]
    assert sorted(r["status"] for r in db.email_outbox.find()) == ["queued", "queued"]
    assert "notifications" not in db.users.find_one({"_id": full}, {"pad": 0})


def test_a_fan_out_has_more_than_one_request_s_database_budget(
    app: Flask, server: MongoServer, database: tuple[str, Any]
) -> None:
    _, db = database
    users = make_users(db, 3)
    with MongoClient(server.uri("admin"), directConnection=True) as admin:
        # The bulk write of the records takes longer than DB_TIMEOUT_MS (1.5 s) alone.
        admin.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 1},
            data={"failCommands": ["update"], "blockConnection": True, "blockTimeMS": 2000},
        )
    try:
        response = fan_out(app.test_client(), users)
    finally:
        heal(server)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["data"]["totals"]["created"] == 3


def lose_commit_answer(server: MongoServer, labels: list[str], times: int = 1) -> None:
    """The next `times` commits are applied, but answer a write concern error carrying
    `labels`, as a commit whose reply was lost in a failover can (fail point)."""
    arm(
        server,
        {"times": times},
        {
            "failCommands": ["commitTransaction"],
            "writeConcernError": {"code": 100, "errmsg": "the commit's answer was lost"},
            "errorLabels": labels,
        },
    )


def test_a_commit_applied_then_retried_answers_201_and_writes_once(
    app: Flask, server: MongoServer, database: tuple[str, Any], user_id: str, mode: str
) -> None:
    # The driver runs the whole transaction again after a commit error labelled
    # TransientTransactionError; here the first commit went through, so the second run
    # must find the request's own writes instead of writing them again.
    if mode != "replica set":
        pytest.skip("commits are a replica set's")
    _, db = database
    lose_commit_answer(server, ["TransientTransactionError"])
    try:
        response = login(app.test_client(), user_id)
    finally:
        heal(server)
    assert response.status_code == 201, response.get_json()
    data = response.get_json()["data"]
    assert (data["elements"], data["new"]) == (1, 1)
    assert state(db, user_id) == ([data["notification_id"]], [("queued", data["notification_id"])])


def test_a_commit_that_cannot_be_confirmed_is_a_503_not_a_500(
    app: Flask, server: MongoServer, database: tuple[str, Any], user_id: str, mode: str
) -> None:
    if mode != "replica set":
        pytest.skip("commits are a replica set's")
    lose_commit_answer(server, [], times=50)
    try:
        response = login(app.test_client(), user_id)
    finally:
        heal(server)
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error"]["code"] == "database_unavailable"
    assert "Retry-After" in response.headers


def test_a_caller_s_idempotency_key_never_reaches_the_log(
    app: Flask,
    server: MongoServer,
    user_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The answer's record is the second update (the first records the notification):
    # it fails, so the service logs that it could not keep the answer, naming the key.
    key = "secret-order-4711 <script>"
    fail(server, "update", skip=1)
    try:
        response = app.test_client().post(
            "/create",
            json={"user_id": user_id, "key": "new_message"},
            headers={"Idempotency-Key": key},
        )
    finally:
        heal(server)
    assert response.status_code == 201
    assert "could not record the answer of idempotency key sha256:" in caplog.text
    assert "4711" not in caplog.text


def test_a_write_conflict_inside_the_transaction_is_retried_not_a_503(
    app: Flask, server: MongoServer, database: tuple[str, Any], user_id: str, mode: str
) -> None:
    # The server labels a write conflict TransientTransactionError: the driver runs the
    # whole transaction again, if it is handed the driver's own error.
    if mode != "replica set":
        pytest.skip("transactions are a replica set's")
    _, db = database
    arm(
        server,
        {"times": 1},
        {
            "failCommands": ["update"],
            "errorCode": 112,  # WriteConflict
            "errorLabels": ["TransientTransactionError"],
        },
    )
    try:
        response = login(app.test_client(), user_id)
    finally:
        heal(server)
    assert response.status_code == 201, response.get_json()
    notification_id = response.get_json()["data"]["notification_id"]
    assert state(db, user_id) == ([notification_id], [("queued", notification_id)])
