"""Inbox costs: counts flat in the array size, and fan-out against single creates.

SecantusDB is started as `make run` starts it (`embedded.start_database`: the flags of
`embedded.DATABASE_FLAGS`, data on disk in a temporary directory, `database_uri`), and
the service as `make run` serves it (`embedded.spawn` of `web_server_argv`: granian ASGI,
2 workers of 8 threads), with NOTIFICATIONS_LIMIT=500, the dispatchers off and
DB_TIMEOUT_MS=60000, the most it allows (a fan-out of 1,000 users takes longer than 3 s
on SecantusDB; the end of the run shows what the default settings answer).

1. Counts. A user holding 10, one holding 100 and one holding 500 notifications, filled
   through the API (POST /create fan-outs, then POST /read-all marks the older half
   read). Rounds measure each size for 1 s from 4 threads: GET /count and
   GET /list?limit=10 over HTTP, and with pymongo directly the old way (the pre-change
   /list aggregation, which counts by scanning the array: $size, and $size of a $filter
   on is_new; with and without its page of 10) beside the reads the service makes now
   (InboxStore.counts and inbox_page) and a find_one of the counts sub-document alone.
   req/s, and the database's CPU per request (from /proc).
2. Fan-out. One POST /create with `user_ids` of 1,000 users against single POST /create
   calls (100 timed per run, from 8 client threads; the same cost each, so scaled to
   1,000), for new_post (record only) and new_login (record + email; SecantusDB is a
   replica set, so one transaction). Time, database CPU and requests the database
   received (serverStatus network.numRequests) over HTTP; round trips counted in this
   process (create_app and Flask's test client, a pymongo CommandListener registered
   first, DB_TIMEOUT_MS 10 minutes), before the HTTP rounds. The users of part 1 are
   removed first: part 2's collection holds its 1,000 users. scan_diagnostic checks that
   the create's query is served by _id (a `$or` beside `_id` makes SecantusDB scan).

    .venv/bin/python bench/inbox.py          # 3 + 2 rounds; about 3 minutes
    .venv/bin/python bench/inbox.py --quick  # 1 + 1 round, 200 users: 1-2 minutes; no file

Saves the printed output as bench/results/inbox-<date>.txt and the raw figures as
bench/results/inbox.json unless --no-save.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bson
from bson import ObjectId
from pymongo import MongoClient, monitoring
from pymongo.collection import Collection
from report import REPO, Report, cpu_seconds, run_threads  # bench/report.py, beside this

from notification_service import embedded
from notification_service.__main__ import web_server_argv
from notification_service.config import Config
from notification_service.mongo_connector import InboxStore, connect, database
from notification_service.server import create_app, runtime_of

HOST = "127.0.0.1"
SIZES = (10, 100, 500)
PER_SIZE = 1  # users of each size
READ_THREADS = 4
CREATE_THREADS = 8
FIELD = "notifications"
JSON_HEADERS = {"Content-Type": "application/json"}
DATA = {"text": "Someone wrote something", "from": "someone"}
# Only these of the caller's environment reach the web server; the rest is set below.
KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
SETTINGS = {
    "NOTIFICATIONS_LIMIT": "500",
    "DISPATCHER_THREADS": "0",  # queued emails stay queued: no SMTP work in the figures
    "SMTP_HOST": HOST,  # required beside DB_URI; never contacted with the dispatchers off
    "DB_TIMEOUT_MS": "60000",
    "LOG_LEVEL": "WARNING",
}

Doc = dict[str, Any]
Op = Callable[[int], bool]  # one request; True when answered as expected


# --- the service, as make run starts it -------------------------------------------------


@dataclass
class Service:
    db: embedded.Child
    uri: str
    web: embedded.Child
    port: int
    env: dict[str, str]

    @property
    def db_pid(self) -> int:
        return self.db.process.pid

    def config(self, **overrides: str) -> Config:
        return Config.from_env({**self.env, **overrides}, dotenv=False)

    def stop(self) -> None:
        self.web.stop(timeout=40)
        self.db.stop()


def start_service(workdir: Path) -> Service:
    db, uri = embedded.start_database(workdir / "db", workdir / "run")
    port = embedded.free_port()
    env = {k: v for k, v in os.environ.items() if k in KEEP_ENV}
    env |= {**SETTINGS, "HOST": HOST, "PORT": str(port), "DB_URI": uri}
    argv = web_server_argv(Config.from_env(env, dotenv=False))
    # From an empty directory, so a developer's ./.env is not read.
    with contextlib.chdir(workdir):
        web = embedded.spawn("web", argv, workdir / "run", env)
    service = Service(db, uri, web, port, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if web.process.poll() is not None:
            db.stop()
            raise RuntimeError(f"the web server exited with status {web.process.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(port, "GET", "/health", timeout=2)[0] == 200:
                return service
        time.sleep(0.2)
    service.stop()
    raise RuntimeError("the web server did not answer /health within 60 s")


def request(
    port: int, method: str, path: str, body: Any = None, timeout: float = 30
) -> tuple[int, Any]:
    """One request on a fresh connection: the status and the decoded JSON body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers=JSON_HEADERS if payload else {})
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def wait_idle(pid: int, report: Report, limit: float = 300) -> None:
    """Wait until the process `pid` uses under 5% of a core for a second."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        cpu0 = cpu_seconds(pid)
        time.sleep(1)
        if cpu_seconds(pid) - cpu0 < 0.05:
            break
    report(f"  (waited {time.monotonic() - started:.0f} s for the database to go idle)")


def db_requests(client: MongoClient[Doc]) -> int:
    """Requests the database has received so far (this call included)."""
    return int(client.admin.command("serverStatus")["network"]["numRequests"])


# --- load ---------------------------------------------------------------------------------


@dataclass
class Sample:
    rate: float  # answered requests per second
    cpu_ms: float  # database CPU per answered request
    bad: int  # other statuses, errors


def load(threads: int, seconds: float, make_op: Callable[[int], Op], pid: int) -> Sample:
    """Closed loop: `threads` threads call their op until `seconds` are over."""
    ops = [make_op(t) for t in range(threads)]  # connections made before the clock
    good, bad = [0] * threads, [0] * threads
    stop = time.monotonic() + seconds

    def work(t: int) -> None:
        n = t
        while time.monotonic() < stop:
            if ops[t](n):
                good[t] += 1
            else:
                bad[t] += 1
            n += threads

    elapsed, cpu = run_threads(threads, work, pid)
    done = sum(good)
    return Sample(done / elapsed, 1000 * cpu / max(1, done), sum(bad))


class HttpGets:
    """An op factory: keep-alive GETs of `paths`, one connection per thread."""

    def __init__(self, port: int, paths: Sequence[str]) -> None:
        self.port, self.paths = port, list(paths)
        self.conns: list[http.client.HTTPConnection] = []

    def __call__(self, thread: int) -> Op:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        self.conns.append(conn)

        def op(n: int) -> bool:
            try:
                conn.request("GET", self.paths[n % len(self.paths)])
                response = conn.getresponse()
                response.read()
                return response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()  # the next request reconnects
                return False

        return op

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


# --- 1. counts ------------------------------------------------------------------------------


def old_list_pipeline(oid: ObjectId, limit: int) -> list[Doc]:
    """The /list aggregation before the stored counts (commit 94ed219's inbox_page): the
    counts by scanning the array, and a page; `limit` 0 gives the counts alone."""
    items = {"$cond": [{"$isArray": f"${FIELD}"}, f"${FIELD}", []]}
    page: Any = {"$slice": [items, 0, limit]} if limit > 0 else {"$literal": []}
    unread = {"$filter": {"input": items, "as": "n", "cond": {"$eq": ["$$n.is_new", True]}}}
    project = {"_id": 0, "elements": {"$size": items}, "new": {"$size": unread}, "list": page}
    return [{"$match": {"_id": oid}}, {"$project": project}]


CELLS = (
    ("http /count", "GET /count"),
    ("http /list", "GET /list?limit=10"),
    ("old scan counts", "pymongo: counts by scanning the array (before)"),
    ("stored counts", "pymongo: InboxStore.counts, what /count sends (now)"),
    ("find counts field", "pymongo: find_one of the counts sub-document alone"),
    ("old scan + page", "pymongo: the old /list aggregation, counts scanned + 10 (before)"),
    ("stored + page", "pymongo: InboxStore.inbox_page, what /list sends (now)"),
)


class CountsBench:
    def __init__(self, service: Service, store: InboxStore, report: Report) -> None:
        self.service, self.store, self.report = service, store, report
        self.users: dict[int, list[str]] = {size: [] for size in SIZES}
        self.samples: dict[str, dict[int, list[Sample]]] = {
            cell: {size: [] for size in SIZES} for cell, _ in CELLS
        }
        self.https: list[HttpGets] = []

    def fill(self) -> float:
        """Users of each size, filled through the API; the older half marked read."""
        started = time.monotonic()
        port = self.service.port
        for size in SIZES:
            for _ in range(PER_SIZE):
                oid = ObjectId()
                # The shape test mode's ensure_user gives a new user (the profile is the
                # application's); the counts sub-document is the service's to write.
                self.store.users.insert_one({"_id": oid, "email": "u@example.com", FIELD: []})
                self.users[size].append(str(oid))
        for i in range(max(SIZES)):
            ids = [u for size in SIZES if size > i for u in self.users[size]]
            body = {"user_ids": ids, "key": "new_message", "data": {**DATA, "n": i}}
            status, answer = request(port, "POST", "/create", body, timeout=120)
            if status != 201 or answer["data"]["totals"]["created"] != len(ids):
                raise RuntimeError(f"fill: POST /create answered {status}: {answer}")
            if (i + 1) % 100 == 0:
                self.report(
                    f"  filled {i + 1} of {max(SIZES)} ({time.monotonic() - started:.0f} s)"
                )
        for size in SIZES:
            for uid in self.users[size]:
                _, page = request(port, "GET", f"/list?user_id={uid}&skip={size // 2}&limit=1")
                up_to = page["data"]["list"][0]["id"]
                status, answer = request(port, "POST", f"/read-all?user_id={uid}&up_to={up_to}")
                if status != 200:
                    raise RuntimeError(f"fill: POST /read-all answered {status}: {answer}")
        return time.monotonic() - started

    def check(self) -> list[Doc]:
        """Every way of counting gives the same numbers: size, and half of it unread."""
        docs = []
        for size in SIZES:
            for uid in self.users[size]:
                _, answer = request(self.service.port, "GET", f"/count?user_id={uid}")
                http_counts = answer["data"]
                old = next(self.store.users.aggregate(old_list_pipeline(ObjectId(uid), 0)))
                doc = self.store.users.find_one({"_id": ObjectId(uid)})
                assert doc is not None
                stored = doc[f"{FIELD}_counts"]
                found = (http_counts["elements"], http_counts["new"])
                want = (size, size // 2)
                if found != want or (old["elements"], old["new"]) != want:
                    raise RuntimeError(f"user {uid}: /count {found}, scan {old}, want {want}")
                if len(doc[FIELD]) != size:
                    raise RuntimeError(f"user {uid} holds {len(doc[FIELD])}, not {size}")
                docs.append(
                    {"size": size, "user_id": uid, "counts": stored, "bytes": len(bson.encode(doc))}
                )
        return docs

    def make_op(self, cell: str, size: int) -> Callable[[int], Op]:
        users = self.users[size]
        port, store, coll = self.service.port, self.store, self.store.users
        now = dt.datetime.now(dt.UTC)
        if cell.startswith("http"):
            route = "/count?user_id={}" if cell == "http /count" else "/list?user_id={}&limit=10"
            gets = HttpGets(port, [route.format(u) for u in users])
            self.https.append(gets)
            return gets
        oids = [ObjectId(u) for u in users]

        def op(n: int) -> bool:
            i = n % len(users)
            if cell == "old scan counts":
                return len(list(coll.aggregate(old_list_pipeline(oids[i], 0)))) == 1
            if cell == "stored counts":
                return bool(store.counts(users[i], now)["elements"] == size)
            if cell == "find counts field":
                found = coll.find_one({"_id": oids[i]}, {"_id": 0, f"{FIELD}_counts": 1})
                return found is not None
            if cell == "old scan + page":
                return len(next(coll.aggregate(old_list_pipeline(oids[i], 10)))["list"]) == 10
            return len(store.inbox_page(users[i], 0, 10, now)["list"]) == 10

        return lambda _thread: op

    def measure(self, cell: str, size: int, seconds: float) -> Sample:
        sample = load(READ_THREADS, seconds, self.make_op(cell, size), self.service.db_pid)
        for gets in self.https:
            gets.close()
        self.https.clear()
        return sample

    def run(self, rounds: int, seconds: float) -> None:
        for cell, _ in CELLS:  # warm-up: connections, code paths
            for size in SIZES:
                self.measure(cell, size, min(0.3, seconds))
        cells = [cell for cell, _ in CELLS]
        for r in range(rounds):
            sizes = SIZES[r % 3 :] + SIZES[: r % 3]
            order = cells[r % len(cells) :] + cells[: r % len(cells)]
            for size in sizes:
                parts = []
                for cell in order:
                    sample = self.measure(cell, size, seconds)
                    self.samples[cell][size].append(sample)
                    parts.append(f"{cell} {sample.rate:5.0f}/s {sample.cpu_ms:4.2f}ms")
                self.report(f"round {r + 1} size {size:>3}: " + " | ".join(parts))


# --- 2. fan-out -------------------------------------------------------------------------------


@dataclass
class Run:
    """One fan-out request, or N single requests, for one key."""

    mode: str  # "fan-out" or "singles"
    key: str
    notifications: int  # asked for
    created: int  # answered as created
    seconds: float
    db_cpu_ms: float  # per notification asked for
    db_requests: int  # received by the database during the run (heartbeats included)
    statuses: dict[int, int]
    written: int  # notifications the users' arrays gained (after the database went idle)

    @property
    def ok(self) -> bool:
        return self.created == self.notifications

    @property
    def per_s(self) -> float:
        return self.notifications / self.seconds


def body(key: str, users: str | list[str]) -> Doc:
    audience = {"user_ids": users} if isinstance(users, list) else {"user_id": users}
    return {**audience, "key": key, "data": DATA}


class FanOutBench:
    def __init__(
        self, service: Service, users: Collection[Doc], count: int, report: Report
    ) -> None:
        self.service, self.report = service, report
        self.users, self.client = users, users.database.client
        self.user_ids = [str(ObjectId()) for _ in range(count)]
        users.insert_many(
            [{"_id": ObjectId(u), "email": "u@example.com", FIELD: []} for u in self.user_ids]
        )
        self.runs: list[Run] = []

    def http_run(self, mode: str, key: str, singles: int) -> Run:
        port, pid = self.service.port, self.service.db_pid
        statuses: Counter[int] = Counter()
        held = self.stored()
        before, cpu0, t0 = db_requests(self.client), cpu_seconds(pid), time.perf_counter()
        if mode == "fan-out":
            asked = len(self.user_ids)
            status, answer = request(port, "POST", "/create", body(key, self.user_ids), 600)
            statuses[status] += 1
            created = answer["data"]["totals"]["created"] if status in (200, 201) else 0
        else:
            asked = min(singles, len(self.user_ids))
            created = self._singles(key, self.user_ids[:asked], statuses)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
        received = db_requests(self.client) - before - 1  # less the first serverStatus
        if created != asked:
            # A 503 answers the client, but the database may go on with the writes sent
            # (a bulk write outside a transaction): let it finish before counting them.
            wait_idle(pid, self.report)
        written = self.stored() - held
        per_notification = 1000 * cpu / asked
        run = Run(mode, key, asked, created, seconds, per_notification, received, dict(statuses),
                  written)  # fmt: skip
        self.runs.append(run)
        if written != created:
            self.report(f"  {key} {mode}: {created} answered as created, {written} written")
        return run

    def stored(self) -> int:
        """The notifications the audience holds, all together (none reach the cap)."""
        total = {"$sum": {"$size": {"$ifNull": [f"${FIELD}", []]}}}
        oids = [ObjectId(u) for u in self.user_ids]
        pipeline: list[Doc] = [
            {"$match": {"_id": {"$in": oids}}},
            {"$group": {"_id": None, "n": total}},
        ]
        return int(next(self.users.aggregate(pipeline))["n"])

    def _singles(self, key: str, user_ids: list[str], statuses: Counter[int]) -> int:
        port, lock = self.service.port, threading.Lock()
        pending = iter(user_ids)

        def client(_thread: int) -> None:
            conn = http.client.HTTPConnection(HOST, port, timeout=120)
            mine: Counter[int] = Counter()
            while True:
                with lock:
                    uid = next(pending, None)
                if uid is None:
                    break
                try:
                    conn.request("POST", "/create", json.dumps(body(key, uid)), JSON_HEADERS)
                    response = conn.getresponse()
                    response.read()
                    mine[response.status] += 1
                except (OSError, http.client.HTTPException):
                    mine[0] += 1
                    conn.close()
            conn.close()
            with lock:
                statuses.update(mine)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(CREATE_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return statuses[201]


class CommandCounter(monitoring.CommandListener):
    """Every command a client sends is one round trip to the database."""

    def __init__(self) -> None:
        self.names: Counter[str] = Counter()
        self.lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self.lock:
            self.names[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def take(self) -> Counter[str]:
        with self.lock:
            names, self.names = self.names, Counter()
        return names


def in_process(
    service: Service, user_ids: list[str], singles: int, report: Report
) -> dict[str, Any]:
    """Round trips per request, counted by a CommandListener in this process's app."""
    counter = CommandCounter()
    monitoring.register(counter)  # before create_app: its client is made with it
    # The HTTP service's settings, but 10 minutes for DB_TIMEOUT_MS (the environment
    # allows 60 s at most): what is counted here is a fan-out that completes.
    app = create_app(dataclasses.replace(service.config(), db_timeout_ms=600_000))
    http = app.test_client()
    out: dict[str, Any] = {}
    try:
        # Warm-up: the first request asks `hello` once (supports_transactions).
        http.post("/create", json=body("new_login", user_ids[-1]))
        counter.take()
        pid = service.db_pid
        for key in ("new_post", "new_login"):
            cpu0, t0 = cpu_seconds(pid), time.perf_counter()
            response = http.post("/create", json=body(key, user_ids))
            seconds, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
            fan = counter.take()
            created = (response.get_json() or {}).get("data", {}).get("totals", {}).get("created")
            if created != len(user_ids):
                wait_idle(pid, report)
                counter.take()
            per_request: list[int] = []
            names: Counter[str] = Counter()
            statuses: Counter[int] = Counter()
            cpu1, t1 = cpu_seconds(pid), time.perf_counter()
            for uid in user_ids[:singles]:
                statuses[http.post("/create", json=body(key, uid)).status_code] += 1
                taken = counter.take()
                per_request.append(sum(taken.values()))
                names.update(taken)
            single_seconds, single_cpu = time.perf_counter() - t1, cpu_seconds(pid) - cpu1
            out[key] = {
                "fan_out": {
                    "users": len(user_ids),
                    "status": response.status_code,
                    "created": created,
                    "round_trips": sum(fan.values()),
                    "commands": dict(fan),
                    "seconds": seconds,
                    "db_cpu_ms_per_notification": 1000 * cpu / len(user_ids),
                },
                "singles": {
                    "requests": len(per_request),
                    "statuses": dict(statuses),
                    "round_trips_per_request": per_request,
                    "commands": dict(names),
                    "seconds": single_seconds,
                    "db_cpu_ms_per_notification": 1000 * single_cpu / max(1, len(per_request)),
                },
            }
            report(
                f"  in-process {key}: fan-out of {len(user_ids)} {response.status_code} in "
                f"{seconds:.1f} s ({1000 * cpu / len(user_ids):.1f} ms db CPU each), "
                f"{sum(fan.values())} round trips {dict(fan)}; {len(per_request)} singles "
                f"{dict(statuses)} in {single_seconds:.1f} s, {statistics.median(per_request):g} "
                f"round trips each ({min(per_request)}-{max(per_request)}) {dict(names)}"
            )
    finally:
        runtime_of(app).close()
    return out


def default_timeout_check(service: Service, user_ids: list[str], report: Report) -> Doc:
    """The fan-out under make run's default DB_TIMEOUT_MS (3 s): in this process, last."""
    app = create_app(service.config(DB_TIMEOUT_MS="3000"))
    try:
        t0 = time.perf_counter()
        response = app.test_client().post("/create", json=body("new_login", user_ids))
        seconds = time.perf_counter() - t0
        error = (response.get_json() or {}).get("error") or {}
        result = {"status": response.status_code, "seconds": seconds, "code": error.get("code")}
        report(
            f"  default DB_TIMEOUT_MS=3000: fan-out new_login to {len(user_ids)} users answered "
            f"{response.status_code} {error.get('code') or ''} after {seconds:.1f} s"
        )
        return result
    finally:
        runtime_of(app).close()


def scan_diagnostic(store: InboxStore, user_ids: list[str], pid: int, report: Report) -> Doc:
    """Database CPU of a find_one by _id alone, with the create's query, and with the
    create's query as it was before 436a43f (`$or` beside `_id`: the field missing or an
    array), on the users collection as it is (the fan-out's audience)."""
    out = {}
    oids = [ObjectId(u) for u in user_ids[:50]]  # CPU time counts in 10 ms ticks
    create_query = store._create_query
    either = [{FIELD: {"$exists": False}}, {FIELD: {"$type": "array"}}]
    forms: dict[str, Callable[[ObjectId], Doc]] = {
        "by _id": lambda oid: {"_id": oid},
        "create's query": lambda oid: create_query(oid, False, None),
        "with $or beside _id": lambda oid: {"_id": oid, "$or": either},
    }
    for name, query in forms.items():
        cpu0 = cpu_seconds(pid)
        for oid in oids:
            store.users.find_one(query(oid), {"_id": 1})
        out[name] = 1000 * (cpu_seconds(pid) - cpu0) / len(oids)
    count = store.users.estimated_document_count()
    report(
        f"  find_one on a users collection of {count:,} documents, db CPU per call: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in out.items())
    )
    return {"documents": count, "db_cpu_ms": out, "query": repr(create_query(oids[0], False, None))}


# --- summary ----------------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    return (
        f"{fmt.format(statistics.median(values))} "
        f"({fmt.format(min(values))}-{fmt.format(max(values))})"
    )


def summarize_counts(bench: CountsBench, report: Report) -> dict[str, Any]:
    report()
    report("1. counts: req/s and database CPU ms per request, median (min-max) over rounds;")
    report("   x500/10 is the median of each round's ratio of the 500 figure to the 10 one")
    report(f"{'':<18}" + "".join(f"{f'{size} stored':>24}" for size in SIZES) + f"{'x500/10':>9}")
    summary: dict[str, Any] = {}
    for cell, label in CELLS:
        per = bench.samples[cell]
        rates = [spread([s.rate for s in per[size]]) for size in SIZES]
        cpus = [spread([s.cpu_ms for s in per[size]], "{:.2f}") for size in SIZES]
        rate_x = [a.rate / b.rate for a, b in zip(per[500], per[10], strict=True)]
        cpu_x = [a.cpu_ms / b.cpu_ms for a, b in zip(per[500], per[10], strict=True)]
        report(
            f"{cell:<18}"
            + "".join(f"{r:>24}" for r in rates)
            + f"{statistics.median(rate_x):>9.2f}"
        )
        report(
            f"{'  db CPU ms':<18}"
            + "".join(f"{c:>24}" for c in cpus)
            + f"{statistics.median(cpu_x):>9.2f}"
        )
        summary[cell] = {
            "label": label,
            "req_per_s": {size: [s.rate for s in per[size]] for size in SIZES},
            "db_cpu_ms": {size: [s.cpu_ms for s in per[size]] for size in SIZES},
            "bad": {size: sum(s.bad for s in per[size]) for size in SIZES},
            "ratio_500_to_10": {"req_per_s": rate_x, "db_cpu_ms": cpu_x},
        }  # fmt: skip
    # Old against new, round by round, for each size.
    report()
    report("   now against before, median of the per-round ratios (req/s now / req/s before):")
    for now, before in (("stored counts", "old scan counts"), ("stored + page", "old scan + page")):
        ratios = []
        for size in SIZES:
            pairs = zip(bench.samples[now][size], bench.samples[before][size], strict=True)
            ratios.append(statistics.median(a.rate / b.rate for a, b in pairs))
        report(
            f"   {now} / {before}: "
            + ", ".join(f"{size}: x{x:.2f}" for size, x in zip(SIZES, ratios, strict=True))
        )
    bad = sum(s.bad for per in bench.samples.values() for v in per.values() for s in v)
    report(f"   failed or unexpected answers: {bad}")
    return summary


def summarize_fan_out(
    runs: list[Run], inproc: dict[str, Any], users: int, singles: int, report: Report
) -> dict[str, Any]:
    report()
    report(
        f"2. one fan-out to {users:,} users vs single creates ({singles:,} timed per run, "
        f"{CREATE_THREADS} client threads); over HTTP, median (min-max) over rounds:"
    )
    report(
        f"{'':<19}{'notifications/s':>20}{f'seconds for {users:,}':>20}"
        f"{'db CPU ms/notif.':>20}{'db requests':>22}"
    )
    summary: dict[str, Any] = {}
    for key in ("new_post", "new_login"):
        by_mode = {
            m: [r for r in runs if r.key == key and r.mode == m] for m in ("fan-out", "singles")
        }
        for mode, mine in by_mode.items():
            good = [r for r in mine if r.ok]
            failed = [f"{r.statuses} after {r.seconds:.1f} s" for r in mine if not r.ok]
            line = f"{key + ' ' + mode:<19}"
            if good:
                # Singles: the time of `singles` calls scaled to `users` (the same cost each).
                line += (
                    f"{spread([r.per_s for r in good], '{:,.1f}'):>20}"
                    f"{spread([users / r.per_s for r in good], '{:,.1f}'):>20}"
                    f"{spread([r.db_cpu_ms for r in good], '{:.1f}'):>20}"
                    f"{spread([r.db_requests * users / r.notifications for r in good]):>22}"
                )
            if failed:
                line += f"  failed: {'; '.join(failed)}"
            report(line)
        pairs = zip(by_mode["fan-out"], by_mode["singles"], strict=True)
        speedups = [f.per_s / s.per_s for f, s in pairs if f.ok and s.ok]
        ratio = (
            f"x{statistics.median(speedups):.2f} ({min(speedups):.2f}-{max(speedups):.2f})"
            if speedups
            else "(no round with both)"
        )
        ip = inproc[key]
        fan_trips = ip["fan_out"]["round_trips"]
        per_single = ip["singles"]["round_trips_per_request"]
        single_trips = statistics.median(per_single)
        report(
            f"  {key}: fan-out {ratio} the notifications/s of singles. "
            f"Round trips (in-process): fan-out {fan_trips} for {users:,} users "
            f"(answered {ip['fan_out']['status']}) "
            f"{ip['fan_out']['commands']}; a single {single_trips:g} "
            f"({min(per_single)}-{max(per_single)}) {ip['singles']['commands']} "
            f"over {len(per_single)}, so {single_trips * users:,.0f} for {users:,} "
            f"(x{single_trips * users / fan_trips:,.0f})"
        )
        summary[key] = {
            "speedup_per_notification": speedups,
            "http_runs": [
                r.__dict__ | {"per_s": r.per_s, "ok": r.ok} for r in runs if r.key == key
            ],
            "in_process": ip,
        }
    report(
        "  db requests: what the database received during the run (serverStatus "
        "network.numRequests), the drivers' heartbeats included; singles scaled to "
        f"{users:,}"
    )
    return summary


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def versions() -> dict[str, str]:
    names = ("SecantusDB", "pymongo", "granian", "flask", "werkzeug")
    found = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="counts rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per counts measurement")
    parser.add_argument("--fan-rounds", type=int, default=2, help="fan-out rounds (default 2)")
    parser.add_argument("--users", type=int, default=1000, help="fan-out audience (max 1000)")
    parser.add_argument("--singles", type=int, default=100, help="single creates timed per run")
    parser.add_argument("--in-process-singles", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 round, 200 users, not saved")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.fan_rounds, args.users = 1, 0.5, 1, 200
        args.singles, args.in_process_singles, args.no_save = 100, 5, True
    singles = min(args.singles, args.users)
    day = dt.date.today().isoformat()
    report = Report(None if args.no_save else REPO / f"bench/results/inbox-{day}.txt")
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "run": {
            "started": started.isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "notification_service").splitlines(),
            "load_start": os.getloadavg(),
            "cpus": os.cpu_count(),
            "versions": versions(),
            "args": vars(args),
            "database_flags": list(embedded.DATABASE_FLAGS),
            "service_settings": SETTINGS,
        }
    }
    complete = False
    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp:
        service: Service | None = None
        client: MongoClient[Doc] | None = None
        try:
            run = results["run"]
            report(
                f"inbox, {started:%Y-%m-%d %H:%M} UTC, commit {run['commit']}"
                f"{' + uncommitted changes in notification_service/' if run['uncommitted'] else ''}"
                f", load {run['load_start'][0]:.2f}; {run['versions']}"
            )  # fmt: skip
            service = start_service(Path(tmp))
            report(f"database: secantusd-py {' '.join(embedded.DATABASE_FLAGS)}, {service.uri}")
            report(f"service: {' '.join(web_server_argv(service.config())[1:])}")
            report(f"  with {' '.join(f'{k}={v}' for k, v in SETTINGS.items())}")
            config = service.config()
            client = connect(config)
            store = InboxStore(database(client, config), config)

            report(f"1. counts: filling {PER_SIZE} user of each size {SIZES} through the API")
            counts = CountsBench(service, store, report)
            fill_s = counts.fill()
            docs = counts.check()
            stored = ", ".join(
                f"{d['size']}: elements {d['counts']['elements']} new {d['counts']['new']}, "
                f"{d['bytes'] / 1024:,.1f} KiB"
                for d in docs
            )
            report(f"  filled and checked in {fill_s:.0f} s; counts stored: {stored}")
            counts.run(args.rounds, args.seconds)
            results["counts"] = summarize_counts(counts, report)
            results["counts_users"] = docs
            # Part 2 gets a users collection of its own audience only (see the README).
            part1 = [ObjectId(u) for size in SIZES for u in counts.users[size]]
            store.users.delete_many({"_id": {"$in": part1}})

            report()
            report(f"2. fan-out: {args.users:,} users, {args.fan_rounds} rounds over HTTP")
            fan = FanOutBench(service, store.users, args.users, report)
            results["scan"] = scan_diagnostic(store, fan.user_ids, service.db_pid, report)
            # Round trips first; this also gives every user its counts sub-document.
            inproc = in_process(service, fan.user_ids, args.in_process_singles, report)
            order = [(m, k) for k in ("new_post", "new_login") for m in ("fan-out", "singles")]
            for r in range(args.fan_rounds):
                for mode, key in order if r % 2 == 0 else order[::-1]:
                    one = fan.http_run(mode, key, singles)
                    report(
                        f"  round {r + 1} {key} {mode}: {one.created:,} of "
                        f"{one.notifications:,} in "
                        f"{one.seconds:.1f} s = {one.per_s:,.1f}/s, db CPU "
                        f"{one.db_cpu_ms:.1f} ms per notification, {one.db_requests:,} db "
                        f"requests, answers {one.statuses}, {one.written:,} written"
                    )
            results["fan_out"] = summarize_fan_out(fan.runs, inproc, args.users, singles, report)
            results["default_timeout"] = default_timeout_check(service, fan.user_ids, report)
            results["run"]["load_end"] = os.getloadavg()
            results["run"]["seconds"] = (dt.datetime.now(dt.UTC) - started).total_seconds()
            report(f"load average at the end {os.getloadavg()[0]:.2f}; "
                   f"{results['run']['seconds']:.0f} s in all")  # fmt: skip
            complete = True
        finally:
            if client is not None:
                client.close()
            if service is not None:
                service.stop()
            report.close(complete=complete)
    if complete and not args.no_save:
        path = REPO / "bench/results/inbox.json"
        tmp_path = path.with_name(path.name + ".tmp")
        tmp_path.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
        tmp_path.replace(path)
        print(f"raw figures saved to {path.relative_to(REPO)}", flush=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
