"""What durability costs: request throughput under five database settings, side by side.

Each setting gets its own SecantusDB on disk, started with `make run`'s command line
(`embedded.database_argv`) less what the setting leaves out, and its own app
(`create_app`, dispatchers off) in this process, driven through Flask's test client
from 16 threads (no HTTP server: what differs between the settings is the database
work). Rounds interleave the settings, rotating their order; the summary is the median
req/s with min and max.

  a  before: no --sync-on-commit, writes acknowledged unjournaled (w:1), retryable
  b  make run now: --sync-on-commit, {w: majority, j: true}, retryWrites=false
  c  as b with retryable writes (the driver's default)
  d  as b without --sync-on-commit (j: true alone makes each write fsync)
  e  as a with retryWrites=false: no durability at all, to isolate what it costs

Before measuring, each database takes 12,000 writes, as a server that has run a while
has: SecantusDB keeps every retryable write's reply for 30 minutes (at most 10,000)
and scans them on each write.

    .venv/bin/python bench/durability.py           # 5 rounds of 3 s, about 13 minutes
    .venv/bin/python bench/durability.py --quick   # 2 rounds of 1 s, no file saved
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bson import ObjectId
from flask import Flask
from report import REPO, Report, run_threads  # bench/report.py, beside this script

from notification_service import embedded
from notification_service.config import Config
from notification_service.server import Runtime, create_app

THREADS = 16
USERS = 16
PREFILL = 12_000
ENDPOINTS = ("create new_message", "create new_login", "read")


@dataclass
class Setting:
    key: str
    label: str
    sync_on_commit: bool
    uri_options: str  # DB_URI's query; connect() adds {w: majority, j: true} unless w is given
    data: Path = field(init=False)
    child: embedded.Child = field(init=False)
    app: Flask = field(init=False)
    writers: list[str] = field(default_factory=list)
    readers: dict[str, list[str]] = field(default_factory=dict)
    results: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def start(self, root: Path) -> None:
        self.data = root / self.key
        port = embedded.free_port()
        argv = embedded.database_argv(self.data, port)
        if not self.sync_on_commit:
            argv.remove("--sync-on-commit")
        self.child = embedded.spawn(f"db-{self.key}", argv, root / "run")
        embedded.wait_for_port("127.0.0.1", port, self.child.process, 60)
        uri = f"mongodb://127.0.0.1:{port}/bench{self.uri_options}"
        self.app = create_app(Config(db_uri=uri, dispatcher_threads=0, log_level="WARNING"))
        users = self.runtime.services.store.users
        for group in ("writers", "readers"):
            for _ in range(USERS):
                uid = ObjectId()
                items = [
                    {"id": str(ObjectId()), "timestamp": 0, "is_new": True, "user_id": str(uid),
                     "key": "new_message", "target_id": None, "data": {}}
                    for _ in range(100)
                ]  # fmt: skip
                users.insert_one({"_id": uid, "email": "u@x.test", "notifications": items})
                if group == "writers":
                    self.writers.append(str(uid))
                else:
                    self.readers[str(uid)] = [n["id"] for n in items]

    @property
    def runtime(self) -> Runtime:
        rt: Runtime = self.app.extensions["notification_service"]
        return rt

    def prefill(self, report: Report) -> None:
        """PREFILL small updates from 8 threads, reported every 3,000."""
        users = self.runtime.services.store.users
        users.insert_one({"_id": "filler", "n": 0})

        def work(_thread: int) -> None:
            for _ in range(3000 // 8):
                users.update_one({"_id": "filler"}, {"$inc": {"n": 1}})

        for done in range(3000, PREFILL + 1, 3000):
            elapsed, cpu = run_threads(8, work, self.child.process.pid)
            n = 3000 // 8 * 8
            report(
                f"  prefill {self.key} {done:>6,} writes: {n / elapsed:5.0f} "
                f"writes/s, {1000 * cpu / n:5.2f} ms db CPU/write"
            )

    def measure(self, endpoint: str, seconds: float) -> tuple[float, float, Counter[int]]:
        """req/s, database CPU ms per request, and the statuses answered."""
        statuses: Counter[int] = Counter()
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def client(n: int) -> None:
            http, rng, mine = self.app.test_client(), random.Random(n), Counter[int]()
            while time.monotonic() < stop:
                if endpoint == "read":
                    user = rng.choice(list(self.readers))
                    query = f"user_id={user}&notification_id={rng.choice(self.readers[user])}"
                    status = http.post(f"/read?{query}").status_code
                else:
                    body = {"user_id": rng.choice(self.writers), "key": endpoint.split()[1]}
                    status = http.post("/create", json=body).status_code
                mine[status] += 1
            with lock:
                statuses.update(mine)

        elapsed, cpu = run_threads(THREADS, client, self.child.process.pid)
        ok = sum(n for status, n in statuses.items() if status < 300)
        return ok / elapsed, 1000 * cpu / max(1, ok), statuses

    def stop(self) -> None:
        self.runtime.close()
        self.child.stop()


def settings() -> list[Setting]:
    return [
        Setting("a", "before: unjournaled, retryable", False, "?w=1"),
        Setting("b", "make run: journaled, retryWrites=false", True, "?retryWrites=false"),
        Setting("c", "journaled, retryable", True, ""),
        Setting("d", "journaled, no --sync-on-commit", False, "?retryWrites=false"),
        Setting("e", "unjournaled, retryWrites=false", False, "?w=1&retryWrites=false"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s, not saved")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.no_save = 2, 1.0, True
    day = dt.date.today().isoformat()
    report = Report(None if args.no_save else REPO / f"bench/results/durability-{day}.txt")
    complete = False
    chosen = settings()
    with tempfile.TemporaryDirectory(prefix="durability-bench-") as tmp:
        try:
            now = dt.datetime.now(dt.UTC)
            report(
                f"durability, {now:%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.2f}; "
                f"{args.rounds} rounds of {args.seconds:g} s, {THREADS} threads"
            )
            for s in chosen:
                s.start(Path(tmp))
                client = s.runtime.client
                report(
                    f"  {s.key}  {s.label}: sync-on-commit {s.sync_on_commit}, DB_URI options "
                    f"{s.uri_options or '(none)'}, write concern "
                    f"{client.write_concern.document}, retryWrites {client.options.retry_writes}"
                )
            if not args.quick:
                for s in chosen:
                    s.prefill(report)
            for s in chosen:
                for endpoint in ENDPOINTS:
                    s.measure(endpoint, min(1.0, args.seconds))  # warm-up
            unexpected: Counter[int] = Counter()
            for r in range(args.rounds):
                order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
                for endpoint in ENDPOINTS:
                    line = []
                    for s in order:
                        per_s, cpu_ms, statuses = s.measure(endpoint, args.seconds)
                        s.results.setdefault(endpoint, []).append((per_s, cpu_ms))
                        unexpected.update({k: v for k, v in statuses.items() if k >= 300})
                        line.append(f"{s.key} {per_s:6.0f} req/s {cpu_ms:5.1f} ms db CPU")
                    report(f"round {r + 1} {endpoint:<19} " + " | ".join(line))
            report()
            report("medians (min-max) req/s; db CPU ms/request; ratio to b")
            for endpoint in ENDPOINTS:
                b = statistics.median(p for p, _ in chosen[1].results[endpoint])
                for s in chosen:
                    rates = [p for p, _ in s.results[endpoint]]
                    cpus = [c for _, c in s.results[endpoint]]
                    med = statistics.median(rates)
                    report(
                        f"{endpoint:<19} {s.key} {med:6.0f} ({min(rates):.0f}-{max(rates):.0f})"
                        f"  {statistics.median(cpus):5.1f} ms  x{med / b:.2f}  {s.label}"
                    )
            report(f"non-2xx answers: {dict(unexpected) or 'none'}")
            complete = True
        finally:
            for s in chosen:
                if hasattr(s, "app"):
                    s.stop()
            report.close(complete=complete)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
