"""gunicorn (gthread) vs granian (WSGI) serving notification_service, side by side.

One run starts one SecantusDB server (in memory), seeds one database per web server
with the same documents, starts both web servers against their own database, warms
them up, then measures in interleaved rounds (A B, then B A, ... so that noise on a
shared machine hits both) three endpoints at a fixed number of connections:

* GET /nope: the app's JSON 404 (routing, error handler, jsonify; no database);
* GET /list?user_id=..&limit=10 of a user holding 100 notifications (one aggregate);
* POST /create new_message for one of 16 users already holding 100 notifications
  (one update that prepends and caps the array, so the state stays the same).

It reports requests/second and latency median and p99 per round, with the server's CPU
time per request and the busiest worker's share of it (from /proc), their medians across
rounds, the ratio granian/gunicorn, the peak memory of each server's process tree, and
stops everything it started (SIGTERM, wait, then SIGKILL of the process group as a
last resort), also on Ctrl-C, SIGTERM or an exception.

SecantusDB is restarted (same port) and re-seeded before each POST /create measurement,
as it slows down while writes accumulate (see `Database`).

The load comes from wrk (C, one thread, keep-alive) when it is installed, from Python
threads with http.client keep-alive connections otherwise (`--client python`; that
client needs more CPU per request, so it takes more of the 2 cores from the servers).

    .venv/bin/python bench/wsgi_servers.py            # full run, about 3.5 minutes
    .venv/bin/python bench/wsgi_servers.py --quick    # about 45 seconds

The raw output is also written to bench/results/wsgi_servers-<date>[-quick].txt.
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
import re
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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo import MongoClient
from report import Report  # bench/report.py, beside this script

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
APP_FACTORY = "notification_service.server:create_app"
DB_NAME_PREFIX = "bench_wsgi_"
SEEDED_NOTIFICATIONS = 100  # = the default NOTIFICATIONS_LIMIT cap
CREATE_USERS = 16


# --------------------------------------------------------------------------- output


# ---------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process visible in /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def process_tree(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            tree.append(pid)
            todo.extend(children.get(pid, []))
    return tree


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


CLOCK_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def group_members(pgid: int) -> list[int]:
    return [pid for pid, (_, group) in _proc_table().items() if group == pgid]


def _kib(path: str, key: str) -> int:
    """The `key:   N kB` value of a /proc status-like file, 0 if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Managed:
    """A child process in its own session (so its process group id is its pid)."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    exit_report: str = ""

    def start(self, env: dict[str, str], cwd: Path) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM, wait up to `timeout`, then SIGKILL the group; say how it went."""
        if self.process is None:
            return f"{self.name}: not started"
        if self.exit_report:
            return self.exit_report
        started = time.monotonic()
        pgid = self.process.pid
        how = "SIGTERM"
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                how = f"SIGKILL after {timeout:g} s"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.process.wait()
        else:
            how = "had already exited"
        # Workers of a well-behaved master are gone once it has exited; give stragglers
        # a moment, then kill whatever is left in the group and say so.
        leftovers = group_members(pgid)
        deadline = time.monotonic() + 5
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.1)
            leftovers = group_members(pgid)
        if leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.exit_report = (
            f"{self.name}: {how}, exit code {self.process.returncode}, "
            f"{time.monotonic() - started:.1f} s, leftover processes: {len(leftovers)}"
            + (f" (killed: {leftovers})" if leftovers else "")
        )
        return self.exit_report


class MemorySampler:
    """Peak sum of VmRSS (and of Pss) over each server's process tree, sampled."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.roots: dict[str, int] = {}
        self.peak_rss: Counter[str] = Counter()
        self.peak_pss: Counter[str] = Counter()
        self.processes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.roots[name] = pid

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        table = _proc_table()
        for name, root in list(self.roots.items()):
            tree = process_tree(root, table)
            rss = sum(_kib(f"/proc/{pid}/status", "VmRSS") for pid in tree)
            pss = sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss") for pid in tree)
            self.peak_rss[name] = max(self.peak_rss[name], rss)
            self.peak_pss[name] = max(self.peak_pss[name], pss)
            self.processes[name] = max(self.processes[name], len(tree))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a sampling hiccup must not end the run
                self.sample()


# ------------------------------------------------------------------------ database


class Database:
    """The one SecantusDB process (in memory) on a fixed port, restartable.

    Restarting matters: its in-memory store slows down as writes accumulate (measured
    here with 16 pymongo threads doing the capped $push by find_one_and_update: ~5 ms of
    its CPU per update at first, ~19 ms after 10,000 of them, its RSS growing ~20 MiB
    per 1,000 while the data stays ~260 kB; dropping and re-seeding the database does
    not help, a new process does), so without a restart the POST /create figures fall
    round after round whatever the web server.
    """

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        secantusd = Path(PYTHON).with_name("secantusd-py")
        exe = str(secantusd) if secantusd.exists() else shutil.which("secantusd-py")
        if exe is None:
            raise SystemExit("secantusd-py not found (pip install SecantusDB)")
        self.exe, self.workdir, self.env = exe, workdir, env
        self.port = free_port()
        self.managed: Managed | None = None
        self.starts = 0

    def uri(self, database: str = "") -> str:
        return f"mongodb://{HOST}:{self.port}/{database}"

    def start(self) -> float:
        """Start and wait for a ping; return the seconds it took."""
        started = time.monotonic()
        self.starts += 1
        argv = [self.exe, "--host", HOST, "--port", str(self.port), "--storage-path", ":memory:"]
        log = self.workdir / f"secantusdb-{self.starts}.log"
        db = self.managed = Managed("secantusdb", [*argv, "--log-level", "WARNING"], log)
        db.start(self.env, self.workdir)
        while time.monotonic() - started < 60:
            if not db.alive():
                raise RuntimeError(f"secantusd-py exited:\n{db.log_tail()}")
            try:
                client: MongoClient[dict[str, Any]]
                with MongoClient(self.uri(), serverSelectionTimeoutMS=1000) as client:
                    client.admin.command("ping")
                return time.monotonic() - started
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"secantusd-py did not answer a ping within 60 s:\n{db.log_tail()}")

    def stop(self) -> str:
        return self.managed.stop() if self.managed else "secantusdb: not started"

    def restart(self) -> tuple[str, float]:
        return self.stop(), self.start()


def notification(user_id: str, n: int) -> dict[str, Any]:
    """A stored notification, in the shape the service writes (schemas.Notification)."""
    return {
        "id": str(ObjectId()),
        "timestamp": 1_700_000_000 + n,
        "is_new": n % 3 != 0,
        "user_id": user_id,
        "key": "new_message" if n % 2 else "new_post",
        "target_id": None,
        "data": {"text": f"message {n}", "from": "someone"},
    }


def seed(uri: str, database: str, list_user: str, create_users: Sequence[str]) -> None:
    """The same users in each database, each already holding a full (capped) inbox."""
    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    with client:
        client.drop_database(database)
        docs: list[dict[str, Any]] = [
            {
                "_id": ObjectId(uid),
                "email": "u@example.com",
                # newest first, as the service keeps them
                "notifications": [notification(uid, n) for n in range(SEEDED_NOTIFICATIONS, 0, -1)],
            }
            for uid in (list_user, *create_users)
        ]
        client.get_database(database).get_collection("users").insert_many(docs)


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Endpoint:
    key: str
    label: str
    method: str
    path: str
    expected_status: int
    bodies: tuple[bytes, ...] = ()  # rotated over, one per request, for a POST

    def request(self, n: int) -> tuple[str, str, bytes | None]:
        body = self.bodies[n % len(self.bodies)] if self.bodies else None
        return self.method, self.path, body


@dataclass(frozen=True)
class Sample:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    unexpected: int  # responses with another status class than expected, or socket errors
    # Filled in by the caller from /proc: the server's CPU time (all its processes) per
    # request, which the machine's other load disturbs less than throughput, and the
    # share of the workers' CPU time spent by the busiest worker (1/workers = even).
    cpu_ms_per_request: float = float("nan")
    top_worker_share: float = float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


LoadRunner = Callable[[int, Endpoint, int, float], Sample]

_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d," ..
    "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_string(data: bytes) -> str:
    text = data.decode("ascii")
    level = "=" * 3
    assert f"]{level}]" not in text
    return f"[{level}[{text}]{level}]"


def wrk_runner(workdir: Path) -> LoadRunner:
    wrk = shutil.which("wrk")
    assert wrk is not None

    def run(port: int, endpoint: Endpoint, connections: int, seconds: float) -> Sample:
        script = workdir / f"wrk_{endpoint.key}.lua"
        lua = [_WRK_DONE]
        if endpoint.bodies:
            bodies = ", ".join(_lua_string(b) for b in endpoint.bodies)
            lua.append(
                f"local bodies = {{{bodies}}}\n"
                "local headers = {['Content-Type'] = 'application/json'}\n"
                "local n = 0\n"
                "request = function()\n"
                "  n = n + 1\n"
                f"  return wrk.format({json.dumps(endpoint.method)}, "
                f"{json.dumps(endpoint.path)}, headers, bodies[(n % #bodies) + 1])\n"
                "end\n"
            )
        script.write_text("\n".join(lua), encoding="utf-8")
        argv = [
            wrk,
            "--threads=1",
            f"--connections={connections}",
            f"--duration={max(1, round(seconds))}s",
            "--timeout=10s",
            f"--script={script}",
            f"http://{HOST}:{port}{endpoint.path}",
        ]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.MULTILINE)
        if out.returncode != 0 or match is None:
            raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        r = json.loads(match.group(1))
        # wrk counts a response with status > 399 as a "status error".
        bad_status = r["status"] if endpoint.expected_status < 400 else r["requests"] - r["status"]
        socket_errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
        return Sample(
            requests=r["requests"],
            seconds=r["duration_us"] / 1e6,
            p50_ms=r["p50_us"] / 1000,
            p99_ms=r["p99_us"] / 1000,
            unexpected=bad_status + socket_errors,
        )

    return run


def python_runner(port: int, endpoint: Endpoint, connections: int, seconds: float) -> Sample:
    """Closed loop: `connections` threads, each with one keep-alive http.client connection."""
    latencies: list[list[float]] = [[] for _ in range(connections)]
    unexpected = [0] * connections
    headers = {"Content-Type": "application/json"} if endpoint.bodies else {}
    barrier = threading.Barrier(connections + 1)
    start = deadline = 0.0

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        n = i
        barrier.wait()
        while (t0 := time.perf_counter()) < deadline:
            method, path, body = endpoint.request(n)
            n += connections
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                unexpected[i] += 1
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=10)
                continue
            latencies[i].append(time.perf_counter() - t0)
            if response.status // 100 != endpoint.expected_status // 100:
                unexpected[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    deadline = start + seconds
    barrier.wait()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.perf_counter() - start
    all_latencies = sorted(x for per_thread in latencies for x in per_thread)
    if not all_latencies:
        return Sample(0, elapsed, float("nan"), float("nan"), sum(unexpected))
    return Sample(
        requests=len(all_latencies),
        seconds=elapsed,
        p50_ms=_percentile(all_latencies, 50) * 1000,
        p99_ms=_percentile(all_latencies, 99) * 1000,
        unexpected=sum(unexpected),
    )


def _percentile(ordered: Sequence[float], pct: float) -> float:
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def fetch(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------ servers


@dataclass
class Server:
    name: str
    argv: list[str]
    database: str
    port: int = field(default_factory=free_port)
    managed: Managed | None = None

    def start(self, workdir: Path, base_env: dict[str, str], db: Database) -> None:
        env = {
            **base_env,
            "DB_URI": db.uri(self.database),
            "DISPATCHER_THREADS": "0",
            "LOG_LEVEL": "WARNING",
        }
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self.managed = Managed(self.name, argv, workdir / f"{self.name}.log")
        self.managed.start(env, workdir)

    def wait_ready(self, timeout: float = 60.0) -> float:
        assert self.managed is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.managed.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.managed.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = fetch(self.port, "GET", "/nope")
                if status == 404:
                    return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in {timeout:g} s:\n{self.managed.log_tail()}")


def servers(workers: int, threads: int) -> list[Server]:
    gunicorn = [
        PYTHON, "-m", "gunicorn",
        "--bind", f"{HOST}:{{port}}",
        "--workers", str(workers),
        "--threads", str(threads),
        "--worker-class", "gthread",
        "--log-level", "warning",
        "--no-control-socket",  # gunicorn 27 opens ~/.gunicorn/gunicorn.ctl otherwise
        f"{APP_FACTORY}()",
    ]  # fmt: skip
    granian = [
        PYTHON, "-m", "granian",
        "--interface", "wsgi",
        "--factory",
        "--host", HOST,
        "--port", "{port}",
        "--workers", str(workers),
        "--runtime-threads", "1",  # the Rust I/O threads per worker (default 1)
        "--blocking-threads", str(threads),  # the Python threads running the app
        "--log-level", "warning",
        "--no-access-log",
        APP_FACTORY,
    ]  # fmt: skip
    return [
        Server("gunicorn", gunicorn, DB_NAME_PREFIX + "gunicorn"),
        Server("granian", granian, DB_NAME_PREFIX + "granian"),
    ]


def endpoints(list_user: str, create_users: Sequence[str]) -> list[Endpoint]:
    bodies = tuple(
        json.dumps(
            {"user_id": uid, "key": "new_message", "data": {"text": "hello", "n": i}},
            separators=(",", ":"),
        ).encode()
        for i, uid in enumerate(create_users)
    )
    return [
        Endpoint("nodb", "GET /nope (404, no DB)", "GET", "/nope", 404),
        Endpoint("list", "GET /list (100 stored, limit=10)", "GET",
                 f"/list?user_id={list_user}&limit=10", 200),
        Endpoint("create", "POST /create", "POST", "/create", 201, bodies),
    ]  # fmt: skip


def reconnect(server: Server, endpoint: Endpoint, timeout: float = 30.0) -> int:
    """After a database restart: request until 5 answers in a row are the expected ones
    (each worker's pool finds its connections dead once and reconnects); count failures."""
    failures, streak = 0, 0
    deadline = time.monotonic() + timeout
    while streak < 5:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not reconnect to the database in {timeout} s")
        method, path, body = endpoint.request(0)
        try:
            status, _ = fetch(server.port, method, path, body)
        except (OSError, http.client.HTTPException):
            status = 0
        if status == endpoint.expected_status:
            streak += 1
        else:
            failures, streak = failures + 1, 0
            time.sleep(0.05)
    return failures


def check_endpoints(server: Server, eps: Sequence[Endpoint]) -> None:
    """One request each: the status, and for /list the page, must be what we measure."""
    for ep in eps:
        method, path, body = ep.request(0)
        status, payload = fetch(server.port, method, path, body)
        if status != ep.expected_status:
            raise RuntimeError(f"{server.name} {ep.label}: got {status}: {payload[:300]!r}")
        if ep.key == "list":
            page = json.loads(payload)
            data = page.get("data", page)
            if data.get("elements") != SEEDED_NOTIFICATIONS or len(data.get("list", [])) != 10:
                raise RuntimeError(f"{server.name} /list: unexpected page {payload[:300]!r}")


# ------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("gunicorn", "granian", "Flask", "Werkzeug", "pymongo", "SecantusDB"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = _kib("/proc/meminfo", "MemTotal") / 1024 / 1024
    return (
        f"{os.cpu_count()} CPUs ({model or platform.machine()}), {mem_gib:.0f} GiB, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def code_version() -> str:
    """The commit, and whether the service's code differs from it (others may be editing)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "notification_service"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {head}, notification_service/ " + ("modified" if dirty else "unmodified")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(
    report: Report,
    eps: Sequence[Endpoint],
    names: Sequence[str],
    results: dict[tuple[str, str], list[Sample]],
) -> None:
    a, b = names  # the ratio is b / a: granian / gunicorn
    report(f"Medians across rounds (ratio = {b}/{a}; req/s higher is better, ms lower):")
    report()
    report(
        f"| endpoint | {a} req/s | {b} req/s | req/s ratio "
        f"| {a} p50 / p99 ms | {b} p50 / p99 ms | p50 ratio | p99 ratio "
        f"| {a} CPU ms/req | {b} CPU ms/req |"
    )
    report("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ep in eps:
        sa, sb = results[(ep.key, a)], results[(ep.key, b)]
        rps_a, rps_b = med([s.rps for s in sa]), med([s.rps for s in sb])
        p50_a, p50_b = med([s.p50_ms for s in sa]), med([s.p50_ms for s in sb])
        p99_a, p99_b = med([s.p99_ms for s in sa]), med([s.p99_ms for s in sb])
        cpu_a = med([s.cpu_ms_per_request for s in sa])
        cpu_b = med([s.cpu_ms_per_request for s in sb])
        report(
            f"| {ep.label} | {rps_a:,.0f} | {rps_b:,.0f} | {rps_b / rps_a:.2f} "
            f"| {p50_a:.1f} / {p99_a:.1f} | {p50_b:.1f} / {p99_b:.1f} "
            f"| {p50_b / p50_a:.2f} | {p99_b / p99_a:.2f} | {cpu_a:.2f} | {cpu_b:.2f} |"
        )
    report()
    report(
        "Per endpoint and server: req/s min .. max across rounds; rounds in which one worker "
        "used >= 90% of the workers' CPU (all connections on one worker); unexpected responses:"
    )
    for ep in eps:
        parts = []
        for name in names:
            samples = results[(ep.key, name)]
            rps = [s.rps for s in samples]
            lopsided = sum(s.top_worker_share >= 0.9 for s in samples)
            bad = sum(s.unexpected for s in samples)
            parts.append(
                f"{name} {min(rps):,.0f} .. {max(rps):,.0f}, one-worker {lopsided}/{len(samples)}"
                f", unexpected {bad}"
            )
        report(f"  {ep.label}: " + "; ".join(parts))


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 s (well under a minute)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 6, quick 2)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 4, quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per endpoint and server")
    p.add_argument("--connections", type=int, default=16, help="concurrent keep-alive clients")
    p.add_argument("--workers", type=int, default=2, help="worker processes of each server")
    p.add_argument("--threads", type=int, default=8, help="app threads per worker")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument(
        "--db-restart",
        choices=("create", "never"),
        default="create",
        help="restart SecantusDB (same port, re-seeded) before each POST /create "
        "measurement (default), because it slows down as writes accumulate",
    )
    p.add_argument("--output", type=Path, help="where to save the raw output")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 6)
    args.duration = args.duration or (2.0 if args.quick else 4.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    for name in ("rounds", "connections", "workers", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.duration < 1 or args.warmup < 0:
        p.error("--duration must be at least 1 (wrk counts whole seconds), --warmup >= 0")
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    if args.client == "wrk" and not shutil.which("wrk"):
        p.error("wrk is not installed (apt-get install wrk), use --client python")
    return args


@contextlib.contextmanager
def termination_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C does, so the cleanup below always runs."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    now = dt.datetime.now().astimezone()
    output: Path | None = None
    if not args.no_save:
        suffix = "-quick" if args.quick else ""
        output = args.output or RESULTS / f"wsgi_servers-{now:%Y-%m-%d}{suffix}.txt"
    report = Report(output)
    complete = False
    with termination_as_exit(), contextlib.ExitStack() as stack:
        stack.callback(lambda: report.close(complete=complete))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsgi_bench_")))
        try:
            complete = run(args, report, stack, workdir, now)
        finally:
            # The stack now stops the servers and the database: a second Ctrl-C or a
            # SIGTERM must not cut that short.
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_IGN)
    return 0 if complete else 1


def run(
    args: argparse.Namespace,
    report: Report,
    stack: contextlib.ExitStack,
    workdir: Path,
    now: dt.datetime,
) -> bool:
    eps_count, srv = 3, servers(args.workers, args.threads)
    estimate = args.rounds * eps_count * len(srv) * (args.duration + 0.3)
    estimate += eps_count * len(srv) * args.warmup + 15
    estimate += args.rounds * len(srv) * 3 if args.db_restart == "create" else 0
    report("# WSGI server benchmark: gunicorn vs granian (notification_service)")
    report(f"date: {now:%Y-%m-%d %H:%M %Z}")
    report(f"command: .venv/bin/python bench/wsgi_servers.py {shlex.join(sys.argv[1:])}".strip())
    report(f"machine: {machine()}; load average at start: {loadavg()}")
    report("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    report(f"code: {code_version()}")
    client = "wrk 1 thread" if args.client == "wrk" else "Python threads + http.client"
    if args.client == "wrk":
        wrk_v = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
        client += f" ({wrk_v.split('[')[0].strip()})"
    report(
        f"load: {client}, {args.connections} keep-alive connections, closed loop; "
        f"{args.rounds} interleaved rounds of {args.duration:g} s per endpoint and server, "
        f"{args.warmup:g} s warm-up; estimated {estimate / 60:.1f} min"
    )
    report(
        "database: SecantusDB :memory:, one process, one database per web server, "
        + (
            "restarted and re-seeded before each POST /create measurement"
            if args.db_restart == "create"
            else "never restarted"
        )
    )
    for s in srv:
        shown = [a.replace("{port}", "PORT").replace(PYTHON, "python") for a in s.argv]
        report(f"{s.name}: {shlex.join(shown)}")
    report()

    # Servers run from an empty directory: a developer's ./.env must not configure them.
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("GRANIAN_", "GUNICORN"))}
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base_env.get("PYTHONPATH")]))
    base_env["PYTHONUNBUFFERED"] = "1"

    db = Database(workdir, base_env)
    db.start()
    stack.callback(lambda: report(db.stop()))
    list_user = str(ObjectId())
    create_users = [str(ObjectId()) for _ in range(CREATE_USERS)]

    def seed_all() -> None:
        for s in srv:
            seed(db.uri(), s.database, list_user, create_users)

    seed_all()
    eps = endpoints(list_user, create_users)
    assert len(eps) == eps_count

    sampler = MemorySampler()
    for s in srv:
        s.start(workdir, base_env, db)
        assert s.managed is not None
        managed = s.managed
        # Stopped in reverse order of start, each before the database, on any exit.
        stack.callback(lambda m: report(m.stop()), managed)
        sampler.watch(s.name, managed.pid)
        # One at a time, so that the start-up time is not shared with the other's.
        ready = s.wait_ready()
        check_endpoints(s, eps)
        report(f"{s.name}: answering in {ready:.1f} s on port {s.port}, endpoints checked")
    sampler.sample()
    idle_rss = dict(sampler.peak_rss)
    sampler.start()
    stack.callback(sampler.stop)

    load: LoadRunner = wrk_runner(workdir) if args.client == "wrk" else python_runner
    if args.warmup > 0:
        for ep in eps:
            for s in srv:
                load(s.port, ep, args.connections, args.warmup)
        report("warm-up done")
    report()

    results: dict[tuple[str, str], list[Sample]] = {(e.key, s.name): [] for e in eps for s in srv}
    report(f"{'round':>5} {'endpoint':<34} {'server':<9} {'req/s':>8} {'p50 ms':>8} "
           f"{'p99 ms':>8} {'requests':>8} {'unexp':>5} {'cpu/req':>7} {'top w':>6}")  # fmt: skip
    reader = next(e for e in eps if e.key == "list")
    restarts: list[tuple[float, int]] = []  # seconds, requests failed while reconnecting
    for r in range(args.rounds):
        order = srv if r % 2 == 0 else srv[::-1]  # A B, then B A: no server always goes first
        for ep in eps:
            for s in order:
                assert s.managed is not None
                if not s.managed.alive():
                    raise RuntimeError(f"{s.name} died:\n{s.managed.log_tail()}")
                if ep.key == "create" and args.db_restart == "create":
                    # Every write measurement starts from the same fresh database state.
                    started = time.monotonic()
                    db.restart()
                    seed_all()
                    failed = sum(reconnect(x, reader) for x in srv)
                    restarts.append((time.monotonic() - started, failed))
                tree = process_tree(s.managed.pid, _proc_table())
                before = {pid: cpu_ticks(pid) for pid in tree}
                sample = load(s.port, ep, args.connections, args.duration)
                used = {pid: cpu_ticks(pid) - ticks for pid, ticks in before.items()}
                workers = [t for pid, t in used.items() if pid != s.managed.pid]
                sample = dataclasses.replace(
                    sample,
                    cpu_ms_per_request=sum(used.values()) * CLOCK_TICK_MS / max(1, sample.requests),
                    top_worker_share=max(workers) / sum(workers) if sum(workers) else float("nan"),
                )
                results[(ep.key, s.name)].append(sample)
                report(
                    f"{r + 1:>5} {ep.label:<34} {s.name:<9} {sample.rps:>8,.0f} "
                    f"{sample.p50_ms:>8.2f} {sample.p99_ms:>8.2f} {sample.requests:>8} "
                    f"{sample.unexpected:>5} {sample.cpu_ms_per_request:>7.2f} "
                    f"{sample.top_worker_share:>6.0%}"
                )
                time.sleep(0.2)  # let the previous run's connections close
    report()
    if restarts:
        report(
            f"database restarts: {len(restarts)}, median {med([t for t, _ in restarts]):.1f} s "
            f"each with re-seeding; requests failed while the servers reconnected: "
            f"{sum(f for _, f in restarts)}"
        )
        report()
    summarize(report, eps, [s.name for s in srv], results)
    sampler.stop()
    report()
    report("Memory of each server's process tree (master + workers), sampled every second:")
    for s in srv:
        idle = idle_rss.get(s.name, 0) / 1024
        rss, pss = sampler.peak_rss[s.name] / 1024, sampler.peak_pss[s.name] / 1024
        report(
            f"  {s.name}: {sampler.processes[s.name]} processes; RSS (sum of VmRSS) "
            f"idle after start {idle:.0f} MiB, peak {rss:.0f} MiB; peak PSS {pss:.0f} MiB"
        )
    report(f"load average at end: {loadavg()}")
    report()
    report("Shutdown (SIGTERM, wait), by the exit stack, servers first:")
    return True


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything started has been stopped by now
        print("interrupted", file=sys.stderr)
        sys.exit(130)
