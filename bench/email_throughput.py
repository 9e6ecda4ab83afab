"""Email throughput: the outbox dispatcher next to plain smtplib, to one local SMTP sink.

One run starts SecantusDB (in memory; a fresh process for every dispatcher measurement)
and one aiosmtpd sink, each in its own process (the sink's CPU must not share the GIL
with the code being measured), renders N realistic notification emails with the
service's own templates (the same N for every measurement), and measures in interleaved
rounds:

* ceiling: plain smtplib, one persistent connection, sending the N messages prebuilt
  (build_message, as bytes) back to back: MAIL, RCPT, DATA per message;
* dispatcher: the N emails are put in a fresh outbox first (not timed), then the real
  `DispatcherPool.start(context, threads)` runs with the default settings until the
  outbox holds N `sent` records; for 1, 2 and 4 threads in this one process.

Each dispatcher measurement is preceded by a ceiling measurement and compared with it
(rounds alternate their order), because the 2 shared cores are noisy; the summary is
medians across rounds. After every measurement the sink must have received exactly N
messages with N distinct Message-IDs, and the outbox must hold N `sent` records, or
the run stops with an error.

Where the dispatcher's time goes is measured in this process only, by wrapping
`Outbox.claim_batch`, `Outbox.mark_sent`, `SmtpSender.send` and the dispatcher's
`build_message` with time.perf_counter (instance attributes, a subclass, and a module
attribute swapped for the run; the package is not edited).

    .venv/bin/python bench/email_throughput.py            # about 2 minutes
    .venv/bin/python bench/email_throughput.py --quick    # under 30 seconds
    .venv/bin/python bench/email_throughput.py --eml-sink # also the .eml-writing sink

The output is also written to bench/results/email_throughput-<date>[-quick].txt.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.policy
import importlib.metadata
import json
import os
import platform
import re
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from report import Report  # bench/report.py, beside this script

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))  # run from anywhere, without installing the package

FROM_EMAIL = "notifications@example.com"
FROM_NAME = "Example Notifications"
DB_PREFIX = "bench_email_"


# --------------------------------------------------------------------------- the sink
# Runs in a child process: `email_throughput.py --sink-child PORT`. It counts what it
# receives and throws it away; the parent asks on stdin ("stats", "reset").


class CountingHandler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.ids: set[bytes] = set()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        match = re.search(rb"^Message-ID:[ \t]*(\S+)", content, re.IGNORECASE | re.MULTILINE)
        with self.lock:
            self.received += 1
            self.ids.add(match.group(1) if match else b"missing:%d" % self.received)
        return "250 2.0.0 OK"


def sink_child(port: int) -> None:
    from aiosmtpd.controller import Controller

    handler = CountingHandler()
    controller = Controller(handler, hostname=HOST, port=port, server_hostname="localhost")
    controller.start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            with handler.lock:
                if command == "reset":
                    handler.received, handler.ids = 0, set()
                    print("ok", flush=True)
                elif command == "stats":
                    stats = {"received": handler.received, "distinct": len(handler.ids)}
                    print(json.dumps(stats), flush=True)
    finally:
        controller.stop()


class Sink:
    """The parent's side of a sink process: the counting one, or the service's .eml sink."""

    def __init__(self, process: subprocess.Popen[str], port: int, counting: bool) -> None:
        self.process, self.port, self.counting = process, port, counting
        self.eml_dir: Path | None = None

    @classmethod
    def counting_sink(cls) -> Sink:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, __file__, "--sink-child", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            process.kill()
            raise RuntimeError("the counting SMTP sink did not start")
        return cls(process, port, counting=True)

    @classmethod
    def eml_sink(cls, directory: Path) -> Sink:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "notification_service", "sink", "--host", HOST,
             "--port", str(port), "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LOG_LEVEL": "WARNING"},
            cwd=REPO,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        wait_port(port, process, "the .eml SMTP sink")
        sink = cls(process, port, counting=False)
        sink.eml_dir = directory
        return sink

    def _ask(self, command: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def reset(self) -> None:
        if self.counting:
            if self._ask("reset") != "ok":
                raise RuntimeError("the SMTP sink did not answer")
        else:
            assert self.eml_dir is not None
            for path in self.eml_dir.glob("*.eml"):
                path.unlink()

    def stats(self) -> tuple[int, int]:
        """(messages received, distinct Message-IDs) since the last reset."""
        if self.counting:
            stats = json.loads(self._ask("stats"))
            return int(stats["received"]), int(stats["distinct"])
        assert self.eml_dir is not None
        ids = set()
        files = list(self.eml_dir.glob("*.eml"))
        for path in files:
            match = re.search(rb"^Message-ID:[ \t]*(\S+)", path.read_bytes(), re.I | re.M)
            ids.add(match.group(1) if match else path.name.encode())
        return len(files), len(ids)

    def stop(self) -> None:
        stop_process(self.process)


# ---------------------------------------------------------------------- processes


def free_port() -> int:
    # Controller cannot bind port 0 (it connects to itself to check it is up).
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, process: subprocess.Popen[Any], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
            return
        time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"{what} did not listen within {timeout:g}s")


def stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(OSError):
        if process.stdin is not None:
            process.stdin.close()
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Database:
    """One SecantusDB process at a time; `restart` gives a fresh one.

    SecantusDB's in-memory store gets slower as writes accumulate in one process (see
    the WSGI section of bench/README.md), so every dispatcher measurement gets a new
    process, and the figures do not drift with the order of the measurements.
    """

    def __init__(self) -> None:
        self.process, self.port = start_database()

    @property
    def pid(self) -> int:
        return self.process.pid

    def restart(self) -> tuple[int, int]:
        stop_process(self.process)
        self.process, self.port = start_database()
        return self.pid, self.port

    def stop(self) -> None:
        stop_process(self.process)


def start_database() -> tuple[subprocess.Popen[bytes], int]:
    """SecantusDB in memory on a free port (as tests/conftest.py starts it)."""
    beside = Path(sys.executable).with_name("secantusd-py")
    command = str(beside) if beside.exists() else "secantusd-py"
    port = free_port()
    process = subprocess.Popen(
        [command, "--host", HOST, "--port", str(port), "--storage-path", ":memory:",
         "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    wait_port(port, process, "secantusd-py")
    from pymongo import MongoClient

    uri = f"mongodb://{HOST}:{port}/"
    client: MongoClient[dict[str, Any]]
    with MongoClient(uri, serverSelectionTimeoutMS=30_000) as client:
        client.admin.command("ping")
    return process, port


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (None: this one), all its threads."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by this process, the sink and the database over a measurement."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self.start[name] for name, pid in self.pids.items()}


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Email:
    record: dict[str, Any]  # the outbox fields the API would store for it
    payload: bytes  # build_message(...) as sent on the wire, for the ceiling


def make_emails(count: int) -> list[Email]:
    """`count` notification emails rendered by the service's templates, as the API would."""
    from notification_service.config import Config
    from notification_service.email_sender import OutgoingEmail, build_message
    from notification_service.email_templates import EmailTemplates
    from notification_service.notifications import message_id
    from notification_service.schemas import Notification

    config = Config(smtp_email=FROM_EMAIL, smtp_name=FROM_NAME)
    templates = EmailTemplates()
    cities = ["Lisbon, PT", "Berlin, DE", "Austin, US", "Osaka, JP", "Nairobi, KE"]
    emails = []
    for i in range(count):
        key = "new_login" if i % 3 else "registration"
        user = {"_id": f"{i:024x}", "email": f"user{i}@example.com", "name": f"User Number {i}"}
        data = (
            {
                "ip": f"203.0.113.{i % 250}",
                "device": "Firefox 131 on Ubuntu 24.04 (x86_64)",
                "location": cities[i % len(cities)],
                "session": uuid.UUID(int=i).hex,
            }
            if key == "new_login"
            else {"plan": "free", "referrer": "newsletter-2026-11", "locale": "en-GB"}
        )
        notification: Notification = {
            "id": f"{i:024x}",
            "timestamp": 1_790_000_000 + i,
            "is_new": True,
            "user_id": user["_id"],
            "key": key,
            "target_id": f"target-{i}",
            "data": data,
        }
        content = templates.render(notification, user)
        record: dict[str, Any] = {
            "kind": "notification",
            "to": user["email"],
            "subject": content.subject,
            "text": content.text,
            "html": content.html,
            "message_id": message_id(config),
            "user_id": user["_id"],
            "notification_id": notification["id"],
            "key": key,
        }
        message = build_message(
            OutgoingEmail(
                to=record["to"],
                subject=record["subject"],
                text=record["text"],
                html=record["html"],
                message_id=record["message_id"],
            ),
            from_email=FROM_EMAIL,
            from_name=FROM_NAME,
        )
        emails.append(Email(record, message.as_bytes(policy=email.policy.SMTP)))
    return emails


def outbox_documents(emails: list[Email]) -> list[dict[str, Any]]:
    """The documents Outbox.enqueue would insert, made by Outbox.enqueue itself.

    It writes into a list instead of the database, so that insert_many can store all
    of them in one operation (enqueue time is not part of the figure).
    """
    from notification_service.notifications import utc_now
    from notification_service.outbox import Outbox

    documents: list[dict[str, Any]] = []

    class Collection:
        def insert_one(self, document: dict[str, Any], session: Any = None) -> None:
            documents.append(document)

    outbox = Outbox({"email_outbox": Collection()}, "email_outbox")  # type: ignore[arg-type]
    now = utc_now()
    for e in emails:
        outbox.enqueue(dict(e.record), now)
    return documents


# ------------------------------------------------------------------------ measurement


@dataclass
class Timings:
    """Seconds spent in each wrapped call, summed over the dispatcher threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return timed


@dataclass
class Result:
    what: str  # "ceiling" or "dispatcher xN"
    count: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process
    timings: Timings | None = None
    empty_claims: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def check_sink(sink: Sink, count: int, what: str) -> None:
    received, distinct = sink.stats()
    if received != count or distinct != count:
        raise RuntimeError(
            f"{what}: the sink received {received} messages with {distinct} distinct "
            f"Message-IDs, expected exactly {count}"
        )


def measure_ceiling(sink: Sink, db_pid: int, emails: list[Email]) -> Result:
    """Plain smtplib, one persistent connection, prebuilt messages back to back."""
    sink.reset()
    conn = smtplib.SMTP(HOST, sink.port, local_hostname="localhost", timeout=30)
    try:
        conn.ehlo()
        cpu = CpuMeter({"bench": None, "sink": sink.process.pid, "database": db_pid})
        start = time.perf_counter()
        for e in emails:
            refused = conn.sendmail(FROM_EMAIL, [e.record["to"]], e.payload)
            if refused:
                raise RuntimeError(f"ceiling: the sink refused {refused}")
        seconds = time.perf_counter() - start
        used = cpu.stop()
    finally:
        conn.quit()
    check_sink(sink, len(emails), "ceiling")
    return Result("ceiling", len(emails), seconds, used)


def measure_dispatcher(
    sink: Sink,
    db: tuple[int, int],
    emails: list[Email],
    threads: int,
    *,
    batch_size: int,
    timeout: float,
) -> Result:
    """Fill a fresh outbox, then time DispatcherPool until every email is `sent`."""
    from notification_service import dispatcher as dispatcher_module
    from notification_service.config import Config
    from notification_service.dispatcher import DispatchContext, DispatcherPool
    from notification_service.email_sender import SmtpSender, SmtpSettings
    from notification_service.server import build_runtime

    what = f"dispatcher x{threads}"
    db_pid, db_port = db
    db_name = f"{DB_PREFIX}{uuid.uuid4().hex[:10]}"
    config = Config(
        db_uri=f"mongodb://{HOST}:{db_port}/{db_name}",
        smtp_host=HOST,
        smtp_port=sink.port,
        smtp_security="none",
        smtp_email=FROM_EMAIL,
        smtp_name=FROM_NAME,
        dispatcher_threads=0,  # started below, once the outbox is full
        dispatch_batch_size=batch_size,
        log_level="WARNING",
    )
    runtime = build_runtime(config)  # also creates the outbox index
    services, outbox = runtime.services, runtime.services.outbox
    pool = None
    # The dispatcher calls build_message through its module's global name, swapped
    # for a timed one during the run (by name: mypy sees no re-export to assign to).
    build_name = "build_message"
    original_build = getattr(dispatcher_module, build_name)
    try:
        outbox.records.insert_many(outbox_documents(emails))
        sink.reset()

        timings = Timings()
        count = len(emails)
        done = threading.Event()
        finished_at = [0.0]
        sent = [0]
        empty = [0]
        lock = threading.Lock()
        claim_batch, mark_sent = outbox.claim_batch, outbox.mark_sent

        def counted_claim(*args: Any, **kwargs: Any) -> Any:
            batch = claim_batch(*args, **kwargs)
            if not batch:
                with lock:
                    empty[0] += 1
            return batch

        def counted_mark_sent(*args: Any, **kwargs: Any) -> Any:
            # One email (returns a bool) or several of one claim (returns how many).
            stored = mark_sent(*args, **kwargs)
            with lock:
                sent[0] += int(stored)
                if sent[0] >= count and not done.is_set():
                    finished_at[0] = time.perf_counter()
                    done.set()
            return stored

        # Instance attributes shadow the methods for this one Outbox object only.
        outbox.claim_batch = timings.wrap("claim_batch", counted_claim)  # type: ignore[method-assign]
        outbox.mark_sent = timings.wrap("mark_sent", counted_mark_sent)  # type: ignore[method-assign]
        setattr(dispatcher_module, build_name, timings.wrap("build_message", original_build))

        settings = SmtpSettings.from_config(config)

        class TimedSender(SmtpSender):
            def send(self, message: Any) -> None:
                start = time.perf_counter()
                try:
                    super().send(message)
                finally:
                    timings.add("smtp send", time.perf_counter() - start)

        cpu = CpuMeter({"bench": None, "sink": sink.process.pid, "database": db_pid})
        start = time.perf_counter()
        context = DispatchContext(config, outbox, services.clock, services.store.has_notification)
        pool = DispatcherPool.start(context, threads, lambda: TimedSender(settings))
        if not done.wait(timeout):
            raise RuntimeError(f"{what}: only {sent[0]} of {count} sent after {timeout:g}s")
        seconds = finished_at[0] - start
        used = cpu.stop()
        pool.stop()
        pool = None
    finally:
        setattr(dispatcher_module, build_name, original_build)
        if pool is not None:
            pool.stop()
        pipeline = [{"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        counts = {row["_id"]: row["n"] for row in outbox.records.aggregate(pipeline)}
        runtime.client.drop_database(db_name)
        runtime.close()
    if counts != {"sent": count}:
        raise RuntimeError(f"{what}: outbox ended as {counts}, expected {{'sent': {count}}}")
    check_sink(sink, count, what)
    return Result(what, count, seconds, used, timings, empty[0])


# ----------------------------------------------------------------------------- report


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def code_version() -> str:
    """The commit, and whether notification_service differs from it."""
    from notification_service import dispatcher

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "notification_service")
    flush = getattr(dispatcher, "SENT_FLUSH", None)
    return f"git {commit}{' + local changes in notification_service' if dirty else ''}" + (
        f", successful sends stored per {flush} (SENT_FLUSH)" if flush else ""
    )


def describe_machine(report: Report) -> None:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    report(f"date:     {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    report(f"machine:  {os.cpu_count()} cores ({cpu}), load {os.getloadavg()[0]:.2f}")
    report(
        f"software: Python {platform.python_version()}, SecantusDB {version('SecantusDB')} "
        f"(in memory), pymongo {version('pymongo')}, aiosmtpd {version('aiosmtpd')}"
    )


def breakdown(report: Report, result: Result) -> None:
    """Wall time of the wrapped calls per email, summed over threads, and CPU per email."""
    assert result.timings is not None
    t = result.timings
    per = 1000.0 / result.count
    parts = ["claim_batch", "build_message", "smtp send", "mark_sent"]
    busy = sum(t.seconds.get(p, 0.0) for p in parts)
    threads = int(result.what.rsplit("x", 1)[1])
    # Thread-seconds: with N threads the parts add up to about N x the wall time.
    other = threads * result.seconds - busy
    cells = [f"{p} {t.seconds.get(p, 0.0) * per:.2f}" for p in parts]
    report(f"  {result.what}: " + ", ".join(cells) + f", rest {other * per:.2f}")
    claims, marks = t.calls.get("claim_batch", 0), t.calls.get("mark_sent", 0)
    report(
        f"  {'':{len(result.what)}}  {claims} claims ({result.empty_claims} won nothing), "
        f"{t.seconds.get('claim_batch', 0.0) / max(1, claims) * 1000:.0f} ms per claim; "
        f"{marks} mark_sent writes, "
        f"{t.seconds.get('mark_sent', 0.0) / max(1, marks) * 1000:.1f} ms each"
    )


def cpu_line(report: Report, result: Result) -> None:
    per = 1000.0 / result.count
    cells = [f"{name} {seconds * per:.2f}" for name, seconds in result.cpu.items()]
    total = sum(result.cpu.values()) * per
    report(f"  {result.what:<14} " + ", ".join(cells) + f"; total {total:.2f} ms CPU per email")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------- main


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace, report: Report) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    describe_machine(report)
    emails = make_emails(args.count)
    sizes = [len(e.payload) for e in emails]
    report(
        f"messages: {len(emails)} rendered notification emails (registration, new_login), "
        f"text + html, {min(sizes)}-{max(sizes)} bytes on the wire (median "
        f"{median([float(s) for s in sizes]):.0f})"
    )
    report(
        f"dispatcher: DispatcherPool with {threads_text(args.threads)} threads, "
        f"DISPATCH_BATCH_SIZE={args.batch_size}, SMTP_MAX_PER_CONNECTION=100, no rate limit"
    )
    report(f"code: {code_version()}")
    report("ceiling: plain smtplib, one connection, sendmail() of the prebuilt messages")
    report()
    database = Database()
    sinks: list[Sink] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-email-")
    try:
        sink = Sink.counting_sink()
        sinks.append(sink)
        ceilings: list[Result] = []
        results: dict[int, list[Result]] = {n: [] for n in args.threads}
        ratios: dict[int, list[float]] = {n: [] for n in args.threads}
        timeout = max(60.0, args.count / 10)

        def dispatch(sink: Sink, emails: list[Email], threads: int) -> Result:
            db = database.restart()
            return measure_dispatcher(
                sink, db, emails, threads, batch_size=args.batch_size, timeout=timeout
            )

        # Warm-up: connections, imports, the server's first collections.
        measure_ceiling(sink, database.pid, emails[:100])
        dispatch(sink, emails[:50], max(args.threads))
        begun = time.monotonic()
        for round_no in range(1, args.rounds + 1):
            order = list(args.threads) if round_no % 2 else list(reversed(args.threads))
            cells = []
            for n in order:
                ceiling = measure_ceiling(sink, database.pid, emails)
                result = dispatch(sink, emails, n)
                ceilings.append(ceiling)
                results[n].append(result)
                ratios[n].append(result.rate / ceiling.rate)
                cells.append(f"ceiling {ceiling.rate:4.0f}, x{n} {result.rate:4.0f}")
            report(f"round {round_no} (emails/s): " + "; ".join(cells))
            elapsed = time.monotonic() - begun
            if round_no < args.rounds and elapsed / round_no * (round_no + 1) > args.budget:
                report(f"(stopping: one more round would pass the {args.budget:g}s budget)")
                break
        rounds = len(results[args.threads[0]])
        report()
        report(
            f"summary: medians over {rounds} round(s) of {args.count} emails; each dispatcher "
            "figure is divided by the ceiling measured just before it"
        )
        report(f"  {'':<30} {'emails/s':>9} {'x ceiling':>10}")
        report(
            f"  {'plain smtplib (ceiling)':<30} "
            f"{median([c.rate for c in ceilings]):9.0f} {1.0:10.2f}"
        )
        for n in args.threads:
            label = f"dispatcher, {n} thread{'s' if n > 1 else ''}"
            rate = median([r.rate for r in results[n]])
            report(f"  {label:<30} {rate:9.0f} {median(ratios[n]):10.2f}")
        best = max(args.threads, key=lambda n: median(ratios[n]))
        verdict = "reached" if median(ratios[best]) >= 0.8 else "NOT reached"
        report(f"  0.8 x ceiling: {verdict} (best: {best} thread(s) at {median(ratios[best]):.2f})")
        report()
        report("dispatcher wall time per email in ms, summed over its threads (last round):")
        for n in args.threads:
            breakdown(report, results[n][-1])
        report()
        report(
            "CPU per email in ms, by process (last round; the ceiling is the one measured "
            f"before x{args.threads[0]}):"
        )
        index = order.index(args.threads[0])
        cpu_line(report, ceilings[-len(order) + index])
        for n in args.threads:
            cpu_line(report, results[n][-1])
        report(f"(load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
        if args.eml_sink:
            report()
            eml = Sink.eml_sink(Path(tmp.name))
            sinks.append(eml)
            ceiling = measure_ceiling(eml, database.pid, emails)
            result = dispatch(eml, emails, best)
            report(
                "with the .eml-writing sink (python -m notification_service sink), once: "
                f"ceiling {ceiling.rate:.0f}, dispatcher x{best} {result.rate:.0f} emails/s "
                f"({result.rate / ceiling.rate:.2f})"
            )
    finally:
        for s in sinks:
            s.stop()
        database.stop()
        tmp.cleanup()


def threads_text(threads: list[int]) -> str:
    return "/".join(map(str, threads))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds (< 30 s)")
    parser.add_argument("--count", type=int, help="emails per measurement (default 1000)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 2)")
    parser.add_argument("--threads", default="1,2,4", help="dispatcher thread counts")
    parser.add_argument("--batch-size", type=int, help="DISPATCH_BATCH_SIZE (default: Config's)")
    parser.add_argument("--budget", type=float, help="seconds after which no round starts")
    parser.add_argument("--eml-sink", action="store_true", help="also measure the .eml sink")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results")
    parser.add_argument("--sink-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink_child:
        with contextlib.suppress(KeyboardInterrupt):
            sink_child(args.sink_child)
        return 0
    args.count = args.count or (200 if args.quick else 1000)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.budget = args.budget or (25.0 if args.quick else 150.0)
    args.threads = [int(n) for n in args.threads.split(",")]
    if args.batch_size is None:
        from notification_service.config import Config

        args.batch_size = Config().dispatch_batch_size
    if args.count < 1 or args.batch_size < 1 or any(n < 1 for n in args.threads):
        parser.error("--count, --batch-size and --threads must be positive")
    suffix = "-quick" if args.quick else ""
    path = None if args.no_save else RESULTS / f"email_throughput-{dt.date.today()}{suffix}.txt"
    report = Report(path)
    complete = False
    try:
        with terminate_on_sigterm():
            report(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
            run(args, report)
        complete = True
    except KeyboardInterrupt:
        report("interrupted")
        return 130
    finally:
        report.close(complete=complete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
