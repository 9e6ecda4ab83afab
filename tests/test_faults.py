"""Durability: what every write asks of the database, and the database killed with
SIGKILL under load, then restarted on the same data.

The crash rounds are marked `faults`: `make test` skips them (a round takes 15-30 s);
`make faults` and .ci/run run them. FAULT_ROUNDS sets how many (default 6),
FAULT_CLIENTS how many client threads (default 32, as in the issue that found the loss).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from bson import ObjectId
from conftest import MongoServer, runtime
from pymongo import MongoClient, monitoring
from werkzeug.serving import BaseWSGIServer, make_server

from notification_service import embedded
from notification_service.config import Config
from notification_service.dispatcher import DispatchContext, Dispatcher, RateLimiter
from notification_service.email_sender import SmtpSender, SmtpSettings
from notification_service.server import create_app

ROUNDS = int(os.environ.get("FAULT_ROUNDS", "6"))
CLIENTS = int(os.environ.get("FAULT_CLIENTS", "32"))
USERS_PER_CLIENT = 4


@dataclass
class Answer:
    user_id: str
    status: int  # 0: no HTTP answer at all
    body: dict[str, Any] = field(default_factory=dict)
    after_restart: bool = False


@dataclass
class Load:
    """CLIENTS threads posting new_login creates until stopped, keeping every answer."""

    base_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    restarted: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)
    in_flight: int = 0

    def start(self) -> None:
        for _ in range(CLIENTS):
            users = [str(ObjectId()) for _ in range(USERS_PER_CLIENT)]
            thread = threading.Thread(target=self._client, args=(users,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self, users: list[str]) -> None:
        with requests.Session() as session:
            n = 0
            while not self.stop.is_set():
                user_id = users[n % len(users)]
                n += 1
                after = self.restarted.is_set()
                with self.lock:
                    self.in_flight += 1
                try:
                    response = session.post(
                        f"{self.base_url}/create",
                        json={"user_id": user_id, "key": "new_login"},
                        timeout=15,
                    )
                    answer = Answer(user_id, response.status_code, response.json(), after)
                except (requests.RequestException, ValueError):
                    answer = Answer(user_id, 0, after_restart=after)
                with self.lock:
                    self.in_flight -= 1
                    self.answers.append(answer)

    def created(self, *, after_restart: bool = False) -> list[Answer]:
        with self.lock:
            return [
                a
                for a in self.answers
                if a.status == 201 and (a.after_restart or not after_restart)
            ]

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


class WriteLog(monitoring.CommandListener):
    """The write concern of every write command to one database, while recording.

    A write inside a transaction carries none (the server refuses one there): its
    durability is the commit's, so the commit is recorded in its place.
    """

    WRITES = frozenset({"insert", "update", "delete", "findAndModify", "createIndexes"})

    def __init__(self) -> None:
        self.database: str | None = None
        self.seen: list[tuple[str, dict[str, Any] | None]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.database is None:
            return
        if event.command_name == "commitTransaction" or (
            event.database_name == self.database
            and event.command_name in self.WRITES
            and "autocommit" not in event.command  # not inside a transaction
        ):
            self.seen.append((event.command_name, event.command.get("writeConcern")))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture(scope="session")
def write_log() -> WriteLog:
    # pymongo has no way to unregister; the listener only records for `database`.
    log = WriteLog()
    monitoring.register(log)
    return log


@pytest.fixture(scope="module")
def standalone_server() -> Iterator[MongoServer]:
    """SecantusDB looking like a standalone mongod (no replica set) to the driver."""
    server = MongoServer.start("--standalone")
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("topology", "uri_options", "expected"),
    [
        ("replica set", "", {"w": "majority", "j": True}),
        ("standalone", "", {"w": "majority", "j": True}),
        ("replica set", "?w=1&journal=false", {"w": 1, "j": False}),
    ],
)
def test_every_write_carries_the_write_concern_on_every_path(
    topology: str,
    uri_options: str,
    expected: dict[str, Any],
    request: pytest.FixtureRequest,
    write_log: WriteLog,
    smtp_factory: Callable[..., Any],
    make_app: Callable[..., Any],
) -> None:
    fixture = "mongo_server" if topology == "replica set" else "standalone_server"
    server: MongoServer = request.getfixturevalue(fixture)
    name = f"wc_{ObjectId()}"
    smtp = smtp_factory(fail_first=1, fail_code=451)  # one retry, then sent
    config = Config(
        db_uri=server.uri(name) + uri_options,
        email="wc@example.com",
        dispatcher_threads=0,
        dispatch_backoff_base_seconds=0.01,
        dispatch_backoff_max_seconds=0.05,
        **smtp.config_kwargs(),
    )
    write_log.database, write_log.seen = name, []
    try:
        app = make_app(config)
        client = app.test_client()
        user_id = str(ObjectId())
        bodies = [{"user_id": user_id, "key": key} for key in ("new_login", "new_message")]
        bodies.append({"user_id": str(ObjectId()), "key": "registration"})
        # One with an Idempotency-Key: its record's claim and completion are writes too.
        created = [
            client.post("/create", json=body, headers={"Idempotency-Key": f"wc-{i}"} if i else {})
            for i, body in enumerate(bodies)
        ]
        assert [r.status_code for r in created] == [201, 201, 201]
        notification_id = created[0].get_json()["data"]["notification_id"]
        read = client.post(f"/read?user_id={user_id}&notification_id={notification_id}")
        assert read.status_code == 200
        email = {"to": "x@example.com", "subject": "s", "text": "t"}
        assert client.post("/email", json=email).status_code == 202
        services = runtime(app).services
        dispatcher = Dispatcher(
            context=DispatchContext(
                config, services.outbox, services.clock, services.store.has_notification
            ),
            sender=SmtpSender(SmtpSettings.from_config(config)),
            name="wc",
            limiter=RateLimiter(0),
            wake=threading.Event(),
            stopping=threading.Event(),
            rng=random.Random(1),
        )
        try:
            deadline = time.monotonic() + 10
            while services.outbox.backlog()["queued"] and time.monotonic() < deadline:
                dispatcher.dispatch_once() or time.sleep(0.02)
        finally:
            dispatcher.sender.close()
        with MongoClient(server.uri(name)) as direct:
            assert {r["status"] for r in direct[name].email_outbox.find()} == {"sent"}
            direct.drop_database(name)
    finally:
        write_log.database = None
    kinds = {command for command, _ in write_log.seen}
    # Records, user profiles, outbox inserts, claims, retries and sends all went out.
    assert {"insert", "update", "createIndexes"} <= kinds
    # new_login's record and email commit together where transactions exist.
    assert ("commitTransaction" in kinds) == (topology == "replica set")
    assert [(c, wc) for c, wc in write_log.seen if wc != expected] == []


def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    if not eventually(predicate, timeout):
        raise AssertionError(f"timed out waiting for {what}")


def serve(config: Config) -> tuple[BaseWSGIServer, threading.Thread, Any]:
    app = create_app(config)
    server = make_server("127.0.0.1", embedded.free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, runtime(app)


@pytest.mark.faults
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_every_201_survives_a_database_kill_with_one_email(
    round_: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(round_)
    monkeypatch.setenv("LOG_LEVEL", "WARNING")  # the sink would log every message
    run_dir, mail_dir = tmp_path / "run", tmp_path / "mail"
    # The database and the .eml sink exactly as `make run` starts them.
    db_child, uri = embedded.start_database(tmp_path / "db", run_dir)
    children = [db_child]
    sink, sink_port = embedded.start_mail_sink(mail_dir, run_dir)
    children.insert(0, sink)
    config = Config(
        db_uri=uri,
        email="crash@example.com",  # test mode: /create makes the users
        notifications_limit=500,  # nothing of a round is capped away
        dispatcher_threads=2,
        dispatch_poll_seconds=0.2,
        dispatch_lease_seconds=20,
        smtp_timeout=5,
        dispatch_backoff_base_seconds=0.2,
        dispatch_backoff_max_seconds=1,
        log_level="WARNING",
        smtp_host="127.0.0.1",
        smtp_port=sink_port,
        smtp_security="none",
    )
    server, server_thread, rt = serve(config)
    load = Load(f"http://127.0.0.1:{server.server_port}")
    try:
        try:
            load.start()
            kill_at = rng.randint(40, 160)
            wait_for(lambda: len(load.created()) >= kill_at, 60, f"{kill_at} creates")
            in_flight = load.in_flight
            os.kill(db_child.process.pid, signal.SIGKILL)
            db_child.process.wait()
            killed_after = len(load.created())
            time.sleep(rng.uniform(0, 1.0))
            # Started again the same way, on the same data and port.
            restarted, _ = embedded.start_database(
                tmp_path / "db", run_dir, port=urlsplit(uri).port
            )
            children.append(restarted)
            load.restarted.set()
            wait_for(
                lambda: len(load.created(after_restart=True)) >= 20, 60, "creates after restart"
            )
        finally:
            load.finish()
        created = load.created()
        failed = [a for a in load.answers if a.status != 201]
        with MongoClient(uri, tz_aware=True) as client:
            db = client[config.database_name]
            email_ids = [ObjectId(a.body["data"]["email_id"]) for a in created]

            # Everything still due goes out (a duplicate has its chance to show) before
            # the dispatchers stop.
            drained = eventually(
                lambda: (
                    db.email_outbox.count_documents({"status": {"$in": ["queued", "sending"]}}) == 0
                ),
                config.dispatch_lease_seconds + 40,
            )
            time.sleep(1.0)
            rt.close()
            records = {r["_id"]: r for r in db.email_outbox.find({"_id": {"$in": email_ids}})}
            stored = {
                user["_id"]: {n["id"] for n in user.get("notifications", [])}
                for user in db.users.find()
            }
        received = Counter(
            message_from_bytes(eml.read_bytes())["Message-ID"] for eml in mail_dir.glob("*.eml")
        )
        lost_records, lost_emails, lost_notifications = [], [], []
        for answer in created:
            data = answer.body["data"]
            if data["notification_id"] not in stored.get(ObjectId(answer.user_id), set()):
                lost_notifications.append(data["notification_id"])
            record = records.get(ObjectId(data["email_id"]))
            if record is None:
                lost_records.append(data["email_id"])
            elif received[record["message_id"]] != 1:
                lost_emails.append((data["email_id"], received[record["message_id"]]))
        duplicates = {mid: n for mid, n in received.items() if n > 1}
        summary = (
            f"round {round_}: {len(created)} answered 201 ({killed_after} before the kill), "
            f"{len(failed)} not, {in_flight} in flight at the kill; "
            f"{len(received)} distinct emails received; lost: "
            f"{len(lost_notifications)} notifications, {len(lost_records)} outbox records, "
            f"{len(lost_emails)} emails not received exactly once; "
            f"{sum(duplicates.values()) - len(duplicates)} duplicate sends; outbox "
            f"{'drained' if drained else 'NOT drained'}, statuses "
            f"{dict(Counter(r['status'] for r in records.values()))}"
        )
        print(summary)
        assert in_flight, "no request was in flight: the kill did not happen under load"
        assert drained and not (lost_notifications or lost_records or lost_emails or duplicates), (
            summary
        )
    finally:
        rt.close()
        server.shutdown()
        server_thread.join(10)
        for child in reversed(children):
            child.stop()
