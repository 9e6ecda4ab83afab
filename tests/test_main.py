"""`serve` as `make run` uses it: embedded database and mail sink, clean stops, crashes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from bson import ObjectId
from conftest import MongoServer
from pymongo import MongoClient

from notification_service.__main__ import main
from notification_service.embedded import Child, alive, free_port, start_service

USER = "638f394d4b7243fc0399ea67"


def start_serve(data_dir: Path, **settings: str) -> tuple[Child, str]:
    """`serve` keeping its data in `data_dir`; without DB_URI and SMTP_HOST in `settings`
    it starts the embedded database and mail sink, as `make run` does."""
    env = {"DATA_DIR": str(data_dir), "EMAIL": "test@example.com", "WEB_WORKERS": "1",
           "DB_URI": "", "SMTP_HOST": ""} | settings  # fmt: skip
    return start_service(env, data_dir / "test-run")


def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def child_pids(data_dir: Path) -> list[int]:
    return [int(p.read_text().split()[0]) for p in (data_dir / "run").glob("*.pid")]


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def test_serve_runs_everything_and_ctrl_c_stops_it_all(tmp_path: Path) -> None:
    serve, url = start_serve(tmp_path)
    try:
        pids = child_pids(tmp_path)
        assert len(pids) == 3  # database, mail sink, web server
        status, body = call(url, "POST", "/create", {"user_id": USER, "key": "registration"})
        assert status == 201 and body["success"] is True
        deadline = time.monotonic() + 15
        while not list((tmp_path / "mail").glob("*.eml")):
            assert time.monotonic() < deadline, "no .eml file appeared"
            time.sleep(0.1)
        [eml] = (tmp_path / "mail").glob("*.eml")
        assert b"registration" in eml.read_bytes()
        serve.process.send_signal(signal.SIGINT)
        assert serve.process.wait(60) == 0
        wait_gone(pids)
        assert child_pids(tmp_path) == []
    finally:
        serve.stop()


def test_serve_starts_again_after_a_crash_and_keeps_data(tmp_path: Path) -> None:
    serve, url = start_serve(tmp_path)
    try:
        assert call(url, "POST", "/create", {"user_id": USER, "key": "new_post"})[0] == 201
        pids = child_pids(tmp_path)
        serve.process.kill()  # no chance to clean up: the children must not outlive it
        serve.process.wait()
        wait_gone(pids)
        serve, url = start_serve(tmp_path)
        status, body = call(url, "GET", f"/list?user_id={USER}")
        assert status == 200 and body["success"] is True
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(60) == 0
    finally:
        serve.stop()


def test_invalid_configuration_stops_the_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", "eighty")
    assert main(["check-config"]) == 2
    assert "PORT" in capsys.readouterr().err


def test_openapi_prints_the_committed_document_whatever_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", "eighty")  # not read: the default configuration's document
    assert main(["openapi"]) == 0
    committed = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
    assert json.loads(capsys.readouterr().out) == json.loads(committed.read_text())


def test_serve_with_database_and_smtp_settings_delivers_there(
    tmp_path: Path, db_uri: str, smtp_server: Any
) -> None:
    serve, url = start_serve(tmp_path, **smtp_server.env(), DB_URI=db_uri)
    try:
        assert not (tmp_path / "run").exists()  # nothing embedded was started
        assert call(url, "POST", "/create", {"user_id": USER, "key": "registration"})[0] == 201
        [received] = smtp_server.wait_for_messages(1, timeout=15)
        assert "registration" in received.message["Subject"]
        serve.process.send_signal(signal.SIGTERM)  # granian itself: serve exec'd it
        assert serve.process.wait(60) == 0
    finally:
        serve.stop()


# --- SIGTERM drains what is in flight -------------------------------------------------


class SlowSmtp:
    """An SMTP server that takes `delay` seconds to accept each message's data."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.data_started = threading.Event()
        self.accepted_at: list[float] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        await asyncio.sleep(self.delay)
        self.accepted_at.append(time.monotonic())
        return "250 2.0.0 OK queued"


@pytest.fixture
def failpoint_server() -> Iterator[MongoServer]:
    server = MongoServer.start("--enable-test-commands")
    yield server
    server.stop()


SEND_SECONDS = 3.0
REQUEST_BLOCK_MS = 2000


def test_sigterm_answers_the_request_in_flight_and_records_the_send_in_flight(
    tmp_path: Path, failpoint_server: MongoServer
) -> None:
    # As production runs it: DB_URI and SMTP_HOST set, so serve execs granian and the
    # SIGTERM goes to granian. A send is in the middle of its DATA and a request is
    # held in the database when it comes; both must finish, and the send be recorded.
    smtp = SlowSmtp(SEND_SECONDS)
    controller = Controller(smtp, hostname="127.0.0.1", port=free_port())
    controller.start()
    database = f"drain_{ObjectId()}"
    serve, url = start_serve(
        tmp_path, DB_URI=failpoint_server.uri(database), SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(controller.port), SMTP_SECURITY="none", DISPATCHER_THREADS="1",
    )  # fmt: skip
    answered: list[tuple[int, Any, float]] = []
    try:
        assert call(url, "POST", "/create", {"user_id": USER, "key": "registration"})[0] == 201
        assert smtp.data_started.wait(15), "the dispatcher did not start the send"
        with MongoClient(failpoint_server.uri("admin")) as admin:
            # The dispatcher is inside SMTP, not the database: the block is the request's.
            admin.admin.command(
                "configureFailPoint", "failCommand", mode={"times": 1},
                data={"failCommands": ["find", "aggregate"], "blockConnection": True,
                      "blockTimeMS": REQUEST_BLOCK_MS},
            )  # fmt: skip

        def count() -> None:
            status, body = call(url, "GET", f"/count?user_id={USER}")
            answered.append((status, body, time.monotonic()))

        request = threading.Thread(target=count)
        request.start()
        time.sleep(0.5)
        terminated = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(60) == 0
        exited = time.monotonic()
        request.join(10)
    finally:
        serve.stop()
        controller.stop()
    [(status, body, answered_at)] = answered
    assert status == 200 and body["success"] is True
    assert answered_at > terminated  # it was in flight, and answered all the same
    [accepted_at] = smtp.accepted_at
    assert accepted_at > terminated  # the send too
    # Nothing waited for a timeout: the process left once both were done.
    assert exited - terminated < SEND_SECONDS + 5
    with MongoClient(failpoint_server.uri(database)) as client:
        [record] = client[database].email_outbox.find({}, {"status": 1, "attempts": 1})
    assert (record["status"], record["attempts"]) == ("sent", 1)


@pytest.mark.parametrize("command", ["serve", "check-config", "worker"])
def test_every_entry_point_refuses_to_listen_beyond_loopback_without_a_key(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: str,
) -> None:
    # Before: serve printed one warning and served wide open, and POST /email relayed
    # any text to any address.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("DB_URI", "mongodb://127.0.0.1:1/app")
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert "API_KEYS" in err and "ALLOW_UNAUTHENTICATED" in err


# --- what serve prints, and what it prepares for the web server ---------------------

TEXT_LINE_RE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (?P<logger>[\w.]+): (?P<msg>\S.*)\n"
)


def run_serve_and_stop(env: dict[str, str], cwd: Path, port: int, smtp_server: Any) -> list[str]:
    """Start `serve`, create a notification and wait for its email, stop it with
    SIGTERM; return every line it printed, on stdout and stderr."""
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "notification_service", "serve"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        readers = [
            threading.Thread(target=lambda stream=stream: lines.extend(stream))
            for stream in (process.stdout, process.stderr)
        ]
        for reader in readers:
            reader.start()
        try:
            # Every worker loaded (granian loses a SIGTERM that reaches one still
            # loading); it listened before it started them.
            deadline = time.monotonic() + 60
            while not any("Started worker-2" in line for line in lines):
                assert process.poll() is None, "serve exited"
                assert time.monotonic() < deadline, "the second web worker did not start"
                time.sleep(0.1)
            url = f"http://127.0.0.1:{port}"
            assert call(url, "POST", "/create", {"user_id": USER, "key": "registration"})[0] == 201
            smtp_server.wait_for_messages(1, timeout=15)
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                process.kill()
            for reader in readers:
                reader.join(10)
    return lines


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_every_line_serve_prints_is_in_log_format_granians_own_included(
    tmp_path: Path, db_uri: str, smtp_server: Any, log_format: str
) -> None:
    port = free_port()
    env = {**os.environ, **smtp_server.env(), "PORT": str(port), "DB_URI": db_uri,
           "EMAIL": "test@example.com", "WEB_WORKERS": "2", "LOG_LEVEL": "INFO",
           "LOG_FORMAT": log_format}  # fmt: skip
    lines = run_serve_and_stop(env, tmp_path, port, smtp_server)
    said: list[tuple[str, str]] = []
    for line in lines:
        if log_format == "json":
            record = json.loads(line)
        else:
            match = TEXT_LINE_RE.fullmatch(line)
            assert match, line
            record = match.groupdict()
        said.append((record["logger"], record["msg"]))
    # granian's own lines (its workers log as `_granian.serve`), serve's, the app's.
    for logger, start in [
        ("_granian", "Starting granian"),
        ("_granian", "Started worker-2"),
        ("_granian", "Granian shutdown completed"),
        ("notification_service", "serving on http://"),
        ("notification_service.access", ""),
        ("notification_service.dispatcher", "started 1 dispatcher thread(s)"),
    ]:
        assert any(
            (n == logger or n.startswith(f"{logger}.")) and m.startswith(start) for n, m in said
        ), (logger, start, said)


def test_serve_gives_its_web_server_an_emptied_metrics_directory(tmp_path: Path) -> None:
    # What an earlier run left (here not even a valid file) must not be summed in.
    stale = tmp_path / "run" / "metrics" / "counter_1.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an earlier run")
    serve, url = start_serve(tmp_path)
    try:
        assert not stale.exists()
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert "notification_service_http_requests_total" in text
        assert "notification_service_database_up 1.0" in text
        serve.process.send_signal(signal.SIGINT)
        assert serve.process.wait(60) == 0
    finally:
        serve.stop()


# --- a production start's run directory ---------------------------------------------


def test_each_production_start_on_a_port_reuses_one_emptied_run_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: every start left a notification-service-* directory behind (38 were found).
    from notification_service.__main__ import production_run_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = production_run_dir(5123)
    (first / "left-over").write_text("x")
    again = production_run_dir(5123)
    assert again == first == tmp_path / "notification-service-5123"
    assert list(again.iterdir()) == []
    assert again.stat().st_mode & 0o777 == 0o700
    assert production_run_dir(5124) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notification-service-5123",
        "notification-service-5124",
    ]


def test_a_run_directory_path_that_is_a_link_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from notification_service.__main__ import production_run_dir
    from notification_service.config import ConfigError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    (tmp_path / "notification-service-5125").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="PORT: "):
        production_run_dir(5125)
    assert (elsewhere / "keep").exists()
