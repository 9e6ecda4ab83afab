"""GET /stream over real HTTP: granian + asgi.py, against a replica set (change streams)
and a standalone server (the polling fallback), with several server processes."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from clocks import FakeClock
from conftest import DatabaseLink, MongoServer, free_port
from flask.testing import FlaskClient
from pymongo import MongoClient

from notification_service.__main__ import web_server_argv
from notification_service.asgi import create_asgi_app
from notification_service.clock import SYSTEM_CLOCK
from notification_service.config import Config
from notification_service.notification_handler import api
from notification_service.openapi import document
from notification_service.runtime import build_runtime
from notification_service.server import runtime_of
from notification_service.stream_watcher import Watcher

DATABASE = "stream_t"
HEARTBEAT = 0.5
POLL = 0.2
KEY = "stream-test-key-0123456789"
ZERO = "0" * 24


# --- the servers ----------------------------------------------------------------------


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            sent = {**(headers or {})}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                sent["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            raw = response.read()
            answer = json.loads(raw) if raw else None
            return response.status, answer, {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    def create(self, user_id: str, data: dict[str, Any] | None = None) -> str:
        status, body, _ = self.call("POST", "/create", {"user_id": user_id, "key": "new_post",
                                                        "data": data or {}})  # fmt: skip
        assert status == 201, body
        notification_id: str = body["data"]["notification_id"]
        return notification_id

    def worker(self) -> int:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return int(children.read_text().split()[0])

    def threads(self) -> int:
        return len(list(Path(f"/proc/{self.worker()}/task").iterdir()))

    def access_lines(self, route: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if (
                    entry.get("logger") == "notification_service.access"
                    and entry.get("route") == route
                ):
                    lines.append(entry)
        return lines

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve(mongo: MongoServer, log: Path, **settings: str) -> Server:
    port = free_port()
    config = replace(Config(), port=port, web_workers=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SMTP_", "API_"))}
    env.update(
        DB_URI=mongo.uri(DATABASE),
        SMTP_HOST="127.0.0.1",  # never used: no dispatchers
        DISPATCHER_THREADS="0",
        PORT=str(port),
        WEB_THREADS="2",
        LOG_LEVEL="INFO",
        LOG_FORMAT="json",
        STREAM_HEARTBEAT_SECONDS=str(HEARTBEAT),
        STREAM_POLL_SECONDS=str(POLL),
    )
    env.update(settings)
    with log.open("ab") as sink:
        # granian writes its own lines to stdout: they are in the log too.
        process = subprocess.Popen(web_server_argv(config), env=env, stdout=sink, stderr=sink)
    server = Server(port, process, log)
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "the web server exited"
        with contextlib.suppress(OSError):
            if server.call("GET", "/health")[0] == 200:
                return server
        assert time.monotonic() < deadline, "the web server did not answer"
        time.sleep(0.2)


@dataclass
class Deployment:
    mode: str
    mongo: MongoServer
    a: Server
    b: Server  # a second process on the same database

    def user(self) -> str:
        with MongoClient(self.mongo.uri(DATABASE)) as client:
            return str(client[DATABASE].users.insert_one({"email": "u@example.com"}).inserted_id)

    def open_cursors(self) -> int:
        with MongoClient(self.mongo.uri("admin")) as client:
            total: int = client.admin.command("serverStatus")["metrics"]["cursor"]["open"]["total"]
            return total


@pytest.fixture(scope="module")
def standalone() -> Iterator[MongoServer]:
    server = MongoServer.start("--standalone")
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["change_streams", "polling"])
def deployment(
    request: pytest.FixtureRequest,
    mongo_server: MongoServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    mongo = mongo_server if request.param == "change_streams" else request.getfixturevalue(
        "standalone"
    )  # fmt: skip
    logs = tmp_path_factory.mktemp(request.param)
    a = serve(mongo, logs / "a.log")
    b = serve(mongo, logs / "b.log")
    yield Deployment(request.param, mongo, a, b)
    a.stop()
    b.stop()


# --- an EventSource of our own ---------------------------------------------------------


class Stream:
    """One GET /stream, read event by event as the server sends them."""

    def __init__(self, server: Server, user_id: str, headers: dict[str, str] | None = None):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        self.conn.request("GET", f"/stream?user_id={user_id}", headers=headers or {})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}
        self.error = json.loads(self.response.read()) if self.status != 200 else None

    def next(self, timeout: float = 5.0, *, comments: bool = False) -> dict[str, Any]:
        """The next event (a dict of its fields, `data` decoded), or comment."""
        assert self.conn.sock is not None
        self.conn.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout  # heartbeats would keep readline going
        while time.monotonic() < deadline:
            fields: dict[str, Any] = {}
            while (line := self.response.readline()) not in (b"\n", b""):
                name, _, value = line.decode().rstrip("\n").partition(":")
                fields[name or "comment"] = value.removeprefix(" ")
            if line == b"" and not fields:
                return {"end": True}
            if "data" in fields:
                fields["data"] = json.loads(fields["data"])
                return fields
            if comments and "comment" in fields:
                return fields
        raise TimeoutError("no event")

    def events(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        return [self.next(timeout) for _ in range(count)]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def streams() -> Iterator[Callable[..., Stream]]:
    opened: list[Stream] = []

    def open_(server: Server, user_id: str, headers: dict[str, str] | None = None) -> Stream:
        stream = Stream(server, user_id, headers)
        opened.append(stream)
        return stream

    yield open_
    for stream in opened:
        stream.close()


def counts(event: dict[str, Any]) -> tuple[str, int, int]:
    assert event.get("event") == "counts", event
    return event["id"], event["data"]["elements"], event["data"]["new"]


# --- what the stream says --------------------------------------------------------------


def test_create_read_read_all_and_delete_each_reach_the_stream(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    server, user = deployment.a, deployment.user()
    stream = streams(server, user)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert counts(stream.next()) == (ZERO, 0, 0)

    first = server.create(user, {"title": "one"})
    created, after = stream.events(2)
    assert (created["event"], created["id"]) == ("notification", first)
    _, listed, _ = server.call("GET", f"/list?user_id={user}")
    assert created["data"] == listed["data"]["list"][0]  # the same JSON as /list's
    assert counts(after) == (first, 1, 1)

    second = server.create(user)
    assert stream.next()["id"] == second
    assert counts(stream.next()) == (second, 2, 2)
    server.call("POST", f"/read?user_id={user}&notification_id={first}")
    assert counts(stream.next()) == (second, 2, 1)
    server.call("POST", "/read-all", {"user_id": user})
    assert counts(stream.next()) == (second, 2, 0)
    server.call("POST", "/delete", {"user_id": user, "notification_id": second})
    # The newest one it was told of is gone: the id is now the newest still there.
    assert counts(stream.next()) == (first, 1, 0)


def test_a_collapse_sends_the_element_again_with_its_id_and_no_counts_unchanged(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    server, user = deployment.a, deployment.user()
    stream = streams(server, user)
    stream.next()
    body = {"user_id": user, "key": "new_post", "collapse_key": "thread-1", "data": {"n": 1}}
    kept = server.call("POST", "/create", body)[1]["data"]["notification_id"]
    created, _ = stream.events(2)
    assert (created["id"], created["data"]["count"], created["data"]["collapse_key"]) == (
        kept, 1, "thread-1"
    )  # fmt: skip
    other = server.create(user)
    stream.events(2)
    status, answer, _ = server.call("POST", "/create", {**body, "data": {"n": 2}})
    assert (status, answer["data"]["collapsed"]) == (201, True)
    again = stream.next()
    assert (again["event"], again["id"]) == ("notification", kept)
    assert (again["data"]["count"], again["data"]["data"]) == (2, {"n": 2})
    _, listed, _ = server.call("GET", f"/list?user_id={user}")
    assert again["data"] == listed["data"]["list"][0]  # the same JSON as /list's
    # The counts did not change: no counts event, the next thing is a heartbeat.
    assert stream.next(comments=True) == {"comment": "keep-alive"}
    stream.close()
    # A client that had seen only `other` gets the collapsed one again when it resumes.
    resumed = streams(server, user, {"Last-Event-ID": other})
    replayed = resumed.next()
    assert (replayed["id"], replayed["data"]["count"]) == (kept, 2)
    assert counts(resumed.next()) == (kept, 2, 2)


def test_a_fan_out_reaches_the_stream_of_each_user(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    users = [deployment.user() for _ in range(3)]
    opened = [streams(deployment.a, user) for user in users]
    for stream in opened:
        stream.next()
    status, body, _ = deployment.a.call("POST", "/create", {"user_ids": users, "key": "new_post"})
    assert status == 201
    made = {r["user_id"]: r["notification_id"] for r in body["data"]["results"]}
    for user, stream in zip(users, opened, strict=True):
        notification, after = stream.events(2)
        assert notification["data"]["user_id"] == user
        assert notification["id"] == made[user]
        assert counts(after) == (made[user], 1, 1)


def test_a_write_through_one_process_reaches_a_stream_held_by_another(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    user = deployment.user()
    on_a, on_b = streams(deployment.a, user), streams(deployment.b, user)
    on_a.next(), on_b.next()
    made = deployment.b.create(user)
    assert on_a.next()["id"] == made
    assert counts(on_a.next()) == (made, 1, 1)
    assert on_b.next()["id"] == made
    made = deployment.a.create(user)
    on_b.next()  # its counts, then the new one
    assert on_b.next()["id"] == made


def test_a_stream_carries_only_its_own_users_events(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    mine, other = deployment.user(), deployment.user()
    stream = streams(deployment.a, mine)
    stream.next()
    for _ in range(3):
        deployment.a.create(other, {"secret": "not yours"})
    deployment.b.call("POST", "/read-all", {"user_id": other})
    made = deployment.a.create(mine)
    notification = stream.next()
    assert (notification["id"], notification["data"]["user_id"]) == (made, mine)
    assert counts(stream.next()) == (made, 1, 1)


def test_last_event_id_replays_what_was_missed_oldest_first(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    server, user = deployment.a, deployment.user()
    seen = server.create(user)
    stream = streams(server, user)
    last = stream.next()["id"]
    assert last == seen
    stream.close()
    missed = [server.create(user), server.create(user)]

    again = streams(server, user, {"Last-Event-ID": last})
    replayed = again.events(2)
    assert [(e["event"], e["id"]) for e in replayed] == [("notification", m) for m in missed]
    assert counts(again.next()) == (missed[-1], 3, 3)
    # Live again: the next one comes as it is made.
    made = server.create(user)
    assert again.next()["id"] == made


def test_a_resume_point_deleted_meanwhile_replays_by_time(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    server, user = deployment.a, deployment.user()
    stream = streams(server, user)
    stream.next()
    server.create(user)
    gone = stream.next()["id"]
    stream.close()
    server.call("POST", "/delete", {"user_id": user, "notification_id": gone})
    missed = server.create(user)
    again = streams(server, user, {"Last-Event-ID": gone})
    assert again.next()["id"] == missed
    assert counts(again.next()) == (missed, 1, 1)


def test_an_empty_inbox_resumes_from_zero_with_everything_made_since(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    server, user = deployment.a, deployment.user()
    stream = streams(server, user)
    assert stream.next()["id"] == ZERO
    stream.close()
    made = server.create(user)
    again = streams(server, user, {"Last-Event-ID": ZERO})
    assert again.next()["id"] == made


def test_a_quiet_stream_gets_a_heartbeat_comment(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    stream = streams(deployment.a, deployment.user())
    stream.next()
    started = time.monotonic()
    assert stream.next(comments=True) == {"comment": "keep-alive"}
    assert time.monotonic() - started < HEARTBEAT + 1


def test_a_stream_catches_up_once_the_database_answers_again(
    deployment: Deployment, tmp_path: Path, streams: Callable[..., Stream]
) -> None:
    link = DatabaseLink(deployment.mongo.port)
    server = serve(deployment.mongo, tmp_path / "log", DB_URI=link.uri(DATABASE),
                   DB_TIMEOUT_MS="1000")  # fmt: skip
    try:
        user = deployment.user()
        stream = streams(server, user)
        stream.next()
        server.create(user)
        stream.events(2)  # the watcher follows the user
        link.cut()
        time.sleep(1.5)  # the watcher has lost its change stream, or its polls fail
        made = deployment.b.create(user)  # through a process that still reaches it
        assert stream.next(comments=True) == {"comment": "keep-alive"}  # still open
        link.heal()
        assert stream.next(timeout=15)["id"] == made
        assert counts(stream.next()) == (made, 2, 2)
    finally:
        server.stop()
        link.close()


def test_a_deleted_user_ends_the_stream(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    user = deployment.user()
    stream = streams(deployment.a, user)
    stream.next()
    with MongoClient(deployment.mongo.uri(DATABASE)) as client:
        client[DATABASE].users.delete_one({"_id": ObjectId(user)})
    assert stream.next() == {"end": True}


def test_text_in_the_data_cannot_forge_events(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    server, user = deployment.a, deployment.user()
    stream = streams(server, user)
    stream.next()
    forged = 'x\n\nid: 000000000000000000000001\nevent: counts\ndata: {"elements": 99}\n\r\n'
    made = server.create(user, {"title": forged, "\u2028": "\r"})
    notification, after = stream.events(2)
    assert notification["id"] == made and notification["data"]["data"]["title"] == forged
    assert counts(after) == (made, 1, 1)


# --- what is refused before a stream starts --------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "",
        "user_id=",
        "user_id=123",
        "user_id=0123456789abcdef0123456",  # 23
        "user_id=0123456789abcdef012345678",  # 25
        "user_id=0123456789abcdef0123456g",
        "user_id[$ne]=x",
        "user_id=%7B%22%24ne%22%3A+null%7D",  # {"$ne": null}
        "user_id=0123456789abcdef01234567%0A",
        "user_id=0123456789abcdef01234567%0D%0Aevent:+x",
        "user_id=0123456789abcdef01234567&user_id=0123456789abcdef01234568",
        "user_id=%D9%A0123456789abcdef0123456",  # an Arabic-Indic digit
    ],
)
def test_a_hostile_user_id_is_422_json_and_opens_nothing(
    deployment: Deployment, query: str
) -> None:
    status, body, headers = deployment.a.call("GET", f"/stream?{query}")
    assert status == 422, body
    assert body["success"] is False and body["error"]["code"] == "validation_failed"
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"]


def test_an_unknown_user_is_404_json(deployment: Deployment) -> None:
    status, body, headers = deployment.a.call("GET", f"/stream?user_id={ObjectId()}",
                                              headers={"X-Request-ID": "mine-1"})  # fmt: skip
    assert status == 404 and body["error"]["code"] == "user_not_found"
    assert headers["x-request-id"] == "mine-1"


@pytest.mark.parametrize(
    "value",
    [
        "x",
        "0123456789abcdef01234567 event: counts",
        "0123456789abcdef01234567\tdata: {}",
        "0123456789abcdef0123456",
        "../../0123456789abcdef01",
        "0123456789abcdef01234567%0d%0aevent:x",
    ],
)
def test_a_last_event_id_that_is_not_ours_is_422(deployment: Deployment, value: str) -> None:
    user = deployment.user()
    status, body, _ = deployment.a.call("GET", f"/stream?user_id={user}",
                                        headers={"Last-Event-ID": value})  # fmt: skip
    assert status == 422
    assert body["error"]["details"][0]["field"] == "Last-Event-ID"


def test_an_unknown_last_event_id_is_never_echoed(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    server, user = deployment.a, deployment.user()
    made = server.create(user)
    stranger = "FFFFFFFFFFFFFFFFFFFFFFFF"  # an id from a second far in the future
    stream = streams(server, user, {"Last-Event-ID": stranger})
    assert counts(stream.next()) == (made, 1, 1)  # nothing replayed, our own id


# --- the limit, leaks, the log, shutdown -----------------------------------------------


@pytest.fixture(scope="module")
def guarded(
    mongo_server: MongoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A process with API keys and room for two streams."""
    server = serve(mongo_server, tmp_path_factory.mktemp("guarded") / "log",
                   API_KEYS=KEY, STREAM_MAX_PER_PROCESS="2")  # fmt: skip
    yield server
    server.stop()


def a_user(mongo: MongoServer) -> str:
    with MongoClient(mongo.uri(DATABASE)) as client:
        return str(client[DATABASE].users.insert_one({"email": "u@example.com"}).inserted_id)


def test_the_api_key_is_required(
    guarded: Server, mongo_server: MongoServer, streams: Callable[..., Stream]
) -> None:
    user = a_user(mongo_server)
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY}):
        refused = streams(guarded, user, headers)
        assert refused.status == 401 and refused.error["error"]["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
    assert streams(guarded, user, {"Authorization": f"Bearer {KEY}"}).status == 200


def test_past_the_limit_is_503_with_retry_after_and_a_freed_slot_is_taken_again(
    guarded: Server, mongo_server: MongoServer, streams: Callable[..., Stream]
) -> None:
    key = {"Authorization": f"Bearer {KEY}"}
    user = a_user(mongo_server)
    first, second = streams(guarded, user, key), streams(guarded, user, key)
    assert (first.status, second.status) == (200, 200)
    third = streams(guarded, user, key)
    assert third.status == 503
    assert third.error["error"]["code"] == "too_many_streams"
    assert third.headers["retry-after"] == "5" and third.headers["x-request-id"]
    # Ordinary requests are not limited.
    assert guarded.call("GET", f"/count?user_id={user}", headers=key)[0] == 200
    first.close()
    deadline = time.monotonic() + 5
    while (again := streams(guarded, user, key)).status != 200:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.1)
    assert counts(again.next())[1:] == (0, 0)


def settled_threads(server: Server) -> int:
    """The worker's thread count once it has stayed the same for a while."""
    last, since = server.threads(), time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() - since < 1.5:
        assert time.monotonic() < deadline, "the thread count never settled"
        time.sleep(0.1)
        now = server.threads()
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_clients_that_leave_leave_no_thread_subscription_cursor_or_slot(
    deployment: Deployment, tmp_path: Path, streams: Callable[..., Stream]
) -> None:
    # A process of its own, with one thread for the app: every other thread is the
    # server's, the driver's or the watcher's.
    server = serve(deployment.mongo, tmp_path / "log", WEB_THREADS="1",
                   STREAM_MAX_PER_PROCESS="30")  # fmt: skip
    try:
        users = [deployment.user() for _ in range(5)]
        assert server.call("GET", f"/count?user_id={users[0]}")[0] == 200
        base_threads = settled_threads(server)
        base_cursors = deployment.open_cursors()
        for round_ in range(2):  # all 30 slots, twice: each was freed
            held = [streams(server, users[i % 5]) for i in range(30)]
            assert [stream.status for stream in held] == [200] * 30, round_
            for stream in held:
                stream.next()
            # No thread per stream (the watcher's two), one change stream at most.
            assert server.threads() == base_threads + 2
            watching = 1 if deployment.mode == "change_streams" else 0
            assert deployment.open_cursors() == base_cursors + watching
            ended = len(server.access_lines("/stream"))
            for stream in held:
                stream.close()
            deadline = time.monotonic() + 10
            while len(server.access_lines("/stream")) < ended + 30:  # every handler ended
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert settled_threads(server) == base_threads
            assert deployment.open_cursors() == base_cursors
    finally:
        server.stop()


def test_one_access_line_when_the_stream_ends_without_the_query_string(
    deployment: Deployment, streams: Callable[..., Stream]
) -> None:
    server, user = deployment.b, deployment.user()
    before = len(server.access_lines("/stream"))
    stream = streams(server, user, {"X-Request-ID": "stream-42"})
    stream.next()
    time.sleep(0.3)
    assert len(server.access_lines("/stream")) == before  # not while it is open
    stream.close()
    deadline = time.monotonic() + 5
    while len(lines := server.access_lines("/stream")) == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    lines = server.access_lines("/stream")[before:]
    assert len(lines) == 1
    line = lines[0]
    assert (line["method"], line["path"], line["status"]) == ("GET", "/stream", 200)
    assert line["request_id"] == "stream-42" and line["duration_ms"] >= 300
    assert user not in json.dumps(line)
    # And it is counted in the metrics, as every other answered request is.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        scraped = conn.getresponse().read().decode()
    finally:
        conn.close()
    assert (
        'notification_service_http_requests_total{method="GET",route="/stream",status="200"}'
        in scraped
    )


def test_sigterm_ends_open_streams_and_the_server_stops_at_once(
    mongo_server: MongoServer, tmp_path: Path, streams: Callable[..., Stream]
) -> None:
    server = serve(mongo_server, tmp_path / "log", STREAM_HEARTBEAT_SECONDS="60")
    try:
        user = a_user(mongo_server)
        held = [streams(server, user) for _ in range(3)]
        for stream in held:
            stream.next()
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for stream in held:
            assert stream.next(timeout=10) == {"end": True}
        assert server.process.wait(20) == 0
        # Not the 30 s granian gives a worker before it kills it.
        assert time.monotonic() - started < 8
    finally:
        server.stop()


# --- without granian: the view alone, and expiry with a faked clock ---------------------


def parse(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for block in raw.decode().split("\n\n"):
        fields = dict(line.partition(": ")[::2] for line in block.splitlines() if line)
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


def test_under_plain_wsgi_the_answer_is_the_first_events(client: FlaskClient, user_id: str) -> None:
    made = client.post("/create", json={"user_id": user_id, "key": "new_post"}).get_json()
    response = client.get(f"/stream?user_id={user_id}", headers={"Last-Event-ID": ZERO})
    assert response.status_code == 200
    assert response.data.startswith(b"retry: ")  # EventSource comes back with its id
    events = parse(response.data)
    assert [e["event"] for e in events] == ["notification", "counts"]
    assert events[0]["id"] == made["data"]["notification_id"]


def test_an_expired_notification_changes_the_counts_without_a_write(
    make_config: Callable[..., Config], user_id: str
) -> None:
    clock = FakeClock()
    config = make_config(notifications_ttl_days=1, stream_heartbeat_seconds=0.2)
    edge = create_asgi_app(runtime=build_runtime(config, clock=clock))
    created = edge.wsgi_app.test_client().post(  # type: ignore[attr-defined]
        "/create", json={"user_id": user_id, "key": "new_post"}
    )
    assert created.status_code == 201

    async def scenario() -> list[dict[str, Any]]:
        sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        leaving = asyncio.Event()
        requests = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await leaving.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "method": "GET", "path": "/stream", "root_path": "",
                 "query_string": f"user_id={user_id}".encode(), "headers": [],
                 "http_version": "1.1", "scheme": "http"}  # fmt: skip
        task = asyncio.ensure_future(edge(scope, receive, sent.put))
        assert (await sent.get())["status"] == 200
        first = parse((await sent.get())["body"])
        clock.advance(timedelta(days=1, seconds=1).total_seconds())  # it has expired
        later: list[dict[str, Any]] = []
        while not later:
            later = parse((await asyncio.wait_for(sent.get(), 5))["body"])
        leaving.set()
        await asyncio.wait_for(task, 5)
        return first + later

    try:
        events = asyncio.run(scenario())
    finally:
        edge._close()
    assert [(e["event"], e["data"]) for e in events] == [
        ("counts", {"elements": 1, "new": 1}),
        ("counts", {"elements": 0, "new": 0}),
    ]


def test_the_stream_is_documented_as_an_event_stream() -> None:
    operation = document(api.endpoints, Config())["paths"]["/stream"]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    refs = [p.get("$ref") for p in operation["parameters"]]
    assert "#/components/parameters/LastEventId" in refs
    examples = operation["responses"]["503"]["content"]["application/json"]["examples"]
    assert set(examples) == {"too_many_streams", "database_unavailable"}
    assert "Retry-After" in operation["responses"]["503"]["headers"]
    assert {"401", "404", "422"} <= set(operation["responses"])


class _ClosingStore:
    """The real store, whose inbox read ends the last stream of the users it reads: a
    stream that closes while the watcher reads its user's inbox."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.watcher: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def feed_states(self, users: list[str], now: datetime) -> Any:
        states = self.store.feed_states(users, now)
        for user in users:
            self.watcher.unfollow(user)
        return states


def test_a_stream_closed_during_its_users_read_leaves_nothing_followed(
    client: FlaskClient, user_id: str
) -> None:
    services = runtime_of(client.application).services
    store = _ClosingStore(services.store)
    delivered: list[Any] = []
    watcher = Watcher(store, SYSTEM_CLOCK, 0.05, 100, delivered.append)  # type: ignore[arg-type]
    store.watcher = watcher
    try:
        watcher.follow(user_id)
        deadline = time.monotonic() + 5
        while not delivered and time.monotonic() < deadline:
            time.sleep(0.02)
        assert delivered, "the watcher never read the inbox"
        # Nothing is kept of a user no stream follows: state kept would grow for ever.
        assert user_id not in watcher._versions
    finally:
        watcher.close()
