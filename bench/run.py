"""`make bench`: every performance claim side by side in one run, in interleaved rounds;
writes bench/RESULTS.md and bench/*.png (QUICK=1: shorter, into bench/quick/)."""

from __future__ import annotations

import importlib.metadata as meta
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from bson import ObjectId
from figures import Figure
from harness import Load, Request, cpu_seconds, generate, http_load, rss_mb
from pymongo import MongoClient, UpdateOne
from service import ENDPOINTS, HERE, Recorder, Server, Stack, Users, seed

from notification_service.config import Config
from notification_service.embedded import free_port
from notification_service.notifications import FAN_OUT_CHUNK
from notification_service.storage import updates
from notification_service.storage.ids import new_id
from notification_service.storage.updates import Layout

QUICK = os.environ.get("QUICK", "") not in ("", "0")
# wrk runs whole seconds. Beyond the first round, section 2 runs only AT connections.
ROUNDS, SECONDS, CONNS = (1, 1, (16,)) if QUICK else (3, 1, (1, 16, 64))
AT, RUN = 16, 300  # the connections of other sections; distinct requests a run
SIZES = {500: 10, 10: 100} if QUICK else {500: 30, 100: 100, 10: 300}  # users
USERS, LARGE, MIXED, FAN = (300, 3000, 10_000, 200) if QUICK else (1000, 100_000, 100_000, 1000)
GROWN = ("GET /list", "POST /create") if QUICK else tuple(ENDPOINTS)
# Section 0: minimal.py's routes, on users at half the cap and at it, 200 users a group.
ANCHORED, CAP, GROUP = ("GET /list", "GET /count", "POST /read", "POST /create"), 100, 200
OUT = HERE / "quick" if QUICK else HERE
# Endpoints that share users never undo each other's work (reads; creates only prepend).
ROLE = {"GET /list": 0, "GET /count": 0, "POST /read": 1, "POST /read-all": 2,
        "POST /delete": 3, "POST /create": 4, "POST /create +email": 4}  # fmt: skip
ONE = ("GET /list", "GET /count", "POST /read", "POST /read-all", "POST /delete", "POST /create")
WHY = {
    "POST /create +email": "one transaction: the record, the user read for the email, the "
    "outbox insert, commitTransaction",
    "write": "the update, then a read by _id of the counts and of what this write changed "
    "(findAndModify would be one, but SecantusDB answers it with a collection scan)",
}
# What a section's table shows of the runs behind a figure (default: rates and CPU).
SHOW = {"0": ("req/s", "server CPU", "db CPU"), "2": ("req/s", "p50", "p99"),
        "4": ("req/s", "db CPU"), "5": ("req/s", "db CPU", "RSS"), "7": ("req/s", "CPU"),
        "8": ("RSS",),
        "9": ("req/s", "server CPU"), "11": ("req/s", "server CPU", "db CPU"),
        "12": ("CPU", "operations", "finds", "/ 1"), "13": ("commands",)}  # fmt: skip
START, CONSOLE = time.monotonic(), os.fdopen(os.dup(1), "w", buffering=1)
LOG = Path(tempfile.gettempdir()) / "notification-service-bench.log"
RETIRED = (
    "Goals retired by issue 16, their figures kept: fan-out ≥ 20 times single creates "
    "(impossible on SecantusDB, whose cost per document bounds it); (service - raw client) / "
    "floor ≤ 1.5, replaced by section 0's service / minimal: ≤ 1.5 in CPU, ≥ 0.8 in throughput"
)
ARRAY = {
    "G": "SecantusDB loads the whole user document to project the counts and a page",
    "P": "SecantusDB rewrites the whole user document (in Python) for each write",
}
# The endpoints of the price list (section 10) and of durability's price (section 7).
PRICED = ("GET /count", "POST /create")
# Section 10: each guarantee's price, the service (priced.py's `full`) against the
# variant without it. A row: "{endpoint}: {guarantee}".
S10 = "10. Price list"
GUARANTEES = {
    "the slow-client front (without: the same app under granian's WSGI)": "plain_wsgi",
    "auth, an API key checked (without: still sent, not checked)": "no_auth",
    "request ids and the access log": "no_request_log",
    "metrics": "no_metrics",
    "the per-request database deadline": "no_deadline",
    "strict parsing": "no_strict_parsing",
}
IDEMPOTENT = "an Idempotency-Key, a distinct one a request (without: none sent)"
STORED = "stored counts"
JOURNAL = "journaled writes (without: w=1,journal=false; section 7's runs)"
Side = tuple[str, Callable[[], Load]]
Duel = tuple[Figure, list[Side]]


def number(section: str) -> str:
    """A section's number: "10" of "10. Price list"."""
    return section.split(".")[0]


def progress(line: str) -> None:
    print(f"[{time.monotonic() - START:4.0f}s] {line}", file=CONSOLE)


def ratio(section: str, name: str, goal: str = "", least: float = 0, note: str = "") -> Figure:
    return Figure(section, name, "ratio", goal, (lambda v: v >= least) if goal else None, note)


def versus(fig: Figure, rnd: int, sides: list[Side]) -> float:
    """One round of the sides (reversed on odd rounds): the first's rate / the last's."""
    rates = {}
    for name, run in sides if rnd % 2 == 0 else sides[::-1]:
        load = run()
        rates[name] = load.rate
        cpu = {f"{k} CPU ms/req": v for k, v in load.cpu_ms.items()}
        parts = {"req/s": load.rate, "p50 ms": load.p50_ms, "p99 ms": load.p99_ms, **cpu}
        for key, value in {**parts, "errors": load.errors}.items():
            fig.detail.setdefault(f"{name} {key}", []).append(value)
    return rates[sides[0][0]] / rates[sides[-1][0]]


def play(duels: list[Duel], every: Callable[[Figure], bool] = lambda f: True) -> list[Figure]:
    """ROUNDS rounds, each of every duel in turn (of those not `every`: the first only)."""
    for rnd in range(ROUNDS):
        for fig, sides in (d for d in duels if rnd == 0 or every(d[0])):
            value = fig.add(partial(versus, fig, rnd, sides))
            rates = " vs ".join(f"{fig.detail[f'{name} req/s'][-1]:.0f}" for name, _ in sides)
            at = f"{rnd + 1}/{ROUNDS} §{number(fig.section)}"
            progress(f"{at} {fig.name}: {value:.2f} ({rates}/s)")
    return [fig for fig, _ in duels]


class Bench:
    def __init__(self, stack: Stack) -> None:
        self.stack, self.cursors = stack, dict[tuple[str, str, int], int]()
        self.journal = dict[str, Figure]()  # section 7's figure of each endpoint
        self.main = {role: Users(10 + role, USERS, 10) for role in set(ROLE.values())}
        sizes = enumerate(SIZES.items())
        self.sized = {(size, role): Users(20 + 10 * i + role, count, size)
                      for i, (size, count) in sizes for role in self.main}  # fmt: skip
        template = Users(1, 10, 10)
        for users in [template, *self.main.values(), *self.sized.values()]:
            seed(stack.db_uri, users)
        self.svc, self.floor = stack.service("service"), stack.floor()
        self.recorder = Recorder(stack.env)
        recorded = {e: self.recorder.record(e, template) for e in ENDPOINTS}
        self.commands = {e: count for e, (count, _) in recorded.items()}
        self.replays = {e: replay for e, (_, replay) in recorded.items()}

    def cpu(self, pid: int) -> dict[str, int]:
        return {"server": pid, "db": self.stack.db.process.pid}

    def picks(self, where: str, endpoint: str, users: Users, count: int = RUN) -> list[Any]:
        """The next `count` (user, notification) of the endpoint on that server's data: a run
        sends fewer than RUN writes, and a users group holds thousands."""
        key = (where, endpoint, users.group)
        self.cursors[key] = end = self.cursors.get(key, 0) + count
        return [users.pick(n) for n in range(end - count, end)]

    def http(
        self, server: Server, endpoint: str, users: Users, conns: int = AT, **sent: Any
    ) -> Load:
        """`sent`: http_load's `headers` and `unique`."""
        reqs = [ENDPOINTS[endpoint](*p) for p in self.picks(server.url, endpoint, users)]
        return http_load(server.url, reqs, conns, SECONDS, self.cpu(server.pid), **sent)

    def raw(self, endpoint: str, users: Users, conns: int) -> Load:
        reqs = [self.replays[endpoint](*p) for p in self.picks(self.svc.url, endpoint, users)]
        return generate("mongo", self.stack.db_uri, reqs, conns, SECONDS, self.cpu(self.svc.pid))

    def side(
        self, name: str, server: Server, endpoint: str, users: Users, conns: int = AT, **sent: Any
    ) -> Side:
        return name, partial(self.http, server, endpoint, users, conns, **sent)


def anchor(bench: Bench) -> list[Figure]:
    """The service beside minimal.py, both at NOTIFICATIONS_LIMIT=100, each on its own users
    of the same shape, and the two floors (plain WSGI, the service's ASGI front)."""
    s0, stack, limit = "0. Service / minimal", bench.stack, str(CAP)
    sides = {
        "service": stack.service("service-100", NOTIFICATIONS_LIMIT=limit),
        "minimal": stack.wsgi("minimal", "minimal:create_app", NOTIFICATIONS_LIMIT=limit),
    }
    floors = {"WSGI": stack.wsgi("floor-wsgi", "floor:app"), "ASGI": bench.floor}
    users = {(name, size, role): Users(100 + 50 * i + 10 * j + role, GROUP, size)
             for i, name in enumerate(sides) for j, size in enumerate((CAP // 2, CAP))
             for role in {ROLE[e] for e in ANCHORED}}  # fmt: skip
    progress(f"seeding section 0's {len(users) * GROUP:,} users")
    for group in users.values():
        seed(stack.db_uri, group)
    for name, server in sides.items():  # each worker's client and first requests, unmeasured
        reads = [ENDPOINTS["GET /count"](*users[(name, CAP, 0)].pick(n)) for n in range(AT)]
        http_load(server.url, reads, AT, SECONDS, {})
    get: list[Request] = [("GET", "/", None)]
    both = Figure(s0, "floors", "ratio")
    duels: list[Duel] = [
        (both, [(k, partial(http_load, f.url, get, AT, SECONDS, {"server": f.pid}))
                for k, f in floors.items()])]  # fmt: skip
    for size, e in ((size, e) for size in (CAP // 2, CAP) for e in ANCHORED):
        name = f"{e}, {size} notifications a user, {AT} conns: service / minimal, req/s"
        pair = [bench.side(k, v, e, users[(k, size, ROLE[e])]) for k, v in sides.items()]
        duels.append((ratio(s0, name, "≥ 0.8", 0.8), pair))
    play(duels)
    for server in (*sides.values(), floors["WSGI"]):
        server.child.stop()
    how = {"WSGI": "plain granian WSGI", "ASGI": "the service's granian and ASGI front"}
    figs = [Figure(s0, f"floor: a one-line Flask JSON endpoint, {how[k]}, {AT} conns",
                   "CPU ms/req", rounds=both.detail[f"{k} server CPU ms/req"], load=both.load,
                   detail={"req/s": both.detail[f"{k} req/s"]}) for k in floors]  # fmt: skip
    for fig, _ in duels[1:]:
        figs.append(fig)
        for what, goal in (("server", "≤ 1.5"), ("db", "")):
            keys = [f"{side} {what} CPU ms/req" for side in sides]
            service, minimal = parts = [fig.detail.pop(k) for k in keys]
            name = fig.name.replace("req/s", f"{what} CPU ms/req")
            cpu = Figure(s0, name, "ratio", goal, (lambda v: v <= 1.5) if goal else None)
            cpu.rounds = [s / m for s, m in zip(service, minimal, strict=True)]
            cpu.load, cpu.detail = fig.load, dict(zip(keys, parts, strict=True))
            figs.append(cpu)
    return figs


def cost(bench: Bench) -> list[Figure]:
    s1, s2, s3 = "1. Service cost per request", "2. Throughput and latency", "3. Database work"
    floor = Figure(s1, f"floor: a one-line Flask JSON endpoint, {AT} conns", "CPU ms/req")
    get: list[Request] = [("GET", "/", None)]
    duels: list[Duel] = [
        (floor, [("floor", partial(http_load, bench.floor.url, get, AT, SECONDS,
                                   {"server": bench.floor.pid}))])]  # fmt: skip
    for e in ENDPOINTS:
        users = bench.main[ROLE[e]]
        duels += [(ratio(s2, f"{e}, {c} conns: service / raw pymongo", "≥ 0.9", 0.9),
                   [bench.side("service", bench.svc, e, users, c),
                    ("raw", partial(bench.raw, e, users, c))]) for c in CONNS]  # fmt: skip
    at = f", {AT} conns"
    pairs = {
        f.name.split(",")[0]: f for f in play(duels, lambda f: at in f.name)[1:] if at in f.name
    }
    floor.rounds = floor.detail.pop("floor server CPU ms/req")
    cost, work = [], []
    for e, pair in pairs.items():
        service, client = (pair.detail[f"{k} CPU ms/req"] for k in ("service server", "raw client"))
        # No goal since issue 16: service / minimal (section 0) is the CPU claim.
        fig = Figure(s1, f"{e}: (service - raw client) / floor", "ratio", load=pair.load)
        fig.rounds = [(s - c) / f for s, c, f in zip(service, client, floor.rounds, strict=True)]
        fig.detail = {"service CPU ms/req": service, "raw client CPU ms/req": client}
        fig.note = "the dispatcher's sending of the email included" if "email" in e else ""
        n, one = bench.commands[e], e in ONE
        cost.append(fig)
        work.append(Figure(s3, f"{e}: commands per request", "commands", "1" if one else "",
                           (lambda v: v <= 1) if one else None, rounds=[n], load=pair.load,
                           note="" if n == 1 else WHY.get(e, WHY["write"])))  # fmt: skip
        work[-1].detail["database CPU ms/req"] = pair.detail["service db CPU ms/req"]
    return [floor, *cost, *[fig for fig, _ in duels[1:]], *work]


def growth(bench: Bench) -> list[Figure]:
    stack, totals, users = bench.stack, (LARGE, 1000), {}
    uris = {t: urlsplit(stack.db_uri)._replace(path=f"/users_{t}").geturl() for t in totals}
    for total in totals:
        users[total] = {role: Users(10 + role, total // len(bench.main), 10) for role in bench.main}
        progress(f"seeding {total:,} users")
        for group in users[total].values():
            seed(uris[total], group)
    sides = [
        (f"{t:,} users", stack.service(f"users-{t}", DB_URI=uris[t]), users[t]) for t in totals
    ]
    duels = [(ratio("4. Growth", f"{e}: {LARGE:,} / 1,000 users", "≥ 0.9 (flat)", 0.9),
              [bench.side(name, server, e, users[ROLE[e]]) for name, server, users in sides])
             for e in GROWN]  # fmt: skip
    duels += [(ratio("4. Growth", f"{e}: 500 / 10 notifications a user", note=ARRAY[e[0]]),
               [bench.side(f"{size} notifications", bench.svc, e, bench.sized[(size, ROLE[e])])
                for size in SIZES]) for e in GROWN]  # fmt: skip
    figs = play(duels)
    for _, server, _ in sides:
        server.child.stop()
    return figs


def fan_out(bench: Bench) -> list[Figure]:
    users = bench.main[ROLE["POST /create"]]
    body = json.dumps({"user_ids": [users.pick(n)[0] for n in range(FAN)], "key": "new_message"})
    headers = {"Content-Type": "application/json"}
    post = urllib.request.Request(f"{bench.svc.url}/create", body.encode(), headers)

    def user_ids() -> Load:
        cpu0, start = cpu_seconds(bench.cpu(bench.svc.pid)), time.perf_counter()
        with urllib.request.urlopen(post, timeout=600) as response:
            made = json.load(response)["data"]["totals"]["created"]
        took, cpu = time.perf_counter() - start, cpu_seconds(bench.cpu(bench.svc.pid))
        per = {k: 1000 * (cpu[k] - cpu0[k]) / max(1, made) for k in cpu}
        return Load(made, took, FAN - made, 1000 * took, 1000 * took, per)

    def raw_bulk() -> Load:
        """The update documents the service sends, in one bulk_write of raw pymongo with
        the service's write concern, from this process."""
        layout = Layout.of(Config.from_env(bench.stack.env, dotenv=False))
        now, db = int(time.time()), bench.stack.db.process.pid
        writes = [UpdateOne(updates.create_filter(layout, ObjectId(u), require_email=False,
                                                  repeat_of=None),
                            updates.push(layout, {"id": new_id(), "timestamp": now, "is_new": True,
                                                  "user_id": u, "key": "new_message",
                                                  "target_id": None, "data": {}, "count": 1,
                                                  "collapse_key": None}))
                  for u in json.loads(body)["user_ids"]]  # fmt: skip
        with MongoClient[dict[str, Any]](bench.stack.db_uri, w="majority", journal=True) as c:
            c.admin.command("ping")
            cpu0, start = cpu_seconds({"db": db}), time.perf_counter()
            made = c.get_default_database()["users"].bulk_write(writes, ordered=False)
            took, cpu = time.perf_counter() - start, cpu_seconds({"db": db})
        per = {"db": 1000 * (cpu["db"] - cpu0["db"]) / max(1, made.matched_count)}
        return Load(made.matched_count, took, FAN - made.matched_count, 1000 * took,
                    1000 * took, per)  # fmt: skip

    # No goal since issue 16: SecantusDB's cost per document bounds it far below 20.
    fig = ratio("5. Fan-out", f"notifications/s: user_ids of {FAN:,} / single creates")
    fig.note = "db CPU a notification: SecantusDB's work per update is the bound"
    raw = ratio("5. Fan-out", f"notifications/s: user_ids of {FAN:,} / raw pymongo bulk_write "
                "of the same updates", "≥ 0.8", 0.8)  # fmt: skip
    single = bench.side("single", bench.svc, "POST /create", users)
    figs = play([(fig, [("user_ids", user_ids), single]),
                 (raw, [("user_ids", user_ids), ("raw bulk_write", raw_bulk)])])  # fmt: skip
    try:
        return [*figs, fan_out_memory(bench)]
    except Exception as exc:  # the section's other figures stand
        progress(f"FAILED: §5 memory: {exc!r}")
        return figs


def fan_out_memory(bench: Bench, rounds: int = 3, at_once: int = 4) -> Figure:
    """A service of its own (a database of its own, no dispatcher: the emails stay
    queued, disturbing no other section) and its RSS around `rounds` of `at_once`
    concurrent keyed fan-outs of FAN users of `new_login` (each user's email rendered and
    queued: the heaviest fan-out; 4 at once: what a process of 8 threads runs at most),
    with 2 KB of data, sampled every 10 ms: the peak growth of the process that grew
    most, and what stayed. A fan-out cut short by its deadline (503) is completed by its
    retry with the same Idempotency-Key, as a client would."""
    uri = urlsplit(bench.stack.db_uri)._replace(path="/fan_out_memory").geturl()
    users = Users(90, FAN, 10)
    seed(uri, users)
    server = bench.stack.service("fan-out-memory", DB_URI=uri, DISPATCHER_THREADS="0")
    data = {"title": "A new post", "body": "x" * 2048}
    body = json.dumps({"user_ids": [users.pick(n)[0] for n in range(FAN)], "key": "new_login",
                       "data": data}).encode()  # fmt: skip
    pid, before = server.pid, rss_mb(server.pid)
    peaks, done = list(before), threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            for i, mb in enumerate(rss_mb(pid)[: len(peaks)]):
                peaks[i] = max(peaks[i], mb)

    def post() -> None:
        headers = {"Content-Type": "application/json", "Idempotency-Key": new_id()}
        request = urllib.request.Request(f"{server.url}/create", body, headers)
        for _ in range(5):
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    response.read()
                return
            except urllib.error.HTTPError as exc:  # a 503: its Retry-After, then again
                progress(f"§5 fan-out answered {exc.code}: {exc.read()[:120]!r}")
                time.sleep(float(exc.headers.get("Retry-After", "1")))
        raise RuntimeError("a fan-out kept answering 503")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(rounds):
            posts = [threading.Thread(target=post) for _ in range(at_once)]
            for thread in posts:
                thread.start()
            for thread in posts:
                thread.join()
    finally:
        done.set()
        sampler.join()
        after = rss_mb(pid)
        server.child.stop()
    grew = [p - b for p, b in zip(peaks, before, strict=False)]
    stayed = [a - b for a, b in zip(after, before, strict=False)]
    name = (f"server RSS during {rounds} rounds of {at_once} concurrent fan-outs of {FAN:,} "
            "users (new_login, 2 KB data), peak growth")  # fmt: skip
    return Figure("5. Fan-out", name, "MB", rounds=[max(grew)],
                  detail={"RSS before MB": [max(before)], "RSS stayed MB": [max(stayed)]},
                  note=f"built and written {FAN_OUT_CHUNK} users at a time")  # fmt: skip


def durability(bench: Bench) -> list[Figure]:
    loose = bench.stack.service("unjournaled", DB_URI=f"{bench.stack.db_uri}&w=1&journal=false")
    duels: list[Duel] = []
    for e in PRICED:
        fig = ratio("7. Durability's price", f"{e}, {AT} conns: w=1,journal=false / default")
        fig.note = "make run's database fsyncs every commit (--sync-on-commit) whatever the "
        fig.note += "client asks" if e.startswith("POST") else "client asks; a read writes nothing"
        users = bench.main[ROLE[e]]
        duels.append((fig, [bench.side("w=1", loose, e, users),
                            bench.side("journaled", bench.svc, e, users)]))  # fmt: skip
    figs = play(duels)
    loose.child.stop()
    bench.journal = dict(zip(PRICED, figs, strict=True))
    return figs


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def prices(bench: Bench) -> list[Figure]:
    """What each guarantee costs a request: priced.py's `full` (the service) against its
    variant without it, all started at once and stopped after. Every server has API
    keys and every request sends one, so that auth's price is that of a real check."""
    key = f"bench-{os.urandom(16).hex()}"
    auth = {"Authorization": f"Bearer {key}"}
    progress(f"starting the price list's {1 + len(GUARANTEES)} servers")
    servers = bench.stack.priced(["full", *GUARANTEES.values()], API_KEYS=key)
    try:
        users = {e: bench.main[ROLE[e]] for e in PRICED}
        warm = [ENDPOINTS[e](*users[e].pick(n)) for e in PRICED for n in range(AT)]
        for variant, server in servers.items():  # each worker's clients, first requests
            load = http_load(server.url, warm, AT, SECONDS / 2, {}, auth)
            if load.errors:
                raise RuntimeError(f"priced:{variant}: {load.errors} of {load.requests} not 2xx")
        full, duels = servers["full"], list[Duel]()
        if _status(f"{full.url}{warm[0][1]}") != 401:  # without a key: refused, so checked
            raise RuntimeError("priced:full answers without an API key")
        for (guarantee, variant), e in ((g, e) for g in GUARANTEES.items() for e in PRICED):
            duels.append((Figure(S10, f"{e}: {guarantee}", "CPU ms/req"),
                          [bench.side("with", full, e, users[e], headers=auth),
                           bench.side("without", servers[variant], e, users[e],
                                      headers=auth)]))  # fmt: skip
        e = "POST /create"
        duels.append((Figure(S10, f"{e}: {IDEMPOTENT}", "CPU ms/req"),
                      [bench.side("with", full, e, users[e], headers=auth,
                                  unique="Idempotency-Key"),
                       bench.side("without", full, e, users[e], headers=auth)]))  # fmt: skip
        figs = play(duels)
    finally:
        for server in servers.values():  # all asked at once, then each waited for
            server.child.process.terminate()
        for server in servers.values():
            server.child.stop()
    for fig in figs:  # a round's value: the price (with - without), its rates' ratio kept
        with_, without = (fig.detail[f"{k} server CPU ms/req"] for k in ("with", "without"))
        fig.detail["req/s with / without"] = fig.rounds
        fig.rounds = [a - b for a, b in zip(with_, without, strict=True)]
    for e in PRICED:
        figs.append(Figure(S10, f"{e}: {STORED}", "CPU ms/req", rounds=[0.0],
                           note="none since the counts are computed when read, as minimal.py "
                           "does: 0 by construction; the database's CPU a request, service "
                           "beside minimal.py, is in section 0's db CPU rows"))  # fmt: skip
        journaled = bench.journal.get(e)
        if journaled is None or not journaled.rounds:
            continue  # section 7 failed: no row
        parts = {f"{k} {what} CPU ms/req": journaled.detail[f"{side} {what} CPU ms/req"]
                 for k, side in (("with", "journaled"), ("without", "w=1"))
                 for what in ("server", "db")}  # fmt: skip
        with_, without = parts["with server CPU ms/req"], parts["without server CPU ms/req"]
        figs.append(Figure(S10, f"{e}: {JOURNAL}", "CPU ms/req", load=journaled.load,
                           rounds=[a - b for a, b in zip(with_, without, strict=True)],
                           detail={**parts, "req/s with / without": [1 / r for r in
                                                                     journaled.rounds]},
                           note="no API keys (section 7's servers)"))  # fmt: skip
    return figs


def peers(bench: Bench) -> list[Figure]:
    import peer

    port, stack = free_port(), bench.stack
    other = peer.start_peer(stack.db_uri, stack.run_dir, port)
    if isinstance(other, str):
        return [Figure("9. Peers", f"skipped: {other}", "")]
    stack.children.append(other)
    peer.seed(stack.db_uri, [bench.main[0].pick(n)[0] for n in range(bench.main[0].count)])
    duels: list[Duel] = []
    for e, request in peer.REQUESTS.items():
        reqs = [request(u) for u, _ in bench.picks("peer", e, bench.main[ROLE[e]])]
        theirs = partial(http_load, f"http://127.0.0.1:{port}", reqs, AT, SECONDS,
                         bench.cpu(other.process.pid))  # fmt: skip
        name = f"{e}, {AT} conns: service / {peer.REPO} at {peer.COMMIT[:7]}"
        duels.append((ratio("9. Peers", name), [bench.side("service", bench.svc, e,
                      bench.main[ROLE[e]]), ("peer", theirs)]))  # fmt: skip
    figs = play(duels)
    other.stop()
    return figs


def email(bench: Bench) -> list[Figure]:
    import mail

    return mail.email_figures(bench.stack.db_uri, bench.stack.sink_port, ROUNDS, QUICK, progress)


def scale(bench: Bench) -> list[Figure]:
    import scale

    return scale.figures(bench.stack, ROUNDS, progress)


def memory(bench: Bench) -> list[Figure]:
    """RSS around MIXED requests from 64 connections: every endpoint and answers of every
    kind (a 400, a 404, a 405, static), weighted towards those that cost the database little
    so that the 100,000 the issue asks for take a minute or two, not six."""
    reads, creates, mixed = bench.main[0], bench.main[ROLE["POST /create"]], list[Request]()
    writes = [e for e in ENDPOINTS if e.startswith("POST")]
    for n in range(RUN):  # reads' users are the last section's: their writes disturb no other
        mixed += [("GET", "/health", None), ("GET", f"/count?user_id=x{n}", None),
                  ("GET", f"/nope/{n}", None), ("DELETE", "/list", None),
                  ("GET", "/docs", None)]  # fmt: skip
        if n % 2 == 0:  # of each 40 requests, 3 read the database and 1 writes
            read = ("GET /list", "GET /count")[n % 4 // 2]
            e = writes[n // 8 % len(writes)] if n % 8 == 0 else read
            mixed.append(ENDPOINTS[e](*(creates if "create" in e else reads).pick(n)))
    url, pid = bench.svc.url, bench.svc.pid
    http_load(url, mixed, 64, SECONDS, {})  # every cache filled first
    before, load_before, done, rate = rss_mb(pid), os.getloadavg()[0], 0, 1000.0
    while done < MIXED:  # runs sized by the last one's rate to end near MIXED
        load = http_load(url, mixed, 64, min(30, math.ceil((MIXED - done) / rate)), {})
        done, rate = done + load.requests, load.rate
        progress(
            f"§8 mixed requests: {done:,} of {MIXED:,} at {rate:.0f}/s ({load.errors:,} not 2xx)"
        )
    figs = []
    for i, (b, a) in enumerate(zip(before, rss_mb(pid), strict=True)):
        name = f"{'granian main' if i == 0 else f'worker {i}'}: RSS growth, {done:,} requests"
        around = [(load_before, os.getloadavg()[0])]
        figs.append(Figure("8. Memory", name, "MB", "≤ 5", lambda v: v <= 5, rounds=[a - b],
                           load=around, detail={"RSS before MB": [b]}))  # fmt: skip
    return figs


def _at_most(limit: float, value: float) -> bool:
    return value <= limit


def features(bench: Bench) -> list[Figure]:
    """Section 11 (features.py): each feature of issue 17 beside the create it adds to, on
    one server, each side on users of its own; throughput, then server and db CPU."""
    import features as f

    server = bench.stack.service("features", NOTIFICATIONS_LIMIT=str(CAP),
                                 **f.env(bench.stack.run_dir))  # fmt: skip
    groups = {(i, side): Users(400 + 10 * i + j, GROUP, CAP // 2)
              for i, pair in enumerate(f.PAIRS)
              for j, (side, _) in enumerate(pair[1:3])}  # fmt: skip
    progress(f"seeding section 11's {len(groups) * GROUP:,} users")
    for users in groups.values():
        seed(bench.stack.db_uri, users)

    def load(build: Callable[[str, str], Request], users: Users) -> Load:
        picks = bench.picks(f"{server.url} {id(build)}", "POST /create", users)
        reqs = [build(*p) for p in picks]
        return http_load(server.url, reqs, AT, SECONDS, bench.cpu(server.pid))

    duels: list[Duel] = []
    for i, (name, *sides, _) in enumerate(f.PAIRS):
        http_load(server.url, [b(*groups[(i, s)].pick(n)) for s, b in sides for n in range(AT)],
                  AT, SECONDS, {})  # each worker's first requests, unmeasured  # fmt: skip
        pair: list[Side] = [(s, partial(load, b, groups[(i, s)])) for s, b in sides]
        duels.append((ratio(f.S11, f"{name}, {AT} conns, req/s"), pair))
    play(duels)
    server.child.stop()
    figs = []
    for (fig, played), (*_, goal) in zip(duels, f.PAIRS, strict=True):
        figs.append(fig)
        names = [side for side, _ in played]
        for what, limit in (("server", goal), ("db", None)):
            keys = [f"{side} {what} CPU ms/req" for side in names]
            mine, theirs = parts = [fig.detail.pop(k) for k in keys]
            met = None if limit is None else partial(_at_most, limit)
            cpu = Figure(f.S11, fig.name.replace("req/s", f"{what} CPU ms/req"), "ratio",
                         f"≤ {limit}" if limit else "", met)  # fmt: skip
            cpu.rounds = [a / b for a, b in zip(mine, theirs, strict=True)]
            cpu.load, cpu.detail = fig.load, dict(zip(keys, parts, strict=True))
            figs.append(cpu)
    return figs


def digest_price(bench: Bench) -> list[Figure]:
    """Section 13 (digest_price.py): what email-if-unread costs a create when nothing is
    due, and a due email, beside a plain one: each round an embedded SecantusDB and an
    aiosmtpd that counts, in this process; wall time an operation."""
    import digest_price as dp

    s13 = "13. Email if unread: per create, and per email at due time"
    figs: dict[str, Figure] = {}
    for rnd in range(ROUNDS):
        dp.MEASURED.clear()
        dp.main(100 if QUICK else 300)
        for label, ms, commands in dp.MEASURED:
            fig = figs.setdefault(label, Figure(s13, label, "ms/op"))
            fig.rounds.append(ms)
            fig.detail.setdefault("commands/op", []).append(commands)
        shown = ", ".join(f"{f.rounds[-1]:.2f}" for f in figs.values())
        progress(f"{rnd + 1}/{ROUNDS} §13 ms/op: {shown}")
    return list(figs.values())


def profiles(bench: Bench, figures: list[Figure]) -> dict[str, list[str]]:
    missed = {f.name.split(":")[0].split(",")[0] for f in figures
              if number(f.section) in ("0", "2") and f.verdict == "missed"}  # fmt: skip
    picks = {e: bench.picks(bench.svc.url, e, bench.main[ROLE[e]], 10 if QUICK else 100)
             for e in ENDPOINTS if e in missed}  # fmt: skip
    return {e: bench.recorder.profile([ENDPOINTS[e](*p) for p in ps]) for e, ps in picks.items()}


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def write(path: Path, figures: list[Figure], profiled: dict[str, list[str]]) -> None:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, cwd=HERE).stdout.strip()

    cpu = [ln.split(":")[1].strip() for ln in out("lscpu").splitlines() if "Model name" in ln]
    changed = out("git", "status", "-s", "../notification_service") and " + changes"
    wrk = out("wrk", "-v").split(" [")[0] if shutil.which("wrk") else "no wrk: Python generator"
    versions = [f"{d} {meta.version(d)}" for d in ("flask", "pymongo", "granian", "secantusdb")]
    lines = [f"# make bench{' QUICK=1' if QUICK else ''}", "",
             f"- {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {(time.monotonic() - START) / 60:.0f} "
             f"min, commit {out('git', 'rev-parse', '--short', 'HEAD')}{changed}, {ROUNDS} "
             f"interleaved round(s) of runs of {SECONDS} s (section 2: {AT} connections "
             f"only beyond the first)",
             f"- {(cpu or ['?'])[0]}, {psutil.cpu_count()} cores, "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB, shared with others",
             f"- Python {platform.python_version()}, {', '.join(versions)}, {wrk}",
             f"- {RETIRED}", "",
             "Median of the rounds (min..max); load: the 1-minute load average around"]  # fmt: skip
    for section in sorted({f.section for f in figures}, key=lambda s: int(number(s))):
        shown_here = [f for f in figures if f.section == section]
        if section == S10:
            lines += ["", f"## {section}", "", *price_list(shown_here)]
            continue
        head = "| figure | median (min..max) | goal | | load | detail |\n|---|---|---|---|---|---|"
        lines += ["", f"## {section}", "", head]
        shown = SHOW.get(number(section), ("req/s", "CPU"))
        for f in shown_here:
            spread = f" ({_fmt(min(f.rounds))}..{_fmt(max(f.rounds))})" if len(f.rounds) > 1 else ""
            value = f"{_fmt(f.median)} {f.unit}{spread}" if f.rounds else ""
            load = f"{f.load[0][0]:.1f} → {f.load[-1][1]:.1f}" if f.load else ""
            detail = [f"{k} {_fmt(statistics.median(v))}" for k, v in f.detail.items()
                      if any(t in k for t in shown) or ("errors" in k and max(v))]  # fmt: skip
            detail += [f.note] if f.note else []
            lines.append(f"| {f.name} | {value} | {f.goal} | {f.verdict} | {load} | "
                         f"{'; '.join(detail)} |")  # fmt: skip
    lines += ["", "## Where the service's CPU goes", "", "cProfile (CPU time) of the service in "
              "one process (its test client: werkzeug's share) on each endpoint missing a goal "
              "of section 0 or 2: each module's own share, then the service's functions, "
              "callees included (the profiler inflates the ms)."]  # fmt: skip
    for endpoint, rows in profiled.items():
        lines += ["", f"`{endpoint}`", "", "```", *rows, "```"]
    path.write_text("\n".join(lines) + "\n")


def price_list(figures: list[Figure]) -> list[str]:
    """Section 10 as a table: a row a guarantee, its figures of each endpoint side by side."""
    rows: dict[str, dict[str, Figure]] = {}
    for fig in figures:
        e, guarantee = fig.name.split(": ", 1)
        rows.setdefault(guarantee, {})[e] = fig
    loads = [x for f in figures for x in f.load] or [(0.0, 0.0)]
    lines = [f"What each guarantee costs a request: the CPU ms a request of the server "
             f"processes (granian's main and workers) with it and without, {AT} connections; "
             f"the price, the median of each round's difference (with - without; min..max); "
             f"req/s with / without. Each variant is a factory of `priced.py` (the service's "
             f"factories given arguments) against `full`, the service composed the same way, "
             f"in the same interleaved rounds; every server has API keys and every request "
             f"sends one. Stated figures: no goals. Load "
             f"{min(b for b, _ in loads):.1f}..{max(a for _, a in loads):.1f}.",
             "", "| guarantee | " + " | ".join(f"{e}: with | without | price | req/s ratio"
                                                for e in PRICED) + " | notes |",
             "|---|" + "---|---|---|---|" * len(PRICED) + "---|"]  # fmt: skip
    for guarantee, by in rows.items():
        cells, notes = [], list(dict.fromkeys(f.note for f in by.values() if f.note))
        for e in PRICED:
            f = by.get(e)
            if f is None:
                cells += ["—"] * 4
                continue
            spread = f" ({min(f.rounds):+.2f}..{max(f.rounds):+.2f})" if len(f.rounds) > 1 else ""
            price = f"{f.median:+.2f}{spread}"
            if "with server CPU ms/req" not in f.detail:  # priced by construction
                cells += ["—", "—", "0", "—"]
                continue
            cells += [f"{f.part(f'{k} server CPU ms/req'):.2f}" for k in ("with", "without")]
            cells += [price, f"{f.part('req/s with / without'):.2f}"]
            if guarantee in (IDEMPOTENT, JOURNAL):  # their work is the database's
                db = "/".join(f"{f.part(f'{k} db CPU ms/req'):.2f}" for k in ("with", "without"))
                notes.append(f"{e} db CPU ms/req with/without {db}")
            errors = [max(f.detail.get(f"{k} errors", [0])) for k in ("with", "without")]
            if any(errors):
                notes.append(f"{e} errors with/without {errors[0]:.0f}/{errors[1]:.0f}")
        lines.append(f"| {guarantee} | {' | '.join(cells)} | {'; '.join(notes)} |")
    return lines


def charts(figures: list[Figure]) -> None:
    """Bar charts of figures' parts: a panel a (title, figure name with {e}, parts, endpoints)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = {f.name: f for f in figures if f.rounds}
    floor = next((f.median for f in figures if number(f.section) == "1"
                  and f.name.startswith("floor") and f.rounds), 0)  # fmt: skip
    panels = {
        "throughput": [(f"req/s, {c} connections", f"{{e}}, {c} conns: service / raw pymongo",
                        ["service req/s", "raw req/s"], tuple(ENDPOINTS)) for c in CONNS],
        "cpu": [(f"CPU ms per request, {AT} connections (one-line Flask: {floor:.2f})",
                 "{e}: (service - raw client) / floor",
                 ["service CPU ms/req", "raw client CPU ms/req"], tuple(ENDPOINTS))],
        "growth": [("req/s by users in the collection", f"{{e}}: {LARGE:,} / 1,000 users",
                    [f"{LARGE:,} users req/s", "1,000 users req/s"], GROWN),
                   ("req/s by notifications a user", "{e}: 500 / 10 notifications a user",
                    [f"{size} notifications req/s" for size in SIZES], GROWN)],
    }  # fmt: skip
    for name, chart in panels.items():
        fig, axes = plt.subplots(1, len(chart), figsize=(9, 5), squeeze=False)
        try:
            for ax, (title, figure, keys, endpoints) in zip(axes[0], chart, strict=True):
                width, at = 0.8 / len(keys), range(len(endpoints))
                for k, key in enumerate(keys):
                    values = [named[figure.format(e=e)].part(key) for e in endpoints]
                    ax.bar([i + (k - (len(keys) - 1) / 2) * width for i in at], values, width,
                           label=key)  # fmt: skip
                ax.set_xticks(at, [e.split(" ", 1)[1] for e in endpoints], rotation=60)
                ax.set_title(title, fontsize=9)
                ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(OUT / f"{name}.png", dpi=100)
        except KeyError as exc:  # a section failed: its chart is left out
            progress(f"no {name}.png: {exc!r} missing")
        plt.close(fig)


def main() -> int:
    failed, figures, profiled = False, list[Figure](), dict[str, list[str]]()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, LOG.open("wb") as log:
        os.dup2(log.fileno(), 1)  # the servers' output (a line a request), not the console's
        os.dup2(log.fileno(), 2)
        progress("seeding users, starting the service and the floor")
        stack = Stack(Path(tmp))
        try:
            bench = Bench(stack)
            sections: list[Callable[[Bench], list[Figure]]] = [anchor, cost, growth, fan_out]
            sections += [email, durability, prices, peers, memory, features, scale]
            sections += [digest_price]  # last: it patches classes in this process while it runs
            for section in sections:
                try:
                    figures += section(bench)
                except Exception as exc:  # the others still run, and all are written
                    failed = True
                    progress(f"FAILED: {exc!r}")
            profiled = profiles(bench, figures)
        except BaseException as exc:
            progress(f"FAILED: {exc!r}; the servers' output is in {LOG}")
            raise
        finally:
            stack.stop()
    OUT.mkdir(exist_ok=True)
    write(OUT / "RESULTS.md", figures, profiled)
    charts(figures)
    progress(f"wrote {OUT.relative_to(HERE.parent)}/RESULTS.md and the charts")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
