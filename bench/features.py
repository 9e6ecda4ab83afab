"""Section 11: what the features of issue 17 cost a create, side by side on one server.

One service, started with a KEYS_FILE of five keys that differ in one thing each, so
that each pair below is the same request but for the feature priced:

- `plain` (in_app, mandatory: no preference is read) against `chosen` (in_app, not
  mandatory: the user's preference is one more condition of the same update);
- `plain` against `plain` with a `collapse_key` (after each user's first, every create
  collapses into the unread one at the top: one update pipeline instead of `$push`);
- `unread` (in_app, email if unread: the digest is opened or joined, nothing is queued)
  against `always` (in_app, an email queued at once; both not mandatory).

Each side has its own users, seeded alike (50 notifications each). The goals are the
issue's: ≤ 1.1 for the first two in server CPU a request, ≤ 1 for the third.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import Request

S11 = "11. Features (issue 17)"
KEYS_FILE = """
[keys.plain]
in_app = true
email = "never"
mandatory = true

[keys.chosen]
in_app = true
email = "never"

[keys.unread]
in_app = true
email = "if_unread"
email_after_seconds = 3600

[keys.always]
in_app = true
email = "always"
"""
DATA = {"title": "A new message", "from": "Grace"}


def create(key: str, **extra: Any) -> Callable[[str, str], Request]:
    body = {"key": key, "data": DATA, **extra}
    return lambda u, _: ("POST", "/create", json.dumps({"user_id": u, **body}).encode())


# (name, the feature's side, the plain side, goal on server CPU a request)
PAIRS: list[tuple[str, tuple[str, Callable[[str, str], Request]],
                  tuple[str, Callable[[str, str], Request]], float]] = [
    ("a create checking preferences / a plain create",
     ("chosen", create("chosen")), ("plain", create("plain")), 1.1),
    ("a collapsing create / a plain create",
     ("collapsing", create("plain", collapse_key="thread")), ("plain", create("plain")), 1.1),
    ("an if_unread create / an always create",
     ("if_unread", create("unread")), ("always", create("always")), 1.0),
]  # fmt: skip


def env(tmp: Path) -> dict[str, str]:
    """The settings of section 11's server: its keys, and what a key that emails and is
    not mandatory needs (an unsubscribe link)."""
    path = tmp / "features-keys.toml"
    path.write_text(KEYS_FILE)
    return {
        "KEYS_FILE": str(path),
        "UNSUBSCRIBE_SECRET": "bench-unsubscribe-secret-" + "0" * 32,
        "PUBLIC_URL": "http://127.0.0.1",
    }
