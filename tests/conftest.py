"""Shared fixtures: a real SecantusDB server per session, a fresh database per test.

Chained small fixtures, flaskr style: mongo_server -> db_uri -> config -> app -> client.
A test that needs other settings builds its own with `make_config(...)`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from flask import Flask
from flask.testing import FlaskClient
from pymongo import MongoClient

from notification_service.config import Config
from notification_service.embedded import Child, free_port, start_database
from notification_service.runtime import Runtime
from notification_service.server import create_app, runtime_of

pytest_plugins = ("smtp_fixtures",)


def pytest_configure(config: pytest.Config) -> None:
    """Keep a developer's exported settings away from the services the tests start
    (embedded.start_service passes os.environ on, as `make run` must): every variable
    .env.example documents, and the metrics directory `serve` would share."""
    example = Path(__file__).resolve().parent.parent / ".env.example"
    names = re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example.read_text(), re.MULTILINE)
    for name in [*names, "PROMETHEUS_MULTIPROC_DIR"]:
        os.environ.pop(name, None)


@dataclass
class MongoServer:
    """SecantusDB in memory on a free port, started as `make run` starts it
    (embedded.start_database); `freeze`/`thaw` stop and continue it."""

    port: int
    child: Child

    @classmethod
    def start(cls, *extra: str) -> MongoServer:
        port = free_port()
        # A pid file directory of its own: several servers run at once.
        child, _ = start_database(None, Path(tempfile.mkdtemp()), port, extra=extra)
        return cls(port, child)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.process

    def uri(self, database: str) -> str:
        return f"mongodb://127.0.0.1:{self.port}/{database}"

    def freeze(self) -> None:
        """SIGSTOP, and wait until every thread has really stopped (it is asynchronous)."""
        self.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not all(state == "T" for state in self._thread_states()):
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not stop")
            time.sleep(0.01)

    def _thread_states(self) -> list[str]:
        states = []
        for stat in Path(f"/proc/{self.process.pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):
                # The state follows the parenthesised command name, which may hold spaces.
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        return states

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGKILL: the data is in memory, to be thrown away, and a SIGTERM costs 2 s
        (SecantusDB's graceful stop) at the end of every module with a server of its own."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.child.stop()
        shutil.rmtree(self.child.pidfile.parent)


@pytest.fixture(scope="session")
def mongo_server() -> Iterator[MongoServer]:
    server = MongoServer.start()
    yield server
    server.stop()


@pytest.fixture
def own_server() -> Iterator[MongoServer]:
    """A server of this test's own, so freezing it cannot disturb other tests."""
    server = MongoServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_admin(mongo_server: MongoServer) -> Iterator[MongoClient[dict[str, Any]]]:
    with MongoClient(mongo_server.uri("admin"), tz_aware=True) as client:
        yield client


@pytest.fixture
def db_name(mongo_admin: MongoClient[dict[str, Any]]) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    mongo_admin.drop_database(name)


@pytest.fixture
def db_uri(mongo_server: MongoServer, db_name: str) -> str:
    return mongo_server.uri(db_name)


@pytest.fixture
def db(mongo_admin: MongoClient[dict[str, Any]], db_name: str) -> Any:
    """Direct access to the test's database, to arrange and to check what was stored."""
    return mongo_admin[db_name]


@pytest.fixture
def make_config(db_uri: str) -> Callable[..., Config]:
    """Config for this test's database; dispatchers off unless a test turns them on."""
    base = Config(db_uri=db_uri, dispatcher_threads=0, db_timeout_ms=3000)

    def make(**overrides: Any) -> Config:
        return replace(base, **overrides)

    return make


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


@pytest.fixture
def make_app() -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(config: Config, **kwargs: Any) -> Flask:
        app = create_app(config, **kwargs)
        app.config["TESTING"] = False  # errors must go through the real handlers
        apps.append(app)
        return app

    yield make
    for app in apps:
        runtime(app).close()


@pytest.fixture
def app(make_app: Callable[..., Flask], config: Config) -> Flask:
    return make_app(config)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def runtime(app: Flask) -> Runtime:
    return runtime_of(app)


@pytest.fixture
def make_user(db: Any, config: Config) -> Callable[..., str]:
    """Insert a user document as the application would; return its id."""

    def make(email: str | None = "user@example.com", **fields: Any) -> str:
        doc: dict[str, Any] = {"_id": ObjectId(), **fields}
        if email is not None:
            doc["email"] = email
        db[config.users_collection].insert_one(doc)
        return str(doc["_id"])

    return make


@pytest.fixture
def user_id(make_user: Callable[..., str]) -> str:
    return make_user()


class DatabaseLink:
    """A TCP relay between clients and a database server: the network a test can break.

    `cut()` closes every connection and refuses new ones (a partition, or the database
    gone); `drop_replies()` lets requests reach the server but loses what it answers
    (the write happens, the client never learns it did); `heal()` restores the link.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = "open"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def uri(self, database: str) -> str:
        # Direct: otherwise the driver follows the replica set's advertised address,
        # the server's own port, around the relay.
        return f"mongodb://127.0.0.1:{self.port}/{database}?directConnection=true"

    def cut(self) -> None:
        with self._lock:
            self.mode = "down"
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def drop_replies(self) -> None:
        self.mode = "drop_replies"

    def heal(self) -> None:
        self.mode = "open"

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "down":
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if replies and self.mode == "drop_replies":
                    continue
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def db_link(mongo_server: MongoServer) -> Iterator[DatabaseLink]:
    link = DatabaseLink(mongo_server.port)
    yield link
    link.close()
