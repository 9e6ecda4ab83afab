"""Section 9's peer: jingleMyBells/aceplace_test, the public Flask implementation of this
assignment that keeps its shape (notifications in an array of the user's document, /list
by query parameters) and runs as published. Its code stays out of this repository: cloned
at COMMIT into bench/.peer/ (git-ignored), or read from PEER_DIR. It runs with the
service's Flask and pymongo; its two extensions go to bench/.peer/deps, not the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pymongo import MongoClient

from notification_service import embedded
from notification_service.config import Config

NAME = "aceplace_test"
REPO = "jingleMyBells/aceplace_test"
COMMIT = "7a1de7507f49560c627cf7a6b1d61abc46af83dd"
# Pinned by its requirements.txt, beside Flask and gunicorn.
DEPENDENCIES = ("Flask-PyMongo==2.3.0", "flask-mail==0.9.1")
CACHE = Path(__file__).resolve().parent / ".peer"
# Its own database on the service's server: both name their collection `users`.
DATABASE = "aceplace_peer"
# What it keeps of each user's notifications (NOTIFICATIONS_MAX_COUNT's default).
KEPT = 10
EMAIL = "peer@example.com"

Request = tuple[str, str, bytes | None]


@dataclass
class Peer:
    name: str
    repo: str
    commit: str
    base_url: str
    child: embedded.Child
    # (method, path with query, JSON body) for a user id; bodies need a JSON content type.
    requests: dict[str, Callable[[str], Request]]


def start_peer(db_uri: str, run_dir: Path, port: int) -> Peer | str:
    """Serve the peer on `port` against `db_uri`'s server as `make run` serves the service
    (granian, its workers and threads); a string says why it can't be."""
    deps = CACHE / "deps"
    try:
        source = _source()
        if not all((deps / module).is_dir() for module in ("flask_pymongo", "flask_mail")):
            pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
            _run(
                f"pip install {' '.join(DEPENDENCIES)}",
                [*pip, "--target", str(deps), *DEPENDENCIES],
            )
    except RuntimeError as exc:
        return str(exc)
    config = Config()
    # Its own variables; record-only creates send nothing, mail would go to the discard port.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(deps)]),
           "DB_URI": peer_uri(db_uri), "EMAIL": EMAIL, "SMTP_HOST": "127.0.0.1",
           "SMTP_PORT": "9", "SMTP_EMAIL": EMAIL, "SMTP_NAME": "peer"}  # fmt: skip
    log = run_dir / "peer.log"
    # It logs every request at INFO (and /list at CRITICAL): kept, as it is part of its
    # cost, but written to a file as a container's log would be, not to the bench's output.
    argv = ["sh", "-c", f'exec "$0" "$@" >>"{log}" 2>&1', sys.executable, "-m", "granian",
            "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(config.web_workers), "--blocking-threads", str(config.web_threads),
            "--no-ws", "--log-level", "warning", "app:app"]  # fmt: skip
    child = embedded.spawn("peer", argv, run_dir, env)
    try:
        embedded.wait_for_port("127.0.0.1", port, child.process, 60)
    except RuntimeError as exc:
        child.stop()
        return f"{REPO} {exc} (see {log})"
    return Peer(NAME, REPO, COMMIT, f"http://127.0.0.1:{port}", child,
                {"/list": _list, "/create": _create})  # fmt: skip


def peer_uri(db_uri: str) -> str:  # the same server, the peer's own database
    return urlunsplit(urlsplit(db_uri)._replace(path=f"/{DATABASE}"))


def seed(db_uri: str, user_ids: list[str]) -> None:
    """Create `user_ids` as its /create would, each holding the KEPT notifications it keeps
    once in use. The index is ours: it finds users by `user_id` and creates none, so each
    request would scan the collection."""
    now = int(time.time())
    client: MongoClient[dict[str, Any]] = MongoClient(peer_uri(db_uri))
    with client:
        users = client.get_default_database()["users"]
        users.create_index("user_id")
        users.insert_many({"user_id": user, "email": EMAIL, "notifications": [
            {"id": f"{user}{now - i}", "timestamp": now - i, "is_new": True, "user_id": user,
             "key": "new_message", "target_id": None, "data": {}} for i in range(KEPT)
        ]} for user in user_ids)  # fmt: skip


def _list(user_id: str) -> Request:
    return "GET", f"/list?user_id={user_id}&skip=0&limit={KEPT}", None


def _create(user_id: str) -> Request:  # new_message: a record and no email
    body = {"user_id": user_id, "key": "new_message", "data": {"text": "bench"}}
    return "POST", "/create", json.dumps(body).encode()


def _source() -> Path:
    """The peer's code at COMMIT. :raise RuntimeError: saying why there is none."""
    given = os.environ.get("PEER_DIR")
    source = Path(given) if given else CACHE / NAME
    if not given and not (source / ".git").is_dir():
        shutil.rmtree(source, ignore_errors=True)  # what a failed clone left
        url = f"https://github.com/{REPO}"
        _run(f"git clone {url} (PEER_DIR may name a copy at {COMMIT})",
             ["git", "clone", "--quiet", "--no-checkout", url, str(source)])  # fmt: skip
    if not given:
        _run(f"git checkout {COMMIT}", ["git", "-C", str(source), "checkout", "--quiet", COMMIT])
    if not (source / "app" / "__init__.py").is_file():
        raise RuntimeError(f"{source} holds no copy of {REPO}")
    return source


def _run(what: str, argv: list[str]) -> None:
    """Run `argv`. :raise RuntimeError: naming `what`, with the last line it printed."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # fail, never ask for a password
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{what}: {exc}") from None
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"status {done.returncode}"]
        raise RuntimeError(f"{what}: {lines[-1]}")
