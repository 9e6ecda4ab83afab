"""Live streams: what 1,000 open GET /stream connections cost the API, and event latency.

For each server mode, SecantusDB as a one-node replica set (change streams) and with
`--standalone` (the polling fallback): the database, the mail sink and the service as
`make run` serves them (granian ASGI, `web_server_argv`, 2 workers of 8 threads),
API_KEYS set. Per round and mode, rotating the order: GET /count throughput from wrk
(1 thread, 16 connections) with no stream open and with STREAMS streams open (10 per
user), held by a separate process (this script with --client: asyncio, raw HTTP/1.1);
then EVENTS fan-out POST /create to all the users, each timed from just before the POST
to each stream's receipt of its `notification` event (CLOCK_MONOTONIC is shared by
processes); RSS and threads of the web server's processes with 0 and STREAMS streams.

    .venv/bin/python bench/streams.py [--quick] [--no-save]   # ~6 min; quick ~40 s

The output is saved as bench/results/streams-<date>.txt unless --no-save or --quick.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from bson import ObjectId
from pymongo import MongoClient
from report import REPO, Report  # bench/report.py, beside this script

from notification_service import embedded
from notification_service.__main__ import web_server_argv
from notification_service.config import Config

HOST, KEY = "127.0.0.1", "bench-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
MARK = re.compile(rb'"mark":"([0-9a-z-]+)"')


async def client(port: int, users: list[str], n: int) -> None:
    """Hold n streams; print `open <ok> <refusals by status and code>`, then
    `evt <mark> <monotonic>` lines."""
    ok, refused = 0, Counter[str]()
    out: list[str] = []

    async def one(i: int) -> None:
        nonlocal ok
        for _ in range(30):  # as EventSource would, after a refusal (faster: 0.2 s, not 3 s)
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"GET /stream?user_id={users[i % len(users)]} HTTP/1.1\r\nHost: b\r\n"
                         f"Authorization: Bearer {KEY}\r\n\r\n".encode())  # fmt: skip
            head = await reader.readuntil(b"\r\n\r\n")
            if (status := head.split(b" ", 2)[1].decode()) == "200":
                break
            length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            code = re.search(
                rb'"code": *"(\w+)"', await reader.read(int(length[1]) if length else 0)
            )
            refused[f"{status}:{code[1].decode() if code else '?'}"] += 1
            writer.close()
            await asyncio.sleep(0.2)
        else:
            return
        ok += 1
        if ok == n:
            out.append(f"open {ok} {','.join(f'{k}={v}' for k, v in refused.items()) or '-'}")
        async for line in reader:  # each event is whole inside one chunk of the body
            if line.startswith(b"data: ") and (found := MARK.search(line)):
                out.append(f"evt {found[1].decode()} {time.monotonic()}")

    tasks = [asyncio.create_task(one(i)) for i in range(n)]

    async def flush() -> None:
        while True:
            if out:
                sys.stdout.write("".join(f"{x}\n" for x in out))
                sys.stdout.flush()
                out.clear()
            await asyncio.sleep(0.02)

    flusher = asyncio.create_task(flush())
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until told
    for task in (*tasks, flusher):
        task.cancel()


class Streams:
    """The client process, and the receipts it reports."""

    def __init__(self, port: int, users: list[str], n: int) -> None:
        argv = [sys.executable, __file__, "--client", str(port), str(n), *users]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.opened, self.refused = threading.Event(), ""
        self.got: dict[str, list[float]] = defaultdict(list)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, a, b = line.split()
            if kind == "open":
                self.refused = b
                self.opened.set()
            else:
                self.got[a].append(float(b))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(30)


def request(port: int, method: str, path: str, body: object = None) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        conn.request(method, path, body=json.dumps(body) if body else None, headers=AUTH)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wrk(port: int, user: str, seconds: int) -> float:
    argv = ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", f"Authorization: Bearer {KEY}",
            f"http://{HOST}:{port}/count?user_id={user}"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return float(re.search(r"Requests/sec:\s*([\d.]+)", out)[1])  # type: ignore[index]


def usage(pgid: int) -> tuple[float, int, int]:
    """RSS MiB and threads summed over the web server's processes, and how many."""
    rss, threads, procs = 0.0, 0, 0
    for entry in os.scandir("/proc"):
        with contextlib.suppress(OSError, ValueError):
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                status = Path(f"/proc/{entry.name}/status").read_text()
                rss += int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]
                threads += int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
                procs += 1
    return rss, threads, procs


def start(mode: str, work: Path, stack: contextlib.ExitStack, users: list[str]) -> tuple[int, int]:
    """Database, sink and service for `mode`; return the service's port and pgid."""
    run, db_port, sink_port, port = work / mode, *(embedded.free_port() for _ in range(3))
    extra = ["--standalone"] if mode == "standalone" else []
    db = embedded.spawn("db", [*embedded.database_argv(run / "db", db_port), *extra], run)
    stack.callback(db.stop)
    embedded.wait_for_port(HOST, db_port, db.process, 60)
    sink_argv = [sys.executable, "-m", "notification_service", "sink", "--port", str(sink_port),
                 "--dir", str(run / "mail")]  # fmt: skip
    sink = embedded.spawn("sink", sink_argv, run)
    stack.callback(sink.stop)
    embedded.wait_for_port(HOST, sink_port, sink.process, 30)
    env = {
        k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")
    }
    env |= {"HOST": HOST, "PORT": str(port), "DB_URI": embedded.database_uri(db_port),
            "SMTP_HOST": HOST, "SMTP_PORT": str(sink_port), "SMTP_SECURITY": "none",
            "API_KEYS": KEY, "LOG_LEVEL": "WARNING"}  # fmt: skip
    with contextlib.chdir(run):  # no developer's ./.env
        web = embedded.spawn("web", web_server_argv(Config.from_env(env, dotenv=False)), run, env)
    stack.callback(lambda: web.stop(timeout=40))
    embedded.wait_for_port(HOST, port, web.process, 60)
    # A fan-out only reaches users that exist.
    with MongoClient[dict[str, object]](env["DB_URI"]) as mongo:
        docs = [{"_id": ObjectId(u), "email": "u@example.com", "notifications": []} for u in users]
        mongo.get_default_database().users.insert_many(docs)
    return port, web.process.pid


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 streams, one round")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--client", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        port, n, *users = args.client
        asyncio.run(client(int(port), users, int(n)))
        return 0
    n, rounds, events, seconds = (200, 1, 3, 3) if args.quick else (1000, 5, 5, 8)
    users = [str(ObjectId()) for _ in range(n // 10)]
    save = not (args.quick or args.no_save)
    report = Report(REPO / "bench" / "results" / f"streams-{dt.date.today()}.txt" if save else None)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    report(
        f"# GET /stream: {n} streams ({len(users)} users x 10), {rounds} round(s), "
        f"{events} fan-out events a round; {dt.datetime.now():%Y-%m-%d %H:%M}, commit {head}"
    )
    report(f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")
    modes = ["change streams", "standalone"]
    res: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
    complete = False
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: report.close(complete=complete))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streams_")))
        servers = {m: start(m, work, stack, users) for m in modes}
        report("started: " + ", ".join(f"{m} on port {p}" for m, (p, _) in servers.items()))
        for r in range(rounds):
            for m in modes[r % 2 :] + modes[: r % 2]:
                port, pgid = servers[m]
                first = r % 2 == 0  # alternately before opening and after closing the streams
                base = wrk(port, users[0], seconds) if first else 0.0
                rss0, thr0, procs = usage(pgid)
                streams, t0 = Streams(port, users, n), time.monotonic()
                if not streams.opened.wait(120):
                    raise RuntimeError(f"{m}: the streams did not open in 120 s")
                took = time.monotonic() - t0
                time.sleep(2)  # the watcher reads every followed inbox once
                rss1, thr1, _ = usage(pgid)
                loaded = wrk(port, users[0], seconds)
                lat: list[float] = []
                for e in range(events):
                    mark = f"r{r}-e{e}"
                    t = time.monotonic()
                    body = {"user_ids": users, "key": "new_post", "data": {"mark": mark}}
                    assert request(port, "POST", "/create", body) == 201
                    res[m]["post_s"].append(time.monotonic() - t)
                    while len(streams.got[mark]) < n and time.monotonic() - t < 30:
                        time.sleep(0.05)
                    got = streams.got[mark]
                    res[m]["missed"].append(n - len(got))
                    lat += [x - t for x in got]
                    time.sleep(0.5)
                streams.close()
                if not first:
                    time.sleep(2)
                    base = wrk(port, users[0], seconds)
                lat.sort()
                p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
                for k, v in dict(base=base, loaded=loaded, ratio=loaded / base, p50=p50, p99=p99,
                                 rss0=rss0, rss1=rss1, thr0=thr0, thr1=thr1).items():  # fmt: skip
                    res[m][k].append(v)
                report(f"round {r + 1} {m:<14} /count {base:,.0f} -> {loaded:,.0f} req/s "
                       f"(x{loaded / base:.2f}); {n} open in {took:.1f} s (refused and retried: "
                       f"{streams.refused}); latency p50 {p50:.2f} s p99 {p99:.2f} s, missed "
                       f"{sum(res[m]['missed'][-events:])}; {procs} processes: RSS {rss0:.0f} "
                       f"-> {rss1:.0f} MiB, threads {thr0} -> {thr1}")  # fmt: skip
        report()
        report(f"Medians over the rounds (min..max); goals: ratio >= 0.8, p99 <= 2 s; "
               f"load average at end {os.getloadavg()[0]:.2f}")  # fmt: skip
        report()
        report(
            "| mode | GET /count req/s, 0 streams | with streams | ratio | event p50 s "
            "| p99 s | POST s | missed | RSS MiB 0 / with | threads 0 / with |"
        )
        report("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for m in modes:
            row = res[m]
            report(f"| {m} | {spread(row['base'], ',.0f')} | {spread(row['loaded'], ',.0f')} "
                   f"| {spread(row['ratio'], '.2f')} | {spread(row['p50'], '.2f')} "
                   f"| {spread(row['p99'], '.2f')} | {spread(row['post_s'], '.2f')} "
                   f"| {sum(row['missed']):.0f} | {statistics.median(row['rss0']):.0f} / "
                   f"{statistics.median(row['rss1']):.0f} | {statistics.median(row['thr0']):.0f} / "
                   f"{statistics.median(row['thr1']):.0f} |")  # fmt: skip
        complete = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
