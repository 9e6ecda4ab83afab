"""Section 12 of `make bench`, scale-out: 1, 2 and 3 web processes, then 1, 2 and 3
dispatcher processes, against ONE database, to show where the database becomes the bound.

Web: each process is the service as `serve` starts it (granian, its workers and threads;
DISPATCHER_THREADS=0, as a scaled deployment runs them, NOTIFICATIONS_LIMIT=100 with
users seeded at the cap). The same total offered load, CONNS connections, is split
evenly across the processes, one load each, started together; for GET /count and POST
/create: the total req/s, the server CPU a request (every web process), the database's
CPU a request and its CPU utilisation (of one core), and the whole machine's.

Dispatchers: 1, 2 and 3 `python -m notification_service worker` processes (one thread
each) drain the same pre-filled outbox of EMAILS rendered new_login emails into the
Stack's mail sink: emails/s, from the moment the emails fall due (the workers, started
and idle before, poll every 50 ms) to the last one in the sink, and the database's CPU
an email and utilisation until every send is recorded.

`python bench/scale.py` runs this section alone (QUICK=1: the quick sizes); the servers'
output goes to $TMPDIR/notification-service-scale.log.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import harness
import psutil
from bson import json_util
from figures import Figure
from harness import Request, cpu_seconds, http_load
from mail import records
from pymongo import MongoClient
from service import ENDPOINTS, Server, Stack, Users, seed

from notification_service import embedded
from notification_service.config import Config
from notification_service.notifications import utc_now
from notification_service.runtime import build_runtime
from notification_service.storage.ids import new_id

S12 = "12. Scale-out on one database"
QUICK = os.environ.get("QUICK", "") not in ("", "0")
PROCESSES = (1, 2, 3)
CONNS = 24  # in all, split evenly: 24, 12 + 12, 8 + 8 + 8
SECONDS, EMAILS, USERS = (2, 400, 100) if QUICK else (3, 800, 200)
ENDPOINTS_SCALED = ("GET /count", "POST /create")
CAP = 100  # NOTIFICATIONS_LIMIT's default: users are seeded at it, creates keep them there
LEAD = 3.0  # seconds between the outbox's fill and its emails falling due
NOTE = (
    "2 cores: beyond 2 processes the web processes (or dispatchers), the load generator "
    "and the database compete for the same cores, which bounds what this machine can show"
)


def _progress(line: str) -> None:
    print(line, flush=True)


@dataclass
class Step:
    """One run of n processes: what the figures are made of."""

    rate: float  # requests (or emails) a second, all processes together
    work: int  # requests (or emails) done
    seconds: float  # wall time the CPU was counted over
    cpu: dict[str, float]  # CPU seconds of each watched group meanwhile
    machine: float  # the machine's CPU busy, % of all its cores
    ops: int = 0  # database operations meanwhile (serverStatus opcounters)
    errors: int = 0
    load: float = 0.0  # CPU seconds of the load generators (none with wrk: not counted)

    def detail(self, unit: str, workers: str) -> dict[str, float]:
        per = {k: 1000 * v / max(1, self.work) for k, v in self.cpu.items()}
        return {f"{workers} CPU ms/{unit}": per["workers"], f"db CPU ms/{unit}": per["db"],
                f"db operations/{unit}": self.ops / max(1, self.work),
                "db CPU % of a core": 100 * self.cpu["db"] / self.seconds,
                "machine CPU % of all cores": self.machine,
                **({"load generator CPU % of a core": 100 * self.load / self.seconds}
                   if self.load else {})}  # fmt: skip


class Opcounters:
    """The database's operations so far, all kinds (serverStatus' opcounters); `finds`,
    those of them that were queries (a find, not an aggregate) or their getMores."""

    def __init__(self, uri: str) -> None:
        self.client = MongoClient[dict[str, Any]](uri)
        self.finds = 0

    def __call__(self) -> int:
        counters = self.client.admin.command("serverStatus")["opcounters"]
        self.finds = int(counters["query"]) + int(counters["getmore"])
        return int(sum(counters.values()))


def together(
    targets: list[tuple[str, list[Request], int]], cpu: dict[str, list[int]], ops: Opcounters
) -> Step:
    """One load a target (url, requests, connections), all started at once, for SECONDS;
    the CPU of each group of process trees meanwhile. wrk when installed, else harness.py
    as a generator in a process of its own per target, started once all are ready."""
    groups = {f"{k} {pid}": pid for k, pids in cpu.items() for pid in pids}
    psutil.cpu_percent()
    if shutil.which("wrk"):
        with ThreadPoolExecutor(len(targets)) as pool:
            cpu0, ops0, start = cpu_seconds(groups), ops(), time.perf_counter()
            loads = list(pool.map(lambda t: http_load(t[0], t[1], t[2], SECONDS, {}), targets))
        got = [{"requests": x.requests, "seconds": x.seconds, "errors": x.errors} for x in loads]
    else:
        argv = [sys.executable, harness.__file__]
        procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True) for _ in targets]  # fmt: skip
        for p, (url, reqs, conns) in zip(procs, targets, strict=True):
            spec = {"kind": "http", "url": url, "reqs": reqs, "conns": conns,
                    "seconds": SECONDS, "headers": {}, "unique": None}  # fmt: skip
            assert p.stdin is not None
            p.stdin.write(json_util.dumps(spec) + "\n")
            p.stdin.flush()
        for p in procs:
            assert p.stdout is not None
            p.stdout.readline()  # ready: its threads start when its stdin closes
        cpu0, ops0, start = cpu_seconds(groups), ops(), time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        got = [json.loads(p.stdout.readline()) for p in procs if p.stdout is not None]
        for p in procs:
            p.wait()
    seconds, cpu1, done_ops = time.perf_counter() - start, cpu_seconds(groups), ops() - ops0
    used = {k: sum(cpu1[g] - cpu0[g] for g in groups if g.startswith(f"{k} ")) for k in cpu}
    rate = sum(float(g["requests"]) / float(g["seconds"]) for g in got)
    done, errors = sum(int(g["requests"]) for g in got), sum(int(g["errors"]) for g in got)
    client = sum(float(g.get("cpu", 0.0)) for g in got)
    return Step(rate, done, seconds, used, psutil.cpu_percent(), done_ops, errors, client)


def web(stack: Stack, rounds: int, progress: Callable[[str], None]) -> list[Figure]:
    users = {e: Users(700 + n, USERS, CAP) for n, e in enumerate(ENDPOINTS_SCALED)}
    progress(f"§12 seeding {len(users) * USERS:,} users at {CAP} notifications")
    for group in users.values():
        seed(stack.db_uri, group)
    progress(f"§12 starting {max(PROCESSES)} web processes")
    servers: list[Server] = [stack.service(f"scale-web-{n}", NOTIFICATIONS_LIMIT=str(CAP),
                                           DISPATCHER_THREADS="0")
                             for n in range(max(PROCESSES))]  # fmt: skip
    db, ops = stack.db.process.pid, Opcounters(stack.db_uri)
    figs = {(e, n): Figure(S12, f"{e}: {n} web process{'es' if n > 1 else ''}, {CONNS} "
                           "connections in all", "req/s", note=NOTE if n > 2 else "")
            for e in ENDPOINTS_SCALED for n in PROCESSES}  # fmt: skip
    sent = dict.fromkeys(ENDPOINTS_SCALED, 0)

    def requests(e: str, count: int) -> list[Request]:
        """The next `count` requests of `e`, each user's notifications in turn."""
        first, sent[e] = sent[e], sent[e] + count
        return [ENDPOINTS[e](*users[e].pick(k)) for k in range(first, first + count)]

    try:
        for server in servers:  # each worker's client and first requests, unmeasured
            warm = [r for e in ENDPOINTS_SCALED for r in requests(e, CONNS)]
            http_load(server.url, warm, CONNS, 1, {})
        for rnd in range(rounds):
            for e in ENDPOINTS_SCALED:
                for n in PROCESSES if rnd % 2 == 0 else PROCESSES[::-1]:
                    per = CONNS // n
                    targets = [(s.url, requests(e, 300), per) for s in servers[:n]]
                    fig = figs[(e, n)]
                    step = fig.add(partial(_web_step, targets, servers[:n], db, ops, fig))
                    db_use = fig.detail["db CPU % of a core"][-1]
                    progress(f"§12 {rnd + 1}/{rounds} {e}, {n} web: {step:.0f} req/s, db "
                             f"{db_use:.0f}% of a core")  # fmt: skip
    finally:
        for server in servers:
            server.child.stop()
    for e in ENDPOINTS_SCALED:
        one = figs[(e, 1)].median
        for n in PROCESSES:
            figs[(e, n)].detail["/ 1 process"] = [r / one for r in figs[(e, n)].rounds]
    return list(figs.values())


def _web_step(targets: list[tuple[str, list[Request], int]], servers: list[Server], db: int,
              ops: Opcounters, fig: Figure) -> float:  # fmt: skip
    step = together(targets, {"workers": [s.pid for s in servers], "db": [db]}, ops)
    for key, value in {**step.detail("req", "server"), "errors": step.errors}.items():
        fig.detail.setdefault(key, []).append(value)
    return step.rate


def dispatchers(stack: Stack, rounds: int, progress: Callable[[str], None]) -> list[Figure]:
    name = f"bench_scale_{uuid.uuid4().hex[:8]}"
    uri = urlsplit(stack.db_uri)._replace(path=f"/{name}").geturl()
    config = Config(db_uri=uri, smtp_host="127.0.0.1", smtp_port=stack.sink_port,
                    smtp_security="none")  # fmt: skip
    runtime = build_runtime(config, dispatcher_threads=0)
    outbox, emails = runtime.services.outbox, records(EMAILS, config)
    sink = stack.run_dir.parent / "mail"  # where Stack's sink writes its .eml files
    env = {**stack.env, "DB_URI": uri, "DISPATCHER_THREADS": "1",
           "DISPATCH_POLL_SECONDS": "0.05"}  # fmt: skip
    figs = {n: Figure(S12, f"dispatchers: {n} worker process{'es' if n > 1 else ''} of 1 "
                      f"thread, {EMAILS:,} emails", "emails/s", note=NOTE if n > 2 else "")
            for n in PROCESSES}  # fmt: skip
    db, mail = stack.db.process.pid, stack.children[1].process.pid
    ops = Opcounters(stack.db_uri)

    def drain(n: int) -> float:
        workers = [embedded.start_worker(env, stack.run_dir, name=f"scale-worker-{k}")
                   for k in range(n)]  # fmt: skip
        try:
            before = _delivered(sink)
            due = utc_now() + timedelta(seconds=LEAD)
            outbox.enqueue_many(emails, due, email_ids=[new_id() for _ in emails])
            time.sleep(max(0.0, (due - utc_now()).total_seconds()))
            groups = {"workers": [w.process.pid for w in workers], "db": [db], "sink": [mail]}
            flat = {f"{k} {pid}": pid for k, pids in groups.items() for pid in pids}
            psutil.cpu_percent()
            cpu0, ops0, start = cpu_seconds(flat), ops(), time.perf_counter()
            finds0 = ops.finds
            deadline = start + 60 + EMAILS / 10
            while _delivered(sink) < before + EMAILS:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{n} dispatchers: {_delivered(sink) - before} of "
                                       f"{EMAILS} emails delivered")  # fmt: skip
                time.sleep(0.02)
            sent = time.perf_counter() - start
            while outbox.records.count_documents({"status": "sent"}) < EMAILS:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{n} dispatchers: sends not all recorded")
                time.sleep(0.05)
            seconds, cpu1, done_ops = time.perf_counter() - start, cpu_seconds(flat), ops()
        finally:
            for worker in workers:
                worker.process.terminate()
            for worker in workers:
                worker.stop()
        outbox.records.delete_many({})
        used = {k: sum(cpu1[g] - cpu0[g] for g in flat if g.startswith(f"{k} ")) for k in groups}
        step = Step(EMAILS / sent, EMAILS, seconds, used, psutil.cpu_percent(), done_ops - ops0)
        detail = {**step.detail("email", "dispatcher"),
                  "db finds/email": (ops.finds - finds0) / EMAILS,
                  "sink CPU % of a core": 100 * used["sink"] / seconds}  # fmt: skip
        for key, value in detail.items():
            figs[n].detail.setdefault(key, []).append(value)
        return step.rate

    try:
        for rnd in range(rounds):
            for n in PROCESSES if rnd % 2 == 0 else PROCESSES[::-1]:
                rate = figs[n].add(partial(drain, n))
                progress(f"§12 {rnd + 1}/{rounds} {n} dispatchers: {rate:.0f} emails/s, db "
                         f"{figs[n].detail['db CPU % of a core'][-1]:.0f}% of a core")  # fmt: skip
    finally:
        runtime.client.drop_database(name)
        runtime.close()
    one = figs[1].median
    for fig in figs.values():
        fig.detail["/ 1 process"] = [r / one for r in fig.rounds]
    return list(figs.values())


def _delivered(sink: Path) -> int:
    return sum(1 for entry in os.scandir(sink) if entry.name.endswith(".eml"))


def figures(stack: Stack, rounds: int, progress: Callable[[str], None]) -> list[Figure]:
    return [*web(stack, rounds, progress), *dispatchers(stack, rounds, progress)]


def main() -> int:
    """This section alone, its table on the console."""
    console = os.fdopen(os.dup(1), "w", buffering=1)
    log = Path(tempfile.gettempdir()) / "notification-service-scale.log"
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:4.0f}s] {line}", file=console)

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, log.open("wb") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        stack = Stack(Path(tmp))
        try:
            figs = figures(stack, 1 if QUICK else 3, progress)
        finally:
            stack.stop()
    for fig in figs:
        parts = "; ".join(f"{k} {statistics.median(v):.3g}" for k, v in fig.detail.items()
                          if "errors" not in k or max(v))  # fmt: skip
        print(f"{fig.name}: {fig.median:.0f} {fig.unit} | {parts}", file=console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
