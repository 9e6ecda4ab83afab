"""Development defaults for `make run`: an embedded database and a local SMTP sink.

The one way to start them, and the service and its workers, for `serve`, the tests and
the benchmarks alike. All run as separate processes. SecantusDB is GPL-2.0 and is only
ever started as a program (`secantusd-py`), never imported. Each child is tied to this
process: it gets SIGTERM if we die (Linux PR_SET_PDEATHSIG), and a pid file lets the
next start clean up whatever a crash left behind anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .storage.mongo_connector import connect

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a supervisor killed with SIGKILL must
    # not leave a database holding ./var/db's lock.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    pidfile: Path

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL the whole process group; always removes the pid file.

        The group sweep matters for the web server (granian): killing only its main
        process would leave a worker behind, still sending mail against a database that
        is about to stop.
        """
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of it
            self.process.wait()
        finally:
            self.pidfile.unlink(missing_ok=True)


def spawn(
    name: str,
    argv: Sequence[str],
    run_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Child:
    """Start `argv` in its own process group (Ctrl-C reaches only the supervisor, which
    then stops children in order) and record its pid under `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    pidfile = run_dir / f"{name}.pid"
    kill_stale(pidfile)
    process = subprocess.Popen(
        list(argv), process_group=0, preexec_fn=_die_with_parent, env=env, cwd=cwd
    )
    # What /proc shows, not argv: a script runs as "python3 script ...", and this is
    # what kill_stale compares against.
    pidfile.write_text(f"{process.pid}\n{_cmdline(process.pid) or ' '.join(argv)}\n")
    return Child(name, process, pidfile)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def kill_stale(pidfile: Path) -> None:
    """Stop a process a crashed run left behind, if it is still the one we started."""
    try:
        pid_text, _, command = pidfile.read_text().partition("\n")
        pid = int(pid_text)
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return
    cmdline = _cmdline(pid)
    if cmdline and cmdline == command.strip():
        log.warning("stopping %s (pid %d) left by an earlier run", pidfile.stem, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                time.sleep(0.1)
                if not alive(pid):
                    break
            else:
                os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until something accepts on host:port.

    :raise RuntimeError: the process exited or the port did not open in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"did not listen on {host}:{port} within {timeout:.0f}s")


def _start_listening(
    label: str, name: str, argv: Sequence[str], run_dir: Path, port: int, timeout: float
) -> Child:
    """Spawn `argv` and wait until it listens on `port`.

    :raise RuntimeError: naming `label`, after stopping what was started.
    """
    child = spawn(name, argv, run_dir)
    try:
        wait_for_port("127.0.0.1", port, child.process, timeout)
    except RuntimeError as exc:
        child.stop()
        raise RuntimeError(f"{label} {exc}") from None
    return child


def secantusd_command() -> str:
    """The `secantusd-py` program beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("secantusd-py")
    if beside.exists():
        return str(beside)
    found = shutil.which("secantusd-py")
    if found is None:
        raise RuntimeError(
            "DB_URI is unset and secantusd-py is not installed: "
            "pip install 'notification-service[embedded]' or set DB_URI"
        )
    return found


# How `make run` starts its database: one node that keeps what it acknowledged.
# - --sync-on-commit: fsync SecantusDB's journal at every commit, whatever the client
#   asked. Without it an unjournaled write may still sit in WiredTiger's log buffer
#   when it is acknowledged, and kill -9 of the database lost writes answered 201
#   (tests/test_faults.py; README "Guarantees"). The service's own writes ask for
#   j:true (mongo_connector.connect), which alone held in that test; the flag makes
#   every other writer (a shell, a script, an index build) durable too.
# - The oplog bounds (SecantusDB keeps 100,000 entries or an hour by default): nothing
#   here reads the oplog yet (no change streams), and 10 minutes are enough for a
#   change stream to resume. After 300,000 writes the data directory held 0.4 GB
#   against 1.2 GB with the defaults, at the same cost per write (docs/measurements-history.md).
DATABASE_FLAGS: tuple[str, ...] = (
    "--sync-on-commit",
    "--oplog-max-entries", "20000",
    "--oplog-retention-seconds", "600",
)  # fmt: skip
# One node: there is no other primary to fail over to, and SecantusDB's registry of
# retryable-write replies made every write several times dearer (docs/measurements-history.md).
DATABASE_URI_OPTIONS = "retryWrites=false"


def database_argv(data_dir: Path | None, port: int) -> list[str]:
    """The command line of the embedded database; tests and benchmarks use it too.

    `data_dir` None keeps the data in memory, as the tests do: DATABASE_FLAGS are then
    left out (there is no journal to sync, and the tests never ran with them).
    """
    return [
        secantusd_command(),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--storage-path", ":memory:" if data_dir is None else str(data_dir),
        "--log-level", "WARNING",
        *(() if data_dir is None else DATABASE_FLAGS),
    ]  # fmt: skip


def database_uri(port: int) -> str:
    """The DB_URI of the embedded database listening on `port`."""
    return f"mongodb://127.0.0.1:{port}/notifications?{DATABASE_URI_OPTIONS}"


def start_database(
    data_dir: Path | None,
    run_dir: Path,
    port: int | None = None,
    *,
    extra: Sequence[str] = (),
    name: str = "database",
) -> tuple[Child, str]:
    """Start SecantusDB keeping its data in `data_dir` (None: in memory); return it and
    its DB_URI once it answers a ping.

    `port` (default: a free one) lets a restart keep the address clients know; `extra`
    adds secantusd-py flags (--standalone, --enable-test-commands).
    """
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    child = _start_listening(
        "the embedded database (secantusd-py)",
        name,
        [*database_argv(data_dir, port), *extra],
        run_dir,
        port,
        60,
    )
    uri = database_uri(port)
    try:
        # Listening is not answering: a replica set elects itself primary first.
        client = connect(Config(db_uri=uri, db_timeout_ms=30_000))
        try:
            client.admin.command("ping")
        finally:
            client.close()
    except BaseException:
        child.stop()
        raise
    return child, uri


def start_mail_sink(mail_dir: Path, run_dir: Path, *, name: str = "mail-sink") -> tuple[Child, int]:
    """Start the SMTP sink that saves each message as a .eml file under `mail_dir`."""
    port = free_port()
    argv = [sys.executable, "-m", "notification_service", "sink",
            "--port", str(port), "--dir", str(mail_dir)]  # fmt: skip
    child = _start_listening("the mail sink", name, argv, run_dir, port, 30)
    return child, port


def _service_child(command: str, env: Mapping[str, str], run_dir: Path, name: str) -> Child:
    # Run from run_dir: a ./.env in the caller's directory must not configure it, and a
    # relative DATA_DIR (default "var") lands there.
    argv = [sys.executable, "-m", "notification_service", command]
    return spawn(name, argv, run_dir, {**os.environ, **env}, cwd=run_dir)


def _health(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
        return bool(response.status == 200)


def start_service(
    env: Mapping[str, str],
    run_dir: Path,
    *,
    port: int | None = None,
    name: str = "service",
    timeout: float = 60,
) -> tuple[Child, str]:
    """Start `python -m notification_service serve` (what `make run` runs) with
    os.environ, then `env`, then PORT; return it and its base URL once GET /health
    answers 200.

    :raise RuntimeError: it exited or did not answer in time, after stopping it.
    """
    port = port or free_port()
    child = _service_child("serve", {**env, "PORT": str(port)}, run_dir, name)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if _health(url):
                return child, url
        if child.process.poll() is not None or time.monotonic() > deadline:
            status = child.process.poll()
            child.stop()
            raise RuntimeError(
                f"the service exited with status {status} before answering"
                if status is not None
                else f"the service did not answer on {url} within {timeout:.0f}s"
            )
        time.sleep(0.1)


def start_worker(env: Mapping[str, str], run_dir: Path, *, name: str = "worker") -> Child:
    """Start `python -m notification_service worker` with os.environ, then `env`."""
    return _service_child("worker", env, run_dir, name)
