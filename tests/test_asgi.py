"""The HTTP edge as served: granian + asgi.py over real sockets, slow and malformed clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from conftest import MongoServer
from pymongo import MongoClient

from notification_service.embedded import Child, free_port, start_service

CLIENT_TIMEOUT = 1.0
MAX_BODY = 4096


@dataclass
class Served:
    port: int
    child: Child

    def raw(self, data: bytes, *, half_close: bool = False, wait: float = 5.0) -> bytes:
        """Send bytes as they are; return everything the server answers until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as sock:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            received = b""
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                while chunk := sock.recv(65536):
                    received += chunk
            return received

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, answer = self.call(method, path, body)
        return status, answer

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5,
    ) -> tuple[int, http.client.HTTPMessage, Any]:
        """The status, headers and JSON of one request on a connection of its own."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            sent = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=data, headers={**sent, **(headers or {})})
            response = conn.getresponse()
            raw = response.read()
            return response.status, response.headers, json.loads(raw) if raw else None
        finally:
            conn.close()


def start_served(
    mongo_server: MongoServer,
    run_dir: Path,
    client_timeout: float = CLIENT_TIMEOUT,
    **settings: str,
) -> Served:
    """The service as `serve` runs it (granian, asgi.py), with short client timeouts."""
    env = {
        "DB_URI": mongo_server.uri("asgi_edge"),
        "SMTP_HOST": "127.0.0.1",  # never used: no dispatchers
        "DISPATCHER_THREADS": "0",
        "WEB_WORKERS": "1",
        "CLIENT_TIMEOUT_SECONDS": str(client_timeout),
        "MAX_BODY_BYTES": str(MAX_BODY),
        "LOG_LEVEL": "WARNING",
        **settings,
    }
    port = free_port()
    child, _ = start_service(env, run_dir, port=port)
    return Served(port, child)


@pytest.fixture(scope="module")
def served(mongo_server: MongoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = start_served(mongo_server, tmp_path_factory.mktemp("served"))
    yield server
    server.child.stop()


@pytest.fixture
def user(mongo_admin: Any) -> Iterator[str]:
    users = mongo_admin["asgi_edge"].users
    oid = users.insert_one({"email": "user@example.com"}).inserted_id
    yield str(oid)
    users.delete_one({"_id": oid})


def stored(mongo_admin: Any, user: str) -> list[Any]:
    doc = mongo_admin["asgi_edge"].users.find_one({"_id": ObjectId(user)})
    return list(doc.get("notifications", []))


def status_and_json(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


def create_request(user: str, *, length: int | None = None, extra: bytes = b"") -> bytes:
    body = json.dumps({"user_id": user, "key": "new_post"}).encode()
    return (
        b"POST /create HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n" % (length or len(body), extra) + body
    )


def test_two_hundred_slow_clients_neither_block_others_nor_stay_open(
    served: Served, user: str
) -> None:
    slow: list[socket.socket] = []
    try:
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=5)
            if i % 2:
                sock.sendall(b"GET /list?user_id=" + user.encode() + b" HT")  # half a line
            else:
                sock.sendall(create_request(user, length=500))  # half a body
            slow.append(sock)
        for _ in range(20):
            started = time.monotonic()
            status, body = served.request("GET", f"/list?user_id={user}")
            assert status == 200 and body["success"] is True
            assert time.monotonic() - started < 1.0
        # Every slow socket is cut off after the client timeout (with a margin for load);
        # a recv that times out instead fails the test.
        deadline = time.monotonic() + CLIENT_TIMEOUT + 10
        answers = []
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    received += chunk
            answers.append(received)
    finally:
        for sock in slow:
            sock.close()
    # Half a body is answered 408 (in the JSON shape); half a line is just closed.
    assert all(status_and_json(a)[0] == 408 for a in answers[0::2])
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in answers[1::2])


def test_a_chunked_body_over_the_limit_is_413_and_stores_nothing(
    served: Served, user: str, mongo_admin: Any
) -> None:
    body = json.dumps({"user_id": user, "key": "new_post", "data": {"x": "y" * 8000}}).encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
        for i in range(0, len(body), 1000)
    )
    raw = served.raw(
        b"POST /create HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )
    status, answer = status_and_json(raw)
    assert status == 413 and answer["error"]["code"] == "payload_too_large"
    assert stored(mongo_admin, user) == []


def test_a_chunked_body_within_the_limit_is_served(
    served: Served, user: str, mongo_admin: Any
) -> None:
    body = json.dumps({"user_id": user, "key": "new_post"}).encode()
    raw = served.raw(
        b"POST /create HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    assert status_and_json(raw)[0] == 201
    assert len(stored(mongo_admin, user)) == 1


def test_a_declared_length_over_the_limit_is_413_at_once(served: Served, user: str) -> None:
    started = time.monotonic()
    raw = served.raw(create_request(user, length=MAX_BODY + 1))
    status, answer = status_and_json(raw)
    assert status == 413 and answer["error"]["code"] == "payload_too_large"
    assert time.monotonic() - started < CLIENT_TIMEOUT  # not waiting for the body


def test_a_body_shorter_than_its_length_is_400_and_stores_nothing(
    served: Served, user: str, mongo_admin: Any
) -> None:
    # The JSON is complete and valid: only the framing says something is missing.
    raw = served.raw(create_request(user, length=200), half_close=True)
    status, answer = status_and_json(raw)
    assert status == 400 and answer["error"]["code"] == "incomplete_body"
    assert stored(mongo_admin, user) == []


def test_a_body_that_stops_coming_is_408_and_stores_nothing(
    served: Served, user: str, mongo_admin: Any
) -> None:
    started = time.monotonic()
    raw = served.raw(create_request(user, length=200))
    status, answer = status_and_json(raw)
    assert status == 408 and answer["error"]["code"] == "request_timeout"
    assert CLIENT_TIMEOUT <= time.monotonic() - started < CLIENT_TIMEOUT + 3
    assert stored(mongo_admin, user) == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nBad Header Line\r\n\r\n",
        b"POST /create HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        b"POST /create HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    ],
)
def test_malformed_http_is_a_400_without_an_html_page(served: Served, request_bytes: bytes) -> None:
    raw = served.raw(request_bytes)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    # The server answers these before the app exists for them: no body at all, or ours.
    assert body == b"" or json.loads(body)["success"] is False


def test_duplicate_json_keys_are_refused_over_the_wire(
    served: Served, user: str, mongo_admin: Any
) -> None:
    body = b'{"user_id": "%s", "key": "new_post", "key": "new_login"}' % user.encode()
    raw = served.raw(
        b"POST /create HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    status, answer = status_and_json(raw)
    assert status == 400 and answer["error"]["code"] == "invalid_json"
    assert stored(mongo_admin, user) == []


def test_options_over_the_wire_is_204_with_allow(served: Served) -> None:
    raw = served.raw(b"OPTIONS /read HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204")
    assert b"\r\nallow: " in head.lower() and body == b""


def test_query_and_path_survive_the_translation_to_wsgi(served: Served, user: str) -> None:
    status, body = served.request("GET", f"/list?user_id={user.upper()}&limit=0")
    assert status == 200 and body["data"]["request"]["user_id"] == user
    status, body = served.request("GET", "/%D0%BD%D0%B5%D1%82?x=%00")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_sigterm_lets_a_request_in_flight_finish(
    mongo_server: MongoServer, user: str, mongo_admin: Any, tmp_path: Path
) -> None:
    server = start_served(mongo_server, tmp_path, client_timeout=10)
    try:
        request = create_request(user)
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(request[:-10])  # the request has begun: headers and most of the body
            time.sleep(0.5)
            server.child.process.terminate()
            time.sleep(0.5)
            sock.sendall(request[-10:])
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    received += chunk
        assert status_and_json(received)[0] == 201
        assert len(stored(mongo_admin, user)) == 1
        assert server.child.process.wait(30) == 0
    finally:
        server.child.stop()


def test_header_names_with_underscores_are_ignored(served: Served, user: str) -> None:
    # Content_Type would otherwise pass for Content-Type, X_Request_ID for X-Request-ID.
    body = json.dumps({"user_id": user, "key": "new_post"}).encode()
    raw = served.raw(
        b"POST /create HTTP/1.1\r\nHost: t\r\nContent_Type: application/json\r\n"
        b"X_Request_ID: smuggled\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body
    )
    status, answer = status_and_json(raw)
    assert status == 400 and answer["error"]["code"] == "unsupported_content_type"
    assert b"smuggled" not in raw


def test_with_the_database_frozen_every_request_answers_within_db_timeout(
    user: str, tmp_path: Path
) -> None:
    # More requests than threads: those that wait for a thread must not get a fresh
    # DB_TIMEOUT_MS once they start, or the last of them would answer after three times it.
    frozen = MongoServer.start()
    server = start_served(frozen, tmp_path, WEB_THREADS="2", DB_TIMEOUT_MS="1500")
    try:
        assert server.request("GET", f"/list?user_id={user}")[0] == 404  # connected
        frozen.freeze()
        results: list[tuple[int, float]] = []

        def one() -> None:
            started = time.monotonic()
            status, _ = server.request("GET", f"/list?user_id={user}")
            results.append((status, time.monotonic() - started))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(status for status, _ in results) == [503] * 8
        assert max(elapsed for _, elapsed in results) < 1.5 + 1.0, results
    finally:
        frozen.stop()
        server.child.stop()


# --- the deadline holds for a request that waits for a thread -----------------------


@pytest.fixture(scope="module")
def failpoint_server() -> Iterator[MongoServer]:
    server = MongoServer.start("--enable-test-commands")
    yield server
    server.stop()


def insert_users(server: MongoServer, count: int) -> list[str]:
    with MongoClient(server.uri("asgi_edge")) as direct:
        users = direct["asgi_edge"].users
        ids = users.insert_many([{"email": "user@example.com"} for _ in range(count)]).inserted_ids
    return [str(oid) for oid in ids]


def requests_counted(server: Served, method: str, route: str, status: int) -> float:
    """notification_service_http_requests_total of one series, from GET /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    series = (
        f'notification_service_http_requests_total{{method="{method}",route="{route}",'
        f'status="{status}"}} '
    )
    return sum(float(line[len(series) :]) for line in text.splitlines() if line.startswith(series))


def test_a_request_no_thread_takes_by_its_deadline_is_answered_503_and_never_run(
    tmp_path: Path,
) -> None:
    # The one thread is held by a fan-out (its own budget: ten times DB_TIMEOUT_MS) on a
    # frozen database; a create that waits behind it must not wait that long.
    frozen = MongoServer.start()
    server = start_served(frozen, tmp_path, WEB_THREADS="1", DB_TIMEOUT_MS="500")
    fan_outs: list[int] = []
    try:
        held, queued = insert_users(frozen, 2)
        assert server.request("GET", f"/count?user_id={queued}")[0] == 200  # connected
        frozen.freeze()
        fan_out = threading.Thread(
            target=lambda: fan_outs.append(
                server.call("POST", "/create", {"user_ids": [held], "key": "new_post"}, timeout=30)[
                    0
                ]
            )
        )
        fan_out.start()
        time.sleep(0.3)  # the fan-out has the thread
        started = time.monotonic()
        status, headers, answer = server.call(
            "POST",
            "/create",
            {"user_id": queued, "key": "new_post"},
            headers={"X-Request-ID": "queued-1"},
            timeout=30,
        )
        elapsed = time.monotonic() - started
        frozen.thaw()
        fan_out.join(30)
        # Served after the fan-out, through the same one thread: a create still queued
        # would have run (and been counted) before it.
        refused = requests_counted(server, "POST", "/create", 503)
        with MongoClient(frozen.uri("asgi_edge")) as direct:
            doc = direct["asgi_edge"].users.find_one({"_id": ObjectId(queued)})
    finally:
        frozen.stop()
        server.child.stop()
    assert elapsed < 0.5 + 1.0, f"answered after {elapsed:.2f}s"
    assert status == 503
    assert answer == {
        "success": False,
        "error": {
            "code": "database_unavailable",
            "message": answer["error"]["message"],
            "details": [],
        },
    }
    assert headers["Retry-After"] and headers["X-Request-ID"] == "queued-1"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert fan_outs == [201]
    assert refused == 1  # the front's answer; the app never ran the create
    assert "notifications" not in doc


def hold_updates(server: MongoServer, milliseconds: int) -> None:
    """Every `update` command (a fan-out's bulk write) waits `milliseconds` first."""
    with MongoClient(server.uri("admin"), directConnection=True) as admin:
        admin.admin.command(
            "configureFailPoint",
            "failCommand",
            mode="alwaysOn",
            data={"failCommands": ["update"], "blockConnection": True, "blockTimeMS": milliseconds},
        )


def release_updates(server: MongoServer) -> None:
    with MongoClient(server.uri("admin"), directConnection=True) as admin:
        admin.admin.command("configureFailPoint", "failCommand", mode="off")


def test_fan_outs_cannot_take_every_thread(failpoint_server: MongoServer, tmp_path: Path) -> None:
    # Four threads: at most two run fan-outs; the others are refused at once, and a
    # badge's GET /count still finds a thread.
    server = start_served(failpoint_server, tmp_path, WEB_THREADS="4", DB_TIMEOUT_MS="1000")
    users = insert_users(failpoint_server, 3)
    answers: list[tuple[int, http.client.HTTPMessage, Any]] = []

    def fan_out() -> None:
        body = {"user_ids": users, "key": "new_post"}
        answers.append(server.call("POST", "/create", body, timeout=30))

    try:
        assert server.request("GET", f"/count?user_id={users[0]}")[0] == 200  # connected
        hold_updates(failpoint_server, 2500)
        threads = [threading.Thread(target=fan_out) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        status, _, counted = server.call("GET", f"/count?user_id={users[0]}", timeout=30)
        elapsed = time.monotonic() - started
        for thread in threads:
            thread.join(30)
    finally:
        release_updates(failpoint_server)
        server.child.stop()
    assert status == 200, counted
    assert elapsed < 1.0 + 1.0, f"answered after {elapsed:.2f}s"
    assert sorted(status for status, _, _ in answers) == [201, 201, 503, 503, 503, 503]
    for status, headers, answer in answers:
        if status == 503:
            assert answer["error"]["code"] == "too_many_fan_outs"
            assert int(headers["Retry-After"]) > 0
