"""Serving setups side by side: throughput, then slow clients.

Three candidates with 2 workers and 8 app threads each, each against its own SecantusDB
(in memory) seeded with the same documents: gunicorn gthread (the old setup), granian's
WSGI interface (8 blocking threads, the shipped header timeout), and the shipped setup,
whose argv is `web_server_argv()`'s, what `make run` runs (granian ASGI + asgi.py).

Throughput, in rounds whose order rotates (the shared machine drifts): GET /nope (JSON 404,
no database), GET /list (100 stored, limit 10), POST /create (a capped $push on one of 16
full users), from wrk (1 thread, 16 keep-alive connections; Python threads if wrk is
missing). SecantusDB slows down as writes accumulate, so a candidate's database is
restarted and re-seeded before each of its POST /create measurements.

Slow clients, per candidate: 200 sockets send half a request line (100) or headers and
half a body (100); then 50 GET /list on fresh connections are timed, while a thread notes
when the server closes each slow socket.

    .venv/bin/python bench/serving.py [--quick] [--no-save]   # 6.5 min; quick 2 min

The output is saved as bench/results/serving-<date>[-quick].txt unless --no-save.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import platform
import re
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bson import ObjectId
from pymongo import MongoClient
from pymongo.errors import PyMongoError
from report import REPO, Report  # bench/report.py, beside this script

from notification_service.__main__ import web_server_argv
from notification_service.config import Config

HOST = "127.0.0.1"
PYTHON = sys.executable
WORKERS, THREADS, CONNECTIONS = 2, 8, 16
JSON = {"Content-Type": "application/json"}
SLOW_EACH = 100  # slow sockets of each kind
HALF_LINE = b"GET /list?user_id="
HALF_BODY = (
    b"POST /create HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"user_id":"' + b"0" * 38  # 50 of the 100 bytes
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def usage(pgid: int) -> tuple[int, float, float]:
    """Processes, CPU ms and RSS MiB (summed: shared pages count once per process) of a
    process group, which is a server started in its own session: master and workers."""
    n = ticks = pages = 0
    for entry in os.scandir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            text = Path(f"/proc/{int(entry.name)}/stat").read_text()
            f = text[text.rfind(")") + 2 :].split()  # after the name, which may hold spaces
            if f[2] == str(pgid):
                n, ticks, pages = n + 1, ticks + int(f[11]) + int(f[12]), pages + int(f[21])
    return n, ticks * 1000 / os.sysconf("SC_CLK_TCK"), pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Proc:
    """A child in its own session, so that its process group (= its pid) holds its workers."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name, self.log = name, workdir / f"{name}.log"
        with self.log.open("ab") as log:  # cwd is empty: no developer's ./.env is read
            self.popen = subprocess.Popen(
                argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        self.pid = self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{tail}")

    def stop(self, timeout: float = 40) -> str:
        """SIGTERM and wait, then SIGKILL whatever is left of the group; say how it went."""
        started, how = time.monotonic(), "SIGTERM" if self.popen.poll() is None else "exited"
        self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            how = f"SIGKILL after {timeout:g} s"
        took = time.monotonic() - started
        time.sleep(0.5)  # workers exit just after their master
        left = usage(self.pid)[0]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()
        return f"{self.name}: {how}, exit code {self.popen.returncode} in {took:.1f} s, " + (
            f"leftover processes killed: {left}"
        )


LIST_USER = str(ObjectId())
CREATE_USERS = [str(ObjectId()) for _ in range(16)]


class Database:
    """A candidate's SecantusDB (in memory) on a fixed port, started seeded."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str]) -> None:
        self.name, self.workdir, self.env = f"secantusdb-{name}", workdir, env
        self.port = free_port()
        self.uri = f"mongodb://{HOST}:{self.port}/bench"
        self.proc: Proc | None = None

    def start(self) -> None:
        exe = shutil.which("secantusd-py", path=str(Path(PYTHON).parent)) or "secantusd-py"
        argv = [exe, "--host", HOST, "--port", str(self.port), "--storage-path", ":memory:"]
        self.proc = Proc(self.name, [*argv, "--log-level", "WARNING"], self.env, self.workdir)
        # Each user holds a full inbox (the default cap of 100), newest first.
        users = [
            {"_id": ObjectId(uid), "email": "u@example.com", "notifications": [
                {"id": str(ObjectId()), "timestamp": 1_700_000_000 + n, "is_new": n % 3 != 0,
                 "user_id": uid, "key": "new_message", "target_id": None,
                 "data": {"text": f"message {n}", "from": "someone"}}
                for n in range(100, 0, -1)
            ]}
            for uid in (LIST_USER, *CREATE_USERS)
        ]  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            self.proc.check()
            try:
                with MongoClient(self.uri, serverSelectionTimeoutMS=1000) as client:
                    client.get_default_database()["users"].insert_many(users)
                return
            except PyMongoError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> str:
        return self.proc.stop() if self.proc else f"{self.name}: not started"


@dataclass(frozen=True)
class Endpoint:
    label: str
    method: str
    path: str
    status: int
    bodies: tuple[bytes, ...] = ()  # rotated over, one per request

    def body(self, n: int) -> bytes | None:
        return self.bodies[n % len(self.bodies)] if self.bodies else None


NOPE = Endpoint("GET /nope (JSON 404, no DB)", "GET", "/nope", 404)
LIST = Endpoint("GET /list (100 stored, limit=10)", "GET", f"/list?user_id={LIST_USER}&limit=10",
                200)  # fmt: skip
CREATE = Endpoint("POST /create (new_message)", "POST", "/create", 201, tuple(
    json.dumps({"user_id": uid, "key": "new_message", "data": {"text": "hi", "n": i}}).encode()
    for i, uid in enumerate(CREATE_USERS)
))  # fmt: skip
ENDPOINTS = (NOPE, LIST, CREATE)


def fetch(port: int, ep: Endpoint, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(ep.method, ep.path, body=ep.body(0), headers=JSON if ep.bodies else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Sample:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    unexpected: int  # another status than expected, or a socket error
    cpu_ms: float = float("nan")  # the server's (all its processes) per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


Load = Callable[[int, Endpoint, float, Path], Sample]

WRK_LUA = """
done = function(s, latency, requests)
  local e = s.errors
  io.write(string.format("WRKJSON {\\"requests\\":%d,\\"us\\":%d,\\"p50\\":%d,\\"p99\\":%d," ..
    "\\"sock\\":%d,\\"status\\":%d}\\n", s.requests, s.duration, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk_load(port: int, ep: Endpoint, seconds: float, workdir: Path) -> Sample:
    lua = WRK_LUA
    if ep.bodies:
        bodies = ", ".join(f"[===[{b.decode()}]===]" for b in ep.bodies)
        lua += (
            f"local bodies = {{{bodies}}}\nlocal n = 0\nrequest = function()\n  n = n + 1\n"
            f"  return wrk.format('{ep.method}', '{ep.path}', "
            "{['Content-Type'] = 'application/json'}, bodies[n % #bodies + 1])\nend\n"
        )
    (workdir / "load.lua").write_text(lua, encoding="utf-8")
    argv = ["wrk", "--threads=1", f"--connections={CONNECTIONS}", f"--duration={round(seconds)}s",
            "--timeout=10s", f"--script={workdir / 'load.lua'}", f"http://{HOST}:{port}{ep.path}",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    found = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    r = json.loads(found[1])
    bad = r["status"] if ep.status < 400 else r["requests"] - r["status"]  # wrk: status > 399
    return Sample(r["requests"], r["us"] / 1e6, r["p50"] / 1e3, r["p99"] / 1e3, bad + r["sock"])


def python_load(port: int, ep: Endpoint, seconds: float, workdir: Path) -> Sample:
    """Closed loop: CONNECTIONS threads, each with one keep-alive http.client connection."""
    latencies: list[float] = []  # list.append is atomic
    bad: list[int] = []
    start = time.perf_counter()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        while (t0 := time.perf_counter()) < start + seconds:
            body, n = ep.body(n), n + CONNECTIONS
            try:
                conn.request(ep.method, ep.path, body=body, headers=JSON if body else {})
                response = conn.getresponse()
                response.read()
                latencies.append(time.perf_counter() - t0)
                if response.status != ep.status:
                    bad.append(1)
            except (OSError, http.client.HTTPException):
                bad.append(1)
                conn.close()  # the next request reconnects
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    ms = sorted(x * 1e3 for x in latencies) or [float("nan")]
    p50, p99 = ms[len(ms) // 2], ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return Sample(len(latencies), time.perf_counter() - start, p50, p99, len(bad))


@dataclass
class Candidate:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    db: Database
    proc: Proc | None = None
    rss: list[float] = field(default_factory=list)  # after start, then after each measurement
    samples: dict[str, list[Sample]] = field(default_factory=dict)


def candidates(base_env: dict[str, str], workdir: Path) -> list[Candidate]:
    out = []
    for name in ("gunicorn", "granian-wsgi", "shipped"):
        port, db = free_port(), Database(name, workdir, base_env)
        # Dispatchers off: SMTP_HOST is never contacted, but the service wants it beside DB_URI.
        env = {**base_env, "HOST": HOST, "PORT": str(port), "WEB_WORKERS": str(WORKERS),
               "WEB_THREADS": str(THREADS), "DB_URI": db.uri, "DISPATCHER_THREADS": "0",
               "SMTP_HOST": HOST, "LOG_LEVEL": "WARNING"}  # fmt: skip
        config = Config.from_env(env, dotenv=False)
        argv = {
            "shipped": web_server_argv(config),
            "gunicorn": [
                PYTHON, "-m", "gunicorn", "--bind", f"{HOST}:{port}", "--workers", str(WORKERS),
                "--threads", str(THREADS), "--worker-class", "gthread", "--log-level", "warning",
                "--no-control-socket",  # gunicorn 27 opens ~/.gunicorn/gunicorn.ctl otherwise
                "notification_service.server:create_app()",
            ],
            "granian-wsgi": [
                PYTHON, "-m", "granian", "--interface", "wsgi", "--factory", "--host", HOST,
                "--port", str(port), "--workers", str(WORKERS), "--blocking-threads", str(THREADS),
                "--http1-header-read-timeout", str(round(config.client_timeout_seconds * 1000)),
                "--log-level", "warning", "notification_service.server:create_app",
            ],
        }[name]  # fmt: skip
        out.append(Candidate(name, argv, env, port, db))
    return out


def start(c: Candidate, workdir: Path) -> float:
    """Start the server; check one answer of each endpoint; return the seconds it took."""
    started = time.monotonic()
    proc = c.proc = Proc(c.name, c.argv, c.env, workdir)
    while time.monotonic() - started < 60:
        proc.check()
        with contextlib.suppress(OSError, http.client.HTTPException):
            if fetch(c.port, NOPE, timeout=2)[0] == 404:
                break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"{c.name} did not answer within 60 s")
    for ep in ENDPOINTS:
        status, body = fetch(c.port, ep)
        if status != ep.status or (ep is LIST and b'"elements":100' not in body.replace(b" ", b"")):
            raise RuntimeError(f"{c.name} {ep.label}: got {status} {body[:300]!r}")
    c.rss.append(usage(proc.pid)[2])
    return time.monotonic() - started


def reconnect(c: Candidate, timeout: float = 30) -> int:
    """After a database restart: request until 5 answers in a row are right (each worker's
    pymongo pool meets its dead connections once); return how many were not."""
    failures = streak = 0
    deadline = time.monotonic() + timeout
    while streak < 5:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{c.name} did not reconnect to its database in {timeout} s")
        try:
            ok = fetch(c.port, LIST)[0] == 200
        except (OSError, http.client.HTTPException):
            ok = False
        streak, failures = (streak + 1, failures) if ok else (0, failures + 1)
        time.sleep(0 if ok else 0.05)
    return failures


def measure(c: Candidate, load: Load, ep: Endpoint, seconds: float, workdir: Path) -> Sample:
    assert c.proc is not None
    c.proc.check()
    before = usage(c.proc.pid)[1]
    sample = load(c.port, ep, seconds, workdir)
    _, cpu, rss = usage(c.proc.pid)
    sample.cpu_ms = (cpu - before) / max(1, sample.requests)
    c.rss.append(rss)
    return sample


def wait_closed(socks: list[tuple[str, socket.socket]], t0: float, cap: float) -> dict[str, list]:
    """Seconds from t0 until the server closed each slow socket (an answer may come first)."""
    closed: dict[str, list] = {"line": [], "body": [], "open": []}
    with selectors.DefaultSelector() as sel:
        for kind, sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, kind)
        while sel.get_map() and (left := t0 + cap - time.monotonic()) > 0:
            for key, _ in sel.select(min(left, 0.5)):
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""  # reset
                if not data:
                    closed[key.data].append(time.monotonic() - t0)
                    sel.unregister(key.fileobj)
        closed["open"] = [key.data for key in sel.get_map().values()]
    return closed


def slow_clients(c: Candidate, requests: int, budget: float, cap: float) -> str:
    """The slow-client phase; returns a row of the summary table."""
    socks: list[tuple[str, socket.socket]] = []
    try:
        for i in range(2 * SLOW_EACH):
            kind, data = ("line", HALF_LINE) if i % 2 else ("body", HALF_BODY)
            socks.append((kind, socket.create_connection((HOST, c.port), timeout=5)))
            socks[-1][1].sendall(data)
        t0 = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            watch = pool.submit(wait_closed, socks, t0, cap)
            time.sleep(0.5)  # the server has taken them in
            times, bad = [], 0
            while len(times) < requests and time.monotonic() - t0 < budget:
                t = time.perf_counter()
                try:
                    ok = fetch(c.port, LIST, timeout=2)[0] == 200
                except (OSError, http.client.HTTPException):
                    ok = False
                times.append(time.perf_counter() - t)
                bad += not ok or times[-1] > 1
            closed = watch.result()
    finally:
        for _, sock in socks:
            sock.close()
    try:
        after = "yes" if fetch(c.port, LIST, timeout=5)[0] == 200 else "no"
    except (OSError, http.client.HTTPException) as exc:
        after = f"no ({exc!r})"
    unsent = requests - len(times)
    line, body = (f"{len(t)}/{SLOW_EACH}" + (f", {max(t):.1f} s" if t else "")
                  for t in (closed["line"], closed["body"]))  # fmt: skip
    return (
        f"| {c.name} | {statistics.median(times) * 1e3:,.0f} / {max(times) * 1e3:,.0f} "
        f"| {bad + unsent}/{requests}" + (f" ({unsent} not sent in {budget:g} s)" if unsent else "")
        + f" | {line} | {body} | {len(closed['open'])} | {after} |"
    )  # fmt: skip


def spread(values: Sequence[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def ratio(samples: list[Sample], base: list[Sample], key: Callable[[Sample], float]) -> float:
    """The median of the per-round ratios: each pair was measured side by side."""
    return statistics.median(key(s) / key(b) if key(b) else float("nan") for s, b in
                             zip(samples, base, strict=True))  # fmt: skip


def run(quick: bool, report: Report, stack: contextlib.ExitStack, workdir: Path) -> bool:
    rounds, seconds, warmup = (2, 2.0, 1.0) if quick else (6, 4.0, 2.0)
    requests, budget, cap = (20, 10.0, 10.0) if quick else (50, 20.0, 30.0)
    load: Load = wrk_load if shutil.which("wrk") else python_load
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRANIAN_", "GUNICORN"))}
    cands = candidates({**env, "PYTHONUNBUFFERED": "1"}, workdir)

    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "notification_service"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    dists = ("gunicorn", "granian", "Flask", "Werkzeug", "pymongo", "SecantusDB")
    report("# Serving setups: gunicorn gthread, granian WSGI, shipped (granian ASGI + asgi.py)")
    report(f"date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; command: "
           f".venv/bin/python bench/serving.py {shlex.join(sys.argv[1:])}")  # fmt: skip
    report(f"code: commit {head.stdout.strip()}, notification_service/ "
           f"{'modified' if dirty else 'unmodified'}")  # fmt: skip
    report(f"machine: {os.cpu_count()} CPUs ({model[1] if model else '?'}), Linux "
           f"{platform.release()}, Python {platform.python_version()}; "
           f"load average at start {os.getloadavg()[0]:.2f}")  # fmt: skip
    report("versions: " + ", ".join(f"{d} {importlib.metadata.version(d)}" for d in dists))
    client = "wrk, 1 thread" if load is wrk_load else "Python threads + http.client"
    report(f"load: {client}, {CONNECTIONS} keep-alive connections, closed loop; {rounds} rounds "
           f"of {seconds:g} s per endpoint and candidate, {warmup:g} s of warm-up")  # fmt: skip
    for c in cands:
        report(f"{c.name}: " + shlex.join(c.argv).replace(PYTHON, "python"))

    for c in cands:  # the stack stops the servers first (last in), then the databases
        c.db.start()
        stack.callback(lambda db=c.db: report(db.stop()))
    for c in cands:  # one at a time, so that none starts while another does
        took = start(c, workdir)
        stack.callback(lambda p=c.proc: report(p.stop()))
        report(f"{c.name}: answering in {took:.1f} s on port {c.port}, endpoints checked")
    for ep in ENDPOINTS:
        for c in cands:
            load(c.port, ep, warmup, workdir)
    report()
    report(f"{'round':>5} {'endpoint':<33} {'candidate':<12} {'req/s':>7} {'p50 ms':>7} "
           f"{'p99 ms':>7} {'unexp':>5} {'cpu/req':>7}")  # fmt: skip
    failed_reconnecting = 0
    for r in range(rounds):
        for ep in ENDPOINTS:
            for c in cands[r % 3 :] + cands[: r % 3]:  # each candidate goes first as often
                if ep is CREATE:  # the same fresh database for every write measurement
                    c.db.stop()
                    c.db.start()
                    failed_reconnecting += reconnect(c)
                s = measure(c, load, ep, seconds, workdir)
                c.samples.setdefault(ep.label, []).append(s)
                report(f"{r + 1:>5} {ep.label:<33} {c.name:<12} {s.rps:>7,.0f} {s.p50_ms:>7.1f} "
                       f"{s.p99_ms:>7.1f} {s.unexpected:>5} {s.cpu_ms:>7.2f}")  # fmt: skip
                time.sleep(0.2)  # let the connections close
    report(f"requests failed while reconnecting after a database restart: {failed_reconnecting}")
    report()

    report("Medians over the rounds (min..max); x = median of the per-round ratios to gunicorn")
    report()
    report("| endpoint | candidate | req/s | x | p50 / p99 ms | CPU ms/req | x | unexpected |")
    report("|---|---|---:|---:|---:|---:|---:|---:|")
    for ep in ENDPOINTS:
        base = cands[0].samples[ep.label]
        for c in cands:
            ss = c.samples[ep.label]
            p50, p99 = (
                statistics.median(s.p50_ms for s in ss),
                statistics.median(s.p99_ms for s in ss),
            )
            report(
                f"| {ep.label} | {c.name} | {spread([s.rps for s in ss], ',.0f')} "
                f"| {ratio(ss, base, lambda s: s.rps):.2f} | {p50:.1f} / {p99:.1f} "
                f"| {spread([s.cpu_ms for s in ss], '.2f')} "
                f"| {ratio(ss, base, lambda s: s.cpu_ms):.2f} | {sum(s.unexpected for s in ss)} |"
            )
    report()
    report("| candidate | processes | RSS after start | RSS peak (after each measurement) |")
    report("|---|---:|---:|---:|")
    for c in cands:
        assert c.proc is not None
        report(f"| {c.name} | {usage(c.proc.pid)[0]} | {c.rss[0]:.0f} MiB | {max(c.rss):.0f} MiB |")
    report()
    report(f"Slow clients: {SLOW_EACH} sockets sent half a request line and {SLOW_EACH} headers "
           f"and half a body; then {requests} GET /list on fresh connections, one at a time (2 s "
           f"timeout, {budget:g} s budget); closed = by the server, within {cap:g} s")  # fmt: skip
    report()
    report("| candidate | GET /list p50 / max ms | over 1 s or failed | half line: closed, last "
           f"| half body: closed, last | open at {cap:g} s | answers after |")  # fmt: skip
    report("|---|---:|---:|---:|---:|---:|---|")
    for c in cands:
        try:
            report(slow_clients(c, requests, budget, cap))
        except OSError as exc:
            report(f"| {c.name} | error: {exc!r} |")
        time.sleep(1)
    report()
    report(f"load average at end: {os.getloadavg()[0]:.2f}; shutdown, servers first:")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s, shorter waits")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    name = f"serving-{dt.date.today()}{'-quick' if args.quick else ''}.txt"
    report = Report(None if args.no_save else REPO / "bench" / "results" / name)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwind, so that the stack below stops everything

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    complete = False
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: report.close(complete=complete))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serving_")))
        try:
            complete = run(args.quick, report, stack, workdir)
        finally:  # a second Ctrl-C must not cut the clean-up short
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_IGN)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
