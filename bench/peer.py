"""Section 9's peer: jingleMyBells/aceplace_test, the public Flask implementation of this
assignment that keeps its shape (notifications in an array of the user's document, /list
by query parameters) and runs as published. Its code stays out of this repository: cloned
at COMMIT into bench/.peer/ (git-ignored), or a copy named by PEER_DIR. It runs with the
service's Flask and pymongo; its two extensions go to bench/.peer/deps, not the venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness import Request
from pymongo import MongoClient

from notification_service import embedded
from notification_service.config import Config

REPO, COMMIT = "jingleMyBells/aceplace_test", "7a1de7507f49560c627cf7a6b1d61abc46af83dd"
DEPENDENCIES = ("Flask-PyMongo==2.3.0", "flask-mail==0.9.1")  # its requirements.txt's pins
CACHE = Path(__file__).resolve().parent / ".peer"
DATABASE = "aceplace_peer"  # its own, on the service's server: both name theirs `users`
KEPT, EMAIL = 10, "peer@example.com"  # KEPT: NOTIFICATIONS_MAX_COUNT's default
# Its requests for a user; bodies need a JSON content type. new_message sends no email.
REQUESTS: dict[str, Callable[[str], Request]] = {
    "GET /list": lambda u: ("GET", f"/list?user_id={u}&skip=0&limit={KEPT}", None),
    "POST /create": lambda u: ("POST", "/create", json.dumps(
        {"user_id": u, "key": "new_message", "data": {"text": "bench"}}).encode()),
}  # fmt: skip


def start_peer(db_uri: str, run_dir: Path, port: int) -> embedded.Child | str:
    """Serve the peer on `port` against `db_uri`'s server as `make run` serves the service
    (granian, its workers and threads); a string says why it can't be."""
    source, deps = Path(os.environ.get("PEER_DIR") or CACHE / "aceplace_test"), CACHE / "deps"
    steps = []
    if "PEER_DIR" not in os.environ:
        if not (source / ".git").is_dir():
            url = f"https://github.com/{REPO}"
            steps.append(["git", "clone", "--quiet", "--no-checkout", url, str(source)])
        steps.append(["git", "-C", str(source), "checkout", "--quiet", COMMIT])
    if not (deps / "flask_mail").is_dir():
        steps.append([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                      "--target", str(deps), *DEPENDENCIES])  # fmt: skip
    for argv in steps:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # fail, never ask for a password
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(argv[:4])}: {exc}"
        if done.returncode:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return f"{' '.join(argv[:4])}: {' '.join(last)} (PEER_DIR may name a copy)"
    if not (source / "app" / "__init__.py").is_file():
        return f"{source} holds no copy of {REPO}"
    config, log = Config(), run_dir / "peer.log"
    # Its own variables; record-only creates send nothing, mail would go to the discard port.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(deps)]),
           "DB_URI": peer_uri(db_uri), "EMAIL": EMAIL, "SMTP_HOST": "127.0.0.1",
           "SMTP_PORT": "9", "SMTP_EMAIL": EMAIL, "SMTP_NAME": "peer"}  # fmt: skip
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
    return child


def peer_uri(db_uri: str) -> str:  # the same server, the peer's own database
    return urlsplit(db_uri)._replace(path=f"/{DATABASE}").geturl()


def seed(db_uri: str, user_ids: list[str]) -> None:
    """Create `user_ids` as its /create would, each holding the KEPT notifications it keeps
    once in use. The index is ours: it finds users by `user_id` and creates none, so each
    request would scan the collection."""
    now = int(time.time())
    with MongoClient[dict[str, Any]](peer_uri(db_uri)) as client:
        users = client.get_default_database()["users"]
        users.create_index("user_id")
        users.insert_many({"user_id": user, "email": EMAIL, "notifications": [
            {"id": f"{user}{now - i}", "timestamp": now - i, "is_new": True, "user_id": user,
             "key": "new_message", "target_id": None, "data": {}} for i in range(KEPT)
        ]} for user in user_ids)  # fmt: skip
