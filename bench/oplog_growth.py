"""Cost per write as the embedded database's oplog grows: make run's bounds vs the defaults.

Two SecantusDB processes on disk, both started with `make run`'s command line
(`embedded.database_argv`), one of them without its --oplog-* flags (SecantusDB's
defaults: 100,000 entries, one hour). The same writes go to both in interleaved blocks,
through the service's own client (`connect`) and storage code: a capped `$push` of a
notification (`InboxStore.append_capped`, the update_one form) and an outbox insert
(`Outbox.enqueue`), alternately, from 4 threads. Each block reports writes/s, the mean
latency of a write and the database's CPU per write (from /proc).

    .venv/bin/python bench/oplog_growth.py                 # 300,000 writes each, ~25 min
    .venv/bin/python bench/oplog_growth.py --writes 40000 --block 10000 --no-save
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bson import ObjectId
from report import REPO, Report, run_threads  # bench/report.py, beside this script

from notification_service import embedded
from notification_service.config import Config
from notification_service.mongo_connector import InboxStore, connect, database
from notification_service.outbox import Outbox

THREADS = 4
USERS = 64


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


class Target:
    """One database and the service's storage objects on it."""

    def __init__(self, label: str, root: Path, run_dir: Path, oplog_flags: bool) -> None:
        self.label, self.data = label, root / label.replace(" ", "-")
        self.data.mkdir(parents=True)
        port = embedded.free_port()
        argv = embedded.database_argv(self.data, port)
        if not oplog_flags:
            for flag in ("--oplog-max-entries", "--oplog-retention-seconds"):
                i = argv.index(flag)
                del argv[i : i + 2]
        self.argv = argv
        self.child = embedded.spawn(label.replace(" ", "-"), argv, run_dir)
        embedded.wait_for_port("127.0.0.1", port, self.child.process, 60)
        self.config = Config(db_uri=embedded.database_uri(port), db_timeout_ms=30_000)
        self.client = connect(self.config)
        db = database(self.client, self.config)
        self.store = InboxStore(db, self.config)
        self.outbox = Outbox(db, self.config.outbox_collection)
        self.outbox.ensure_indexes()
        self.users = [str(ObjectId()) for _ in range(USERS)]
        self.store.users.insert_many(
            [{"_id": ObjectId(u), "email": "u@x.test"} for u in self.users]
        )
        self.writes = 0

    def write(self, n: int) -> None:
        i = self.writes + n
        if i % 2:
            user_id = self.users[i % USERS]
            notification: Any = {
                "id": str(ObjectId()), "timestamp": 0, "is_new": True, "user_id": user_id,
                "key": "new_message", "target_id": None, "data": {"n": i},
            }  # fmt: skip
            self.store.append_capped(user_id, notification, require_email=False)
        else:
            record = {"kind": "custom", "to": "u@x.test", "subject": "s", "text": "t" * 200,
                      "html": None, "message_id": f"<{i}@bench>"}  # fmt: skip
            self.outbox.enqueue(record, dt.datetime.now(dt.UTC))

    def block(self, count: int) -> dict[str, float]:
        """`count` writes from THREADS threads; throughput, latency, database CPU."""
        latencies: list[float] = []
        lock = threading.Lock()
        share = count // THREADS

        def worker(t: int) -> None:
            mine = []
            for k in range(share):
                started = time.perf_counter()
                self.write(t * share + k)
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

        elapsed, cpu = run_threads(THREADS, worker, self.child.process.pid)
        self.writes += share * THREADS
        return {
            "writes": self.writes,
            "per_s": share * THREADS / elapsed,
            "latency_ms": 1000 * statistics.fmean(latencies),
            "cpu_ms": 1000 * cpu / (share * THREADS),
            "disk_mib": size_mib(self.data),
        }

    def stop(self) -> None:
        self.client.close()
        self.child.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=300_000, help="per database")
    parser.add_argument("--block", type=int, default=10_000)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    day = dt.date.today().isoformat()
    report = Report(None if args.no_save else REPO / f"bench/results/oplog_growth-{day}.txt")
    complete = False
    with tempfile.TemporaryDirectory(prefix="oplog-bench-") as tmp:
        root = Path(tmp)
        targets: list[Target] = []
        try:
            targets.append(Target("secantus defaults", root, root / "run", oplog_flags=False))
            targets.append(Target("make run", root, root / "run", oplog_flags=True))
            now = dt.datetime.now(dt.UTC)
            report(
                f"oplog growth, {now:%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.2f}; "
                f"{THREADS} threads, blocks of {args.block}"
            )
            for target in targets:
                report(f"  {target.label}: {' '.join(target.argv[1:])}")
            report(
                f"{'database':<18} {'writes':>8} {'writes/s':>9} {'ms/write':>9} "
                f"{'db CPU ms/write':>16} {'disk MiB':>9}"
            )
            for n in range(args.writes // args.block):
                # Alternate which goes first: the shared machine drifts.
                for target in targets if n % 2 == 0 else targets[::-1]:
                    r = target.block(args.block)
                    report(
                        f"{target.label:<18} {r['writes']:>8,.0f} {r['per_s']:>9.0f} "
                        f"{r['latency_ms']:>9.2f} {r['cpu_ms']:>16.2f} {r['disk_mib']:>9.0f}"
                    )
            complete = True
        finally:
            for target in targets:
                target.stop()
            report.close(complete=complete)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
