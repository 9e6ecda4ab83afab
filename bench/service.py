"""The servers under test as `make run` starts them, the seeded users, each endpoint's
requests, and the database commands the service sends for them (to count and replay)."""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bson import ObjectId
from harness import Commands, Request
from pymongo import MongoClient, monitoring

from notification_service import embedded
from notification_service.__main__ import prepare_web_server, web_server_argv
from notification_service.config import Config
from notification_service.server import create_app
from notification_service.storage.ids import new_id

HERE = Path(__file__).resolve().parent
DATA = {"ip": "203.0.113.7", "device": "Firefox on Linux"}


def _create(key: str) -> Callable[[str, str], Request]:
    body = {"key": key, "data": DATA}
    return lambda u, _: ("POST", "/create", json.dumps({"user_id": u, **body}).encode())


# Requests for a user and one of their notifications.
ENDPOINTS: dict[str, Callable[[str, str], Request]] = {
    "GET /list": lambda u, _: ("GET", f"/list?user_id={u}", None),
    "GET /count": lambda u, _: ("GET", f"/count?user_id={u}", None),
    "POST /read": lambda u, n: ("POST", f"/read?user_id={u}&notification_id={n}", None),
    # Up to a watermark, as the inbox page marks what it shows: each one rewrites the array.
    "POST /read-all": lambda u, n: ("POST", f"/read-all?user_id={u}&up_to={n}", None),
    "POST /delete": lambda u, n: ("POST", f"/delete?user_id={u}&notification_id={n}", None),
    "POST /create": _create("new_message"),  # records only
    "POST /create +email": _create("new_login"),  # records and queues an email
}


@dataclass
class Users:
    group: int
    count: int
    size: int  # notifications each, as seeded

    def pick(self, n: int) -> tuple[str, str]:
        """The n-th request's user and notification: each notification once, then again."""
        i, j = n % self.count, n // self.count % self.size
        return f"b{self.group:07x}{i:016x}", f"c{self.group:07x}{i:08x}{j:08x}"


def seed(db_uri: str, users: Users) -> None:
    """Insert the users as the service keeps them: newest first, with exact counts."""
    now, n = int(time.time()), users.size

    def user(i: int) -> dict[str, Any]:
        uid = users.pick(i)[0]
        items = [{"id": users.pick(i + j * users.count)[1], "timestamp": now - j, "is_new": True,
                  "user_id": uid, "key": "new_post", "target_id": None,
                  "data": {"title": "A post"}} for j in range(n)]  # fmt: skip
        counts = {"elements": n, "new": n, "version": n, "log": []}
        return {"_id": ObjectId(uid), "email": f"u{i}@example.com", "notifications": items,
                "notifications_counts": counts}  # fmt: skip

    with MongoClient[dict[str, Any]](db_uri) as client:
        for first in range(0, users.count, 1000):  # batches that SecantusDB takes in its stride
            batch = range(first, min(first + 1000, users.count))
            client.get_default_database()["users"].insert_many(user(i) for i in batch)


@dataclass
class Server:
    child: embedded.Child
    url: str

    @property
    def pid(self) -> int:
        return self.child.process.pid


class Stack:
    """SecantusDB (on disk) and the mail sink as `make run` starts them; web servers."""

    def __init__(self, tmp: Path) -> None:
        self.run_dir = tmp / "run"
        self.db, self.db_uri = embedded.start_database(tmp / "db", self.run_dir)
        sink, port = embedded.start_mail_sink(tmp / "mail", self.run_dir)
        self.children, self.sink_port = [self.db, sink], port
        # What serve gives the web server it starts (its text logs included); 500
        # notifications a user for section 4 (NOTIFICATIONS_LIMIT's default is 100).
        self.env = {"DB_URI": self.db_uri, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port),
                    "SMTP_SECURITY": "none", "LOG_FORMAT": "text",
                    "NOTIFICATIONS_LIMIT": "500"}  # fmt: skip

    def service(self, name: str, **env: str) -> Server:
        child, url = embedded.start_service({**self.env, **env}, self.run_dir, name=name)
        self.children.append(child)
        return Server(child, url)

    def floor(self) -> Server:
        """granian with the service's flags and front (asgi.BufferedWsgi) on floor.py."""
        port = embedded.free_port()
        config = Config.from_env({**self.env, "PORT": str(port)}, dotenv=False)
        return self._bench_app("floor", [*web_server_argv(config)[:-1], "floor:create_asgi_app"])

    def wsgi(self, name: str, target: str, **env: str) -> Server:
        """Plain granian in WSGI mode, the service's workers and threads, on a module of
        bench/ (`factory`: a target named create_*)."""
        config = Config.from_env(self.env, dotenv=False)
        argv = [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1",
                "--port", str(embedded.free_port()), "--workers", str(config.web_workers),
                "--blocking-threads", str(config.web_threads),
                *(["--factory"] if ":create_" in target else []), target]  # fmt: skip
        return self._bench_app(name, argv, env)

    def priced(self, variants: list[str], **env: str) -> dict[str, Server]:
        """priced.py's factories, each under granian as `serve` starts the service (its
        flags, its logging configuration, a metrics directory of its own), all started
        before any is waited for. `plain_wsgi` under granian's WSGI interface, with the
        same workers and as many blocking threads as the front has."""
        started = []
        for variant in variants:
            port, run_dir = embedded.free_port(), self.run_dir / f"priced-{variant}"
            config = Config.from_env({**self.env, **env, "PORT": str(port)}, dotenv=False)
            env_of = {**self.env, **env}
            argv = [*prepare_web_server(config, env_of, run_dir)[:-1], f"priced:{variant}"]
            if variant == "plain_wsgi":
                at = argv.index("--interface") + 1
                argv[at : at + 1] = ["wsgi", "--blocking-threads", str(config.web_threads)]
            started.append((variant, self._spawn(f"priced-{variant}", argv, env_of), port))
        for _, child, port in started:
            embedded.wait_for_port("127.0.0.1", port, child.process, 120)
        return {v: Server(child, f"http://127.0.0.1:{port}") for v, child, port in started}

    def _bench_app(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Server:
        """Run `argv` (its --port given) on bench/'s modules, with the service's env."""
        port = int(argv[argv.index("--port") + 1])
        child = self._spawn(name, argv, env)
        embedded.wait_for_port("127.0.0.1", port, child.process, 60)
        return Server(child, f"http://127.0.0.1:{port}")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None) -> embedded.Child:
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, **self.env, **(env or {}), "PYTHONPATH": path}
        child = embedded.spawn(name, argv, self.run_dir, env, cwd=self.run_dir)
        self.children.append(child)
        return child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


# What the driver adds for a session or a deadline: the replay's client adds its own.
_SESSION = ("lsid", "$clusterTime", "txnNumber", "startTransaction", "autocommit", "$db",
            "maxTimeMS")  # fmt: skip


class Recorder(monitoring.CommandListener):
    """The service in this process (create_app, its test client), its commands seen by
    command monitoring."""

    def __init__(self, env: dict[str, str]) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] | None = None
        monitoring.register(self)  # before create_app makes the app's client
        config = Config.from_env(env, dotenv=False)  # its access log too, as the server's
        self.client: Any = create_app(replace(config, dispatcher_threads=0)).test_client()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.seen is not None:
            self.seen.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def send(self, req: Request) -> dict[str, Any]:
        got = self.client.open(req[1], method=req[0], data=req[2], content_type="application/json")
        assert got.status_code < 300, got.get_data(as_text=True)
        return dict(got.get_json()["data"])

    def record(self, endpoint: str, users: Users) -> tuple[int, Callable[[str, str], Commands]]:
        """How many commands `endpoint` sends, and its commands for a user and
        notification. Request 0 goes first: a process's first also asks for the topology."""
        self.send(ENDPOINTS[endpoint](*users.pick(0)))
        user, nid = users.pick(1)
        self.seen = []
        answer = self.send(ENDPOINTS[endpoint](user, nid))
        seen, self.seen = self.seen, None
        made = [v for k, v in answer.items() if k in ("notification_id", "email_id") and v]
        in_transaction = any("txnNumber" in c for _, c in seen)
        commands = [(str(c["$db"]), {k: v for k, v in c.items() if k not in _SESSION})
                    for name, c in seen if name != "commitTransaction"]  # fmt: skip

        def replay(u: str, n: str) -> Commands:
            swaps = {user: u, nid: n, **{old: new_id() for old in made}}
            return in_transaction, [(db, _swap(c, swaps)) for db, c in commands]

        return len(seen), replay

    def profile(self, reqs: list[Request]) -> list[str]:
        """Where this process's CPU goes serving `reqs`: by package, then the service's
        own functions by cumulative CPU time."""
        profiler = cProfile.Profile(time.process_time)
        profiler.runcall(lambda: [self.send(req) for req in reqs])
        stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        modules: dict[str, float] = {}
        for (file, _, _), (_, _, own, _, _) in stats.items():
            modules[_module(file)] = modules.get(_module(file), 0.0) + own
        total = sum(modules.values()) or 1.0
        top = sorted(modules.items(), key=lambda kv: -kv[1])[:8]
        lines = ["CPU by module: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top)]
        ours = [(k, v[3]) for k, v in stats.items() if "notification_service" in k[0]]
        for (file, _, name), cumulative in sorted(ours, key=lambda kv: -kv[1])[:6]:
            lines.append(f"{1000 * cumulative / len(reqs):6.2f} ms/req  {Path(file).name}:{name}")
        return lines


def _module(file: str) -> str:
    """The top-level module of a profiled function: "werkzeug", "logging", "builtins"."""
    if file == "~":  # a C function
        return "builtins"
    if "/notification_service/" in file:
        return "notification_service"
    return re.split(r"site-packages/|/python3\.\d+/", file)[-1].split("/")[0].removesuffix(".py")


def _swap(value: Any, swaps: dict[str, str]) -> Any:
    if isinstance(value, str):
        return swaps.get(value, value)
    if isinstance(value, ObjectId):
        return ObjectId(swaps.get(str(value), str(value)))
    if isinstance(value, dict):
        return {k: _swap(v, swaps) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap(v, swaps) for v in value]
    return value
