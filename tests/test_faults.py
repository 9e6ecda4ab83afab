"""Durability and faults, with real processes.

The first test checks the write concern of every write on every path (`make test`).
The others are the fault suite, marked `faults`: `make test` skips them, `make faults`
and .ci/run run them. Real processes throughout: SecantusDB, the .eml sink and the
service (`serve`, granian) started as `make run` starts them (embedded.py), `worker`
processes, or an SMTP server of tests/smtp_fixtures.py for an outage or a hang, all
driven over HTTP. Each scenario asserts what a user would check: the answers, what is
stored, and the emails at the SMTP server; the one bound on time is the documented
one (an answer within DB_TIMEOUT_MS and a margin). At the end the suite prints a table
of what each scenario did and saw.

FAULT_ROUNDS sets the rounds of the database kill (default 4), FAULT_CLIENTS its
client threads (default 32, as in the issue that found the loss).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from bson import ObjectId
from conftest import MongoServer, runtime
from pymongo import MongoClient, monitoring
from pymongo.database import Database
from smtp_fixtures import SmtpServer

from notification_service import embedded
from notification_service.config import Config
from notification_service.dispatcher import (
    SENT_FLUSH,
    DispatchContext,
    Dispatcher,
    RateLimiter,
)
from notification_service.email_sender import SmtpSender, SmtpSettings

ROUNDS = int(os.environ.get("FAULT_ROUNDS", "4"))
CLIENTS = int(os.environ.get("FAULT_CLIENTS", "32"))
USERS_PER_CLIENT = 4


class WriteLog(monitoring.CommandListener):
    """The write concern of every write command to one database, while recording.

    A write inside a transaction carries none (the server refuses one there): its
    durability is the commit's, so the commit is recorded in its place.
    """

    WRITES = frozenset({"insert", "update", "delete", "findAndModify", "createIndexes"})

    def __init__(self) -> None:
        self.database: str | None = None
        self.seen: list[tuple[str, dict[str, Any] | None]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.database is None:
            return
        if event.command_name == "commitTransaction" or (
            event.database_name == self.database
            and event.command_name in self.WRITES
            and "autocommit" not in event.command  # not inside a transaction
        ):
            self.seen.append((event.command_name, event.command.get("writeConcern")))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture(scope="session")
def write_log() -> WriteLog:
    # pymongo has no way to unregister; the listener only records for `database`.
    log = WriteLog()
    monitoring.register(log)
    return log


@pytest.fixture(scope="module")
def standalone_server() -> Iterator[MongoServer]:
    """SecantusDB looking like a standalone mongod (no replica set) to the driver."""
    server = MongoServer.start("--standalone")
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("topology", "uri_options", "expected"),
    [
        ("replica set", "", {"w": "majority", "j": True}),
        ("standalone", "", {"w": "majority", "j": True}),
        ("replica set", "?w=1&journal=false", {"w": 1, "j": False}),
    ],
)
def test_every_write_carries_the_write_concern_on_every_path(
    topology: str,
    uri_options: str,
    expected: dict[str, Any],
    request: pytest.FixtureRequest,
    write_log: WriteLog,
    smtp_factory: Callable[..., Any],
    make_app: Callable[..., Any],
) -> None:
    fixture = "mongo_server" if topology == "replica set" else "standalone_server"
    server: MongoServer = request.getfixturevalue(fixture)
    name = f"wc_{ObjectId()}"
    smtp = smtp_factory(fail_first=1, fail_code=451)  # one retry, then sent
    config = Config(
        db_uri=server.uri(name) + uri_options,
        email="wc@example.com",
        dispatcher_threads=0,
        dispatch_backoff_base_seconds=0.01,
        dispatch_backoff_max_seconds=0.05,
        **smtp.config_kwargs(),
    )
    write_log.database, write_log.seen = name, []
    try:
        app = make_app(config)
        client = app.test_client()
        user_id = str(ObjectId())
        bodies = [{"user_id": user_id, "key": key} for key in ("new_login", "new_message")]
        bodies.append({"user_id": str(ObjectId()), "key": "registration"})
        # One with an Idempotency-Key: its record's claim and completion are writes too.
        created = [
            client.post("/create", json=body, headers={"Idempotency-Key": f"wc-{i}"} if i else {})
            for i, body in enumerate(bodies)
        ]
        assert [r.status_code for r in created] == [201, 201, 201]
        notification_id = created[0].get_json()["data"]["notification_id"]
        read = client.post(f"/read?user_id={user_id}&notification_id={notification_id}")
        assert read.status_code == 200
        email = {"to": "x@example.com", "subject": "s", "text": "t"}
        assert client.post("/email", json=email).status_code == 202
        services = runtime(app).services
        dispatcher = Dispatcher(
            context=DispatchContext(
                config, services.outbox, runtime(app).clock, services.store.has_notification
            ),
            sender=SmtpSender(SmtpSettings.from_config(config)),
            name="wc",
            limiter=RateLimiter(0),
            wake=threading.Event(),
            stopping=threading.Event(),
            rng=random.Random(1),
        )
        try:
            deadline = time.monotonic() + 10
            while services.outbox.backlog()["queued"] and time.monotonic() < deadline:
                dispatcher.dispatch_once() or time.sleep(0.02)
        finally:
            dispatcher.sender.close()
        with MongoClient(server.uri(name)) as direct:
            assert {r["status"] for r in direct[name].email_outbox.find()} == {"sent"}
            direct.drop_database(name)
    finally:
        write_log.database = None
    kinds = {command for command, _ in write_log.seen}
    # Records, user profiles, outbox inserts, claims, retries and sends all went out.
    assert {"insert", "update", "createIndexes"} <= kinds
    # new_login's record and email commit together where transactions exist.
    assert ("commitTransaction" in kinds) == (topology == "replica set")
    assert [(c, wc) for c, wc in write_log.seen if wc != expected] == []


# --- the fault suite ------------------------------------------------------------------

DB_TIMEOUT_MS = 1500
# README "Guarantees": every answer within DB_TIMEOUT_MS and a small margin. The margin
# here is wide: two cores are shared by the database, the service and these clients.
ANSWER_BOUND = DB_TIMEOUT_MS / 1000 + 2.0
FAST_RETRY = {"DISPATCH_BACKOFF_BASE_SECONDS": 0.2, "DISPATCH_BACKOFF_MAX_SECONDS": 1}
WAITING = ["pending", "queued", "sending"]


@dataclass
class Row:
    """One line of the table the suite prints: what a scenario did and saw."""

    scenario: str
    fault: str
    requests: int
    ok: int  # 2xx answers
    unavailable: int  # 503 answers
    other: int  # any other answer, or none in time
    queued: int  # emails of 2xx answers
    delivered: int  # of those, received by the SMTP server
    duplicates: int  # copies received beyond the first, of any email
    note: str


COLUMNS = ("scenario", "fault", "requests", "2xx", "503", "other", "emails queued",
           "delivered", "duplicates", "note")  # fmt: skip
ROWS: list[Row] = []


def table(rows: Sequence[Row]) -> str:
    cells = [COLUMNS, *(tuple(str(value) for value in astuple(row)) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def fault_table() -> Iterator[None]:
    """Print the table once this module's tests are done (`make faults` runs with -s)."""
    yield
    if ROWS:
        print(f"\n\nFault suite: what each scenario did and saw\n{table(ROWS)}")


@dataclass
class Answer:
    status: int  # 0: no HTTP answer in time
    body: dict[str, Any] = field(default_factory=dict)
    retry_after: str | None = None
    user_id: str = ""
    after_restart: bool = False

    @property
    def email_id(self) -> str | None:
        return self.body.get("data", {}).get("email_id") if 200 <= self.status < 300 else None

    @property
    def is_database_unavailable(self) -> bool:
        """The service's one error shape, for a database that did not answer."""
        error = self.body.get("error") or {}
        return (
            self.status == 503
            and self.body.get("success") is False
            and error.get("code") == "database_unavailable"
            and bool(error.get("message"))
            and self.retry_after is not None
        )


def call(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float = 15,
    session: requests.Session | None = None,
) -> Answer:
    try:
        response = (session or requests).request(method, url, json=body, timeout=timeout)
    except requests.RequestException:
        return Answer(0)
    try:
        parsed = response.json()
    except ValueError:
        parsed = None
    return Answer(
        response.status_code,
        parsed if isinstance(parsed, dict) else {},
        response.headers.get("Retry-After"),
    )


Call = tuple[str, str, dict[str, Any] | None]


def call_all(calls: Sequence[Call], threads: int = 8, timeout: float = 15) -> list[Answer]:
    """Make `calls` from `threads` client threads at once; the answers in their order."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda c: call(*c, timeout=timeout), calls))


def new_login(url: str, user_id: str) -> Call:
    return ("POST", f"{url}/create", {"user_id": user_id, "key": "new_login"})


def emails(urls: Sequence[str], count: int) -> list[Call]:
    """`count` POST /email calls spread over `urls`, each a distinct message."""
    return [
        ("POST", f"{urls[i % len(urls)]}/email",
         {"to": f"user{i}@example.com", "subject": f"fault {i}", "text": "hello"})
        for i in range(count)
    ]  # fmt: skip


def row(scenario: str, fault: str, answers: Sequence[Answer], mail: Delivery, note: str) -> None:
    """Add a table row; before a scenario asserts, so that a failure shows in it too."""
    statuses = [a.status for a in answers]
    ok = sum(200 <= s < 300 for s in statuses)
    unavailable = statuses.count(503)
    other = len(statuses) - ok - unavailable
    ROWS.append(Row(scenario, fault, len(statuses), ok, unavailable, other,
                    mail.queued, mail.delivered, mail.duplicates, note))  # fmt: skip


def every_email_once_after_smtp(
    scenario: str,
    fault: str,
    failed: str,
    db: Database[dict[str, Any]],
    answers: Sequence[Answer],
    smtp: SmtpServer,
) -> None:
    """The SMTP scenarios' end: the outbox drains, the row, then each email once."""
    done = drained(db, 60)
    mail = delivery(db, answers, received_by(smtp))
    row(scenario, fault, answers, mail, f"{mail.attempts - mail.delivered} attempts {failed}")
    assert [a.status for a in answers] == [202] * len(answers)
    assert done and not mail.lost and mail.duplicates == 0, mail


@dataclass
class Delivery:
    queued: int  # emails of 2xx answers
    delivered: int  # of those, received at least once
    lost: list[str]  # of those, never received
    duplicates: int  # copies beyond the first, of every email received
    attempts: int  # SMTP attempts the outbox counted for the queued emails
    statuses: Counter[str]


def delivery(
    db: Database[dict[str, Any]], answers: Sequence[Answer], received: Counter[str]
) -> Delivery:
    ids = [a.email_id for a in answers if a.email_id]
    records = {
        str(r["_id"]): r for r in db.email_outbox.find({"_id": {"$in": [ObjectId(i) for i in ids]}})
    }
    lost = [i for i in ids if i not in records or not received[records[i]["message_id"]]]
    return Delivery(
        queued=len(ids),
        delivered=len(ids) - len(lost),
        lost=lost,
        duplicates=sum(n - 1 for n in received.values()),
        attempts=sum(int(r["attempts"]) for r in records.values()),
        statuses=Counter(r["status"] for r in records.values()),
    )


def received_by(smtp: SmtpServer) -> Counter[str]:
    return Counter(str(m.message["Message-ID"]) for m in smtp.messages)


def received_in(mail_dir: Path) -> Counter[str]:
    return Counter(
        str(message_from_bytes(eml.read_bytes())["Message-ID"]) for eml in mail_dir.glob("*.eml")
    )


def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    if not eventually(predicate, timeout):
        raise AssertionError(f"timed out waiting for {what}")


def drained(db: Database[dict[str, Any]], timeout: float) -> bool:
    """Whether every email left the outbox within `timeout`; then a second more, so that
    a duplicate sent late has its chance to arrive."""
    done = eventually(
        lambda: db.email_outbox.count_documents({"status": {"$in": WAITING}}) == 0, timeout
    )
    time.sleep(1.0)
    return done


def freeze(pid: int) -> None:
    """SIGSTOP `pid` and wait until each of its threads has stopped (it is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)

    def states() -> list[str]:
        found = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):
                # The state follows the parenthesised command name, which may hold spaces.
                found.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        return found

    wait_for(lambda: all(state == "T" for state in states()), 5, f"process {pid} to stop")


def settings(db_uri: str, smtp_port: int, **variables: object) -> dict[str, str]:
    """The environment of a service or worker: this database and SMTP server, test mode
    (a /create makes its user), then `variables`. Errors only in the log: the warnings
    of every request a fault turned away would bury the table."""
    env = {
        "DB_URI": db_uri,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_SECURITY": "none",
        "EMAIL": "faults@example.com",
        "LOG_LEVEL": "ERROR",
    }
    env.update({name: str(value) for name, value in variables.items()})
    return env


@dataclass
class Rig:
    """Starts one scenario's processes (embedded.py's helpers) and stops them all,
    newest first, when it ends."""

    root: Path
    stack: contextlib.ExitStack
    started: int = 0

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def _name(self, kind: str) -> str:
        self.started += 1
        return f"{kind}-{self.started}"

    def _keep(self, child: embedded.Child) -> embedded.Child:
        self.stack.callback(child.stop)
        return child

    def database(self, port: int | None = None) -> tuple[embedded.Child, str]:
        """SecantusDB on its data in root/db, as `make run` starts it."""
        child, uri = embedded.start_database(
            self.root / "db", self.run_dir, port, name=self._name("database")
        )
        return self._keep(child), uri

    def sink(self) -> tuple[Path, int]:
        mail_dir = self.root / "mail"
        child, port = embedded.start_mail_sink(mail_dir, self.run_dir, name=self._name("sink"))
        self._keep(child)
        return mail_dir, port

    def service(self, env: dict[str, str]) -> tuple[embedded.Child, str]:
        child, url = embedded.start_service(env, self.run_dir, name=self._name("service"))
        return self._keep(child), url

    def worker(self, env: dict[str, str]) -> embedded.Child:
        return self._keep(embedded.start_worker(env, self.run_dir, name=self._name("worker")))

    def mongo(self, uri: str) -> Database[dict[str, Any]]:
        client: MongoClient[dict[str, Any]] = MongoClient(uri, tz_aware=True)
        self.stack.callback(client.close)
        return client.get_default_database()


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setenv("LOG_LEVEL", "WARNING")  # the sink would log every message
    with contextlib.ExitStack() as stack:
        yield Rig(tmp_path, stack)


@pytest.mark.faults
def test_a_frozen_database_gets_503s_in_time_and_the_service_recovers_without_restart(
    rig: Rig,
) -> None:
    db_child, uri = rig.database()
    mail_dir, sink_port = rig.sink()
    service, url = rig.service(
        settings(uri, sink_port, DB_TIMEOUT_MS=DB_TIMEOUT_MS, DISPATCHER_THREADS=1)
    )
    users = [str(ObjectId()) for _ in range(8)]
    creates = [new_login(url, user) for user in users]
    before = call_all(creates)
    # Every kind of call the database stands behind, at once, more than the threads
    # serving them: waiting for a thread counts against the same deadline.
    frozen_calls = [
        *creates,
        *(("GET", f"{url}/list?user_id={user}", None) for user in users[:4]),
        *(("GET", f"{url}/count?user_id={user}", None) for user in users[:2]),
        *emails([url], 2),
        ("GET", f"{url}/ready", None),
    ]
    freeze(db_child.process.pid)
    try:
        during = call_all(frozen_calls, threads=len(frozen_calls), timeout=ANSWER_BOUND)
        health = call("GET", f"{url}/health", timeout=ANSWER_BOUND)
    finally:
        os.kill(db_child.process.pid, signal.SIGCONT)
    recovered = eventually(lambda: call("GET", f"{url}/ready").status == 200, 30)
    after = call_all(creates)
    db = rig.mongo(uri)
    done = drained(db, 60)
    mail = delivery(db, before + after, received_in(mail_dir))
    shaped = sum(a.is_database_unavailable for a in during)
    row(
        "1 database frozen",
        f"SIGSTOP under {len(frozen_calls)} concurrent requests, then SIGCONT",
        before + during + after,
        mail,
        f"{shaped}/{len(during)} answered 503 database_unavailable within {ANSWER_BOUND:g} s; "
        f"{'recovered' if recovered else 'NOT recovered'} without a restart",
    )
    assert [a.status for a in before] == [201] * len(before)
    assert [(a.status, a.body) for a in during if not a.is_database_unavailable] == []
    assert health.status == 200  # the service itself never stopped answering
    assert recovered, "GET /ready did not come back after SIGCONT"
    assert service.process.poll() is None  # the same process: nobody restarted it
    assert [a.status for a in after] == [201] * len(after)
    assert done and not mail.lost and mail.duplicates == 0, mail


@dataclass
class Load:
    """CLIENTS threads posting new_login creates until stopped, keeping every answer."""

    base_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    restarted: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)
    in_flight: int = 0

    def start(self) -> None:
        for _ in range(CLIENTS):
            users = [str(ObjectId()) for _ in range(USERS_PER_CLIENT)]
            thread = threading.Thread(target=self._client, args=(users,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self, users: list[str]) -> None:
        with requests.Session() as session:
            n = 0
            while not self.stop.is_set():
                user_id = users[n % len(users)]
                n += 1
                after = self.restarted.is_set()
                with self.lock:
                    self.in_flight += 1
                method, url, body = new_login(self.base_url, user_id)
                answer = call(method, url, body, session=session)
                answer.user_id, answer.after_restart = user_id, after
                with self.lock:
                    self.in_flight -= 1
                    self.answers.append(answer)

    def created(self, *, after_restart: bool = False) -> list[Answer]:
        with self.lock:
            return [
                a
                for a in self.answers
                if a.status == 201 and (a.after_restart or not after_restart)
            ]

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


@pytest.mark.faults
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_every_201_survives_a_database_kill_with_one_email(round_: int, rig: Rig) -> None:
    rng = random.Random(round_)
    db_child, uri = rig.database()
    mail_dir, sink_port = rig.sink()
    service, url = rig.service(
        settings(
            uri,
            sink_port,
            NOTIFICATIONS_LIMIT=500,  # nothing of a round is capped away
            DISPATCHER_THREADS=2,
            DISPATCH_POLL_SECONDS=0.2,
            DISPATCH_LEASE_SECONDS=20,
            SMTP_TIMEOUT=5,
            **FAST_RETRY,
        )
    )
    load = Load(url)
    try:
        load.start()
        kill_at = rng.randint(40, 160)
        wait_for(lambda: len(load.created()) >= kill_at, 60, f"{kill_at} creates")
        in_flight = load.in_flight
        os.kill(db_child.process.pid, signal.SIGKILL)
        db_child.process.wait()
        killed_after = len(load.created())
        time.sleep(rng.uniform(0, 1.0))
        # Started again the same way, on the same data and port.
        rig.database(port=urlsplit(uri).port)
        load.restarted.set()
        wait_for(lambda: len(load.created(after_restart=True)) >= 20, 60, "creates after restart")
    finally:
        load.finish()
    created = load.created()
    db = rig.mongo(uri)
    # Everything still due goes out before the dispatchers stop.
    done = drained(db, 20 + 40)
    service.stop()
    mail = delivery(db, created, received_in(mail_dir))
    stored = {
        str(user["_id"]): {str(n["id"]) for n in user.get("notifications", [])}
        for user in db.users.find()
    }
    lost_notifications = [
        a for a in created if a.body["data"]["notification_id"] not in stored.get(a.user_id, set())
    ]
    lost_records = mail.queued - sum(mail.statuses.values())
    row(
        f"2 database killed, round {round_}",
        f"SIGKILL after {killed_after} 201s, restart on its data",
        load.answers,
        mail,
        f"{in_flight} requests in flight at the kill; lost {len(lost_notifications)} "
        f"notifications, {lost_records} outbox records",
    )
    assert in_flight, "no request was in flight: the kill did not happen under load"
    # A database error of a write is at worst a retryable 503, never a 500 (a commit
    # whose answer was lost in the kill once answered 500 though it had committed).
    assert not [a for a in load.answers if a.status == 500], "a 500 under the kill"
    assert done, f"outbox not drained: {mail.statuses}"
    assert not lost_notifications and not lost_records
    assert not mail.lost and mail.duplicates == 0, mail


@pytest.mark.faults
def test_smtp_down_for_a_while_every_email_is_delivered_once(
    smtp_factory: Callable[..., SmtpServer], rig: Rig
) -> None:
    smtp = smtp_factory()
    _, uri = rig.database()
    _, url = rig.service(settings(uri, smtp.port, DISPATCHER_THREADS=2, **FAST_RETRY))
    db = rig.mongo(uri)
    first = call_all(emails([url], 20))
    smtp.wait_for_messages(20, timeout=60)
    smtp.stop()
    second = call_all(emails([url], 40))
    # The dispatchers found the port closed and keep the emails for a retry...
    wait_for(
        lambda: db.email_outbox.count_documents({"last_error.outage": True}) > 0,
        30,
        "a send to fail against the stopped server",
    )
    time.sleep(3.0)  # ...down for a while: several rounds of backoff
    smtp.start()  # the same port
    every_email_once_after_smtp(
        "3 SMTP down",
        "SMTP server stopped, started again on its port",
        "failed while it was down",
        db,
        first + second,
        smtp,
    )


@pytest.mark.faults
def test_a_hung_smtp_server_delays_every_email_but_loses_and_doubles_none(
    smtp_factory: Callable[..., SmtpServer], rig: Rig
) -> None:
    # Accepts connections (the kernel does) and never says a word.
    hung = socket.create_server(("127.0.0.1", 0))
    port = hung.getsockname()[1]
    try:
        _, uri = rig.database()
        _, url = rig.service(
            settings(
                uri,
                port,
                DISPATCHER_THREADS=2,
                SMTP_TIMEOUT=1,
                DISPATCH_LEASE_SECONDS=4,
                **FAST_RETRY,
            )
        )
        db = rig.mongo(uri)
        answers = call_all(emails([url], 30))
        # Both dispatcher threads gave up waiting and kept their emails for a retry.
        wait_for(
            lambda: db.email_outbox.count_documents({"last_error": {"$ne": None}}) >= 2,
            30,
            "sends to time out against the silent server",
        )
    finally:
        hung.close()  # resets the connections it never accepted
    every_email_once_after_smtp(
        "3 SMTP hung",
        "a server that accepts and never answers, then a real one on its port",
        "timed out or were cut",
        db,
        answers,
        smtp_factory(port=port),
    )


@pytest.mark.faults
def test_a_worker_killed_mid_batch_leaves_its_emails_to_the_next_after_the_lease(
    smtp_factory: Callable[..., SmtpServer], rig: Rig
) -> None:
    lease, threads = 5, 2
    smtp = smtp_factory()
    _, uri = rig.database()
    env = settings(
        uri, smtp.port, SMTP_TIMEOUT=1, DISPATCH_LEASE_SECONDS=lease, DISPATCH_BATCH_SIZE=50
    )
    _, url = rig.service({**env, "DISPATCHER_THREADS": "0"})  # the workers send
    db = rig.mongo(uri)
    answers = call_all(emails([url], 300))
    doomed = rig.worker({**env, "DISPATCHER_THREADS": str(threads)})
    wait_for(lambda: len(smtp.messages) >= 60, 60, "the worker's first sends")
    os.kill(doomed.process.pid, signal.SIGKILL)
    doomed.process.wait()
    sent_before = len(smtp.messages)
    # A write the worker sent just before it died (its sends recorded in the background)
    # is still applied by the database: the snapshot waits for it to land.
    time.sleep(1)
    # No other dispatcher runs yet: whatever is being sent is the dead worker's.
    held = [r["_id"] for r in db.email_outbox.find({"status": "sending"}, {"_id": 1})]
    rig.worker({**env, "DISPATCHER_THREADS": str(threads)})
    done = drained(db, lease + 60)
    mail = delivery(db, answers, received_by(smtp))
    taken_over = db.email_outbox.count_documents(
        {"_id": {"$in": held}, "status": "sent", "attempts": {"$gte": 2}}
    )
    bound = SENT_FLUSH * threads
    row(
        "4 worker killed",
        f"SIGKILL of a {threads}-thread worker after {sent_before} sends, a second worker",
        answers,
        mail,
        f"{len(held)} claims held at the kill, {taken_over} sent after the {lease} s lease; "
        f"duplicates bound {bound}",
    )
    assert [a.status for a in answers] == [202] * len(answers)
    assert held, "the worker held no claim when killed: it was not in a batch"
    assert done and not mail.lost, mail
    assert taken_over == len(held)
    assert mail.duplicates <= bound, mail


@pytest.mark.faults
def test_three_servers_and_three_workers_send_1000_emails_and_lose_none(rig: Rig) -> None:
    _, uri = rig.database()
    mail_dir, sink_port = rig.sink()
    env = settings(uri, sink_port, WEB_WORKERS=1)
    urls = [rig.service({**env, "DISPATCHER_THREADS": "0"})[1] for _ in range(3)]
    for _ in range(3):
        rig.worker({**env, "DISPATCHER_THREADS": "2"})
    answers = call_all(emails(urls, 1000), threads=12)
    db = rig.mongo(uri)
    done = drained(db, 180)
    mail = delivery(db, answers, received_in(mail_dir))
    row(
        "5 three servers, three workers",
        "none: one database, 2 dispatcher threads a worker",
        answers,
        mail,
        f"statuses {dict(mail.statuses)}",
    )
    assert [a.status for a in answers] == [202] * len(answers)
    assert done and not mail.lost, mail
    # Nothing failed, and the documented duplicates all need a failure.
    assert mail.duplicates == 0, mail
