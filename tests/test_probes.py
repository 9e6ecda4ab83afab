"""The probes a load balancer or an orchestrator calls: /health (the process) and
/ready (the database answers; the outbox's depth and wait)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from conftest import DatabaseLink
from flask import Flask

from notification_service.config import Config
from notification_service.server import runtime_of

KEY = "k" * 32


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_ready_reports_the_outbox_depth_and_the_oldest_wait(app: Flask) -> None:
    clock = Clock()
    runtime = runtime_of(app)
    runtime.services = replace(runtime.services, clock=clock)
    client = app.test_client()
    empty = client.get("/ready")
    assert empty.status_code == 200
    assert empty.get_json()["data"] == {
        "status": "ready",
        "outbox": {"queued": 0, "sending": 0, "scheduled": 0, "oldest_due_seconds": None},
    }
    email = {"to": "someone@example.com", "subject": "s", "text": "t"}
    assert client.post("/email", json=email).status_code == 202
    clock.now += timedelta(seconds=30)
    assert client.post("/email", json=email).status_code == 202
    clock.now += timedelta(seconds=12.5)
    outbox = client.get("/ready").get_json()["data"]["outbox"]
    assert outbox == {"queued": 2, "sending": 0, "scheduled": 0, "oldest_due_seconds": 42.5}


def test_probes_need_no_api_key(
    make_app: Callable[..., Flask], make_config: Callable[..., Config]
) -> None:
    client = make_app(make_config(api_keys=(KEY,))).test_client()
    assert client.get("/ready").status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/count?user_id=0123456789abcdef01234567").status_code == 401


def test_ready_is_503_within_a_second_when_the_database_does_not_answer(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    db_link: DatabaseLink,
    db_name: str,
) -> None:
    # A 3 s budget for ordinary requests; the probe has its own second.
    client = make_app(make_config(db_uri=db_link.uri(db_name), db_timeout_ms=3000)).test_client()
    assert client.get("/ready").status_code == 200
    db_link.cut()
    started = time.monotonic()
    response = client.get("/ready")
    took = time.monotonic() - started
    assert response.status_code == 503
    body: Any = response.get_json()
    assert body["error"]["code"] == "database_unavailable"
    assert response.headers["Retry-After"]
    assert took < 2.0, took
    assert client.get("/health").status_code == 200  # the process itself is fine
