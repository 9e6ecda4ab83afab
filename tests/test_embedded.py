"""Child processes of `serve`: pid files, stale processes, process-group stops."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from pymongo import MongoClient

from notification_service.config import Config
from notification_service.embedded import (
    alive,
    database_uri,
    kill_stale,
    spawn,
    start_database,
    start_mail_sink,
    start_service,
    start_worker,
)
from notification_service.storage.mongo_connector import connect


def script(tmp_path: Path, body: str) -> Path:
    # Run through its shebang, as secantusd-py is: /proc then shows the interpreter first.
    path = tmp_path / "child.py"
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return path


def test_kill_stale_stops_what_an_earlier_run_left(tmp_path: Path) -> None:
    child = spawn("db", [str(script(tmp_path, "import time; time.sleep(60)"))], tmp_path)
    try:
        time.sleep(0.2)
        kill_stale(tmp_path / "db.pid")
        deadline = time.monotonic() + 10
        while child.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.process.poll() is not None
        assert not (tmp_path / "db.pid").exists()
    finally:
        child.stop()


def test_kill_stale_spares_a_process_that_reused_the_pid(tmp_path: Path) -> None:
    child = spawn("db", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path)
    try:
        pidfile = tmp_path / "db.pid"
        pidfile.write_text(f"{child.process.pid}\nsomething else entirely\n")
        kill_stale(pidfile)
        assert child.process.poll() is None
    finally:
        child.stop()


def test_stop_kills_the_whole_group_when_the_leader_lingers(tmp_path: Path) -> None:
    # A leader that ignores SIGTERM, with a child of its own (like gunicorn's workers).
    out = tmp_path / "grandchild.pid"
    leader = script(
        tmp_path,
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(out)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)",
    )
    child = spawn("web", [str(leader)], tmp_path / "run")
    deadline = time.monotonic() + 10
    while not (out.exists() and out.read_text()):
        assert time.monotonic() < deadline, "the leader did not start its child"
        time.sleep(0.05)
    grandchild = int(out.read_text())
    child.stop(timeout=0.5)
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)
    assert child.process.poll() is not None


def test_embedded_database_keeps_acknowledged_writes_across_kill_9(tmp_path: Path) -> None:
    child, uri = start_database(tmp_path / "db", tmp_path / "run")
    port = urlsplit(uri).port
    try:
        client = connect(Config(db_uri=uri))
        try:
            client.get_database().things.insert_many([{"_id": i} for i in range(20)])
        finally:
            client.close()
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.wait()
        # The same data on the same port: clients keep their DB_URI.
        child, again = start_database(tmp_path / "db", tmp_path / "run", port=port)
        assert again == uri
        with MongoClient(uri) as direct:
            assert direct.get_database().things.count_documents({}) == 20
    finally:
        child.stop()


def test_only_the_embedded_database_turns_retryable_writes_off() -> None:
    embedded = connect(Config(db_uri=database_uri(27017)))
    operators = connect(Config(db_uri="mongodb://db.example.com/notifications"))
    try:
        # One node has no other primary to fail over to; a deployment keeps the
        # driver's default unless its DB_URI says otherwise.
        assert embedded.options.retry_writes is False
        assert operators.options.retry_writes is True
        assert embedded.write_concern.document == {"w": "majority", "j": True}
    finally:
        embedded.close()
        operators.close()


USER = "638f394d4b7243fc0399ea67"


def group_gone(pgid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_service_and_worker_started_as_make_run_deliver_and_stop_completely(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    database, uri = start_database(None, run)
    sink, sink_port = start_mail_sink(tmp_path / "mail", run, name="sink")
    children = [database, sink]
    try:
        settings = {
            "DB_URI": uri, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(sink_port),
            "SMTP_SECURITY": "none", "EMAIL": "test@example.com", "WEB_WORKERS": "1",
            "DISPATCHER_THREADS": "0",  # only the worker sends
        }  # fmt: skip
        service, url = start_service(settings, run)
        children.append(service)
        assert (run / "service.pid").exists()
        create = urllib.request.Request(
            f"{url}/create",
            data=json.dumps({"user_id": USER, "key": "registration"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(create, timeout=10) as response:
            assert response.status == 201
        children.append(start_worker(settings, run))
        deadline = time.monotonic() + 30
        while not list((tmp_path / "mail").glob("*.eml")):
            assert time.monotonic() < deadline, "the worker sent nothing"
            time.sleep(0.1)
    finally:
        for child in reversed(children):
            child.stop()
    # granian's workers included: nothing of any group is left, nor any pid file.
    assert all(group_gone(child.process.pid) for child in children)
    assert list(run.glob("*.pid")) == []
