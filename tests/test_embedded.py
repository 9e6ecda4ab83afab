"""Child processes of `serve`: pid files, stale processes, process-group stops."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from notification_service.embedded import alive, kill_stale, spawn


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
