"""Log lines: one JSON access line per request, JSON for the rest, text on demand.

Every test reads what the real formatter wrote: a handler from `logs.make_handler` on
the root logger, writing to a StringIO.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from bson import ObjectId
from flask import Flask

from notification_service import logs
from notification_service.__main__ import log_config_for, main
from notification_service.config import Config, Secret
from notification_service.context import ENVIRON_KEY, RequestContext
from notification_service.unsubscribe import make_token

KEY = "k3y-0f-at-least-16-chars"
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ACCESS_KEYS = [
    "ts", "level", "logger", "msg", "method", "route", "path", "status", "duration_ms",
    "request_id",
]  # fmt: skip


class Captured:
    def __init__(self, log_format: str) -> None:
        self.stream = io.StringIO()
        self.handler = logs.make_handler(log_format, self.stream)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[str]:
        return self.text.splitlines()

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    def access(self) -> list[dict[str, Any]]:
        return [d for d in self.json() if d["logger"] == logs.ACCESS_LOGGER]


@pytest.fixture
def capture() -> Iterator[Callable[[str], Captured]]:
    """Attach a handler with the real formatter (json or text) to the root logger."""
    root = logging.getLogger()
    handlers: list[logging.Handler] = []

    def attach(log_format: str = "json") -> Captured:
        captured = Captured(log_format)
        root.addHandler(captured.handler)
        handlers.append(captured.handler)
        return captured

    yield attach
    for handler in handlers:
        root.removeHandler(handler)


# --- the access line ---------------------------------------------------------------


def test_one_access_line_per_request_with_its_fields(
    app: Flask, capture: Callable[[str], Captured], user_id: str
) -> None:
    out = capture("json")
    client = app.test_client()
    email_id = str(ObjectId())
    responses = [
        client.get("/health?token=s3cr3t-in-the-query"),
        client.post("/create", json={"user_id": user_id, "key": "new_post"}),
        client.get(f"/list?user_id={user_id}&limit=7"),
        client.get(f"/email/{email_id}"),
        client.get("/no-such-route?x=1"),
    ]
    lines = out.access()
    assert len(lines) == len(responses)
    for line, response in zip(lines, responses, strict=True):
        assert list(line) == ACCESS_KEYS
        assert TS_RE.fullmatch(line["ts"])
        assert (line["level"], line["msg"]) == ("INFO", "request")
        assert line["status"] == response.status_code
        assert line["request_id"] == response.headers["X-Request-ID"]
        assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 10_000
    seen = [(d["method"], d["route"], d["path"], d["status"]) for d in lines]
    assert seen == [
        ("GET", "/health", "/health", 200),
        ("POST", "/create", "/create", 201),
        ("GET", "/list", "/list", 200),
        ("GET", "/email/<email_id>", f"/email/{email_id}", 404),
        ("GET", None, "/no-such-route", 404),
    ]
    for query in ("s3cr3t", "token", "user_id", "limit", "x=1", "?"):
        assert query not in out.text
    assert "new_post" not in out.text  # no body


def test_a_refused_key_is_logged_without_the_authorization_header(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    capture: Callable[[str], Captured],
) -> None:
    client = make_app(make_config(api_keys=(KEY,))).test_client()
    out = capture("json")
    wrong = "wrong-key-but-still-a-secret"
    refused = client.get("/list?user_id=x", headers={"Authorization": f"Bearer {wrong}"})
    accepted = client.get(f"/email/{ObjectId()}", headers={"Authorization": f"Bearer {KEY}"})
    assert (refused.status_code, accepted.status_code) == (401, 404)
    assert [(d["route"], d["status"]) for d in out.access()] == [
        ("/list", 401),
        ("/email/<email_id>", 404),
    ]
    for secret in (wrong, KEY, "Bearer", "Authorization", "authorization"):
        assert secret not in out.text


def test_duration_counts_from_the_edge_when_it_stamped_the_request(
    app: Flask, capture: Callable[[str], Captured]
) -> None:
    out = capture("json")
    client = app.test_client()
    edge = RequestContext(received_at=time.monotonic() - 2.0)
    client.get("/health", environ_overrides={ENVIRON_KEY: edge})
    client.get("/health")
    waited, direct = (d["duration_ms"] for d in out.access())
    assert waited >= 2000
    assert direct < 2000


def test_an_unexpected_error_logs_its_traceback_in_exc_with_the_request_id(
    app: Flask, capture: Callable[[str], Captured]
) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_url_rule("/boom", view_func=boom)
    out = capture("json")
    response = app.test_client().get("/boom", headers={"X-Request-ID": "req-123"})
    assert response.status_code == 500
    error, access = out.json()
    assert error["level"] == "ERROR" and error["logger"] == "notification_service.server"
    assert error["request_id"] == "req-123"
    assert "Traceback" in error["exc"] and "RuntimeError: secret internals" in error["exc"]
    assert (access["route"], access["status"], access["request_id"]) == ("/boom", 500, "req-123")


def test_a_line_outside_a_request_has_no_request_id_and_exc_only_with_an_error(
    capture: Callable[[str], Captured],
) -> None:
    out = capture("json")
    log = logging.getLogger("notification_service.dispatcher")
    log.warning('plain "quoted"\nline')
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")
    plain, failed = out.json()
    assert list(plain) == ["ts", "level", "logger", "msg"]
    assert plain["msg"] == 'plain "quoted"\nline' and plain["level"] == "WARNING"
    assert list(failed) == ["ts", "level", "logger", "msg", "exc"]
    assert failed["exc"].endswith("ValueError: bad")
    assert len(out.lines()) == 2


# --- hostile input -----------------------------------------------------------------


def _one_clean_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, lines
    # Printable ASCII only: nothing for a terminal to interpret, no line separator.
    assert all(" " <= c <= "~" for c in lines[0]), lines[0]
    return lines[0]


def test_a_hostile_path_cannot_break_or_forge_a_json_line(
    app: Flask, capture: Callable[[str], Captured]
) -> None:
    client = app.test_client()
    out = capture("json")
    client.get('/nope%0a{"level":"CRITICAL"}')
    line = json.loads(_one_clean_line(out.text))
    assert line["level"] == "INFO" and line["status"] == 404
    assert line["path"] == '/nope\n{"level":"CRITICAL"}'

    raw = '/x\x1b[2J\r\n\x00\x7f\x85"}\u2028\u2029é'
    out = capture("json")
    # As a server hands it over: the UTF-8 bytes seen as latin-1 (PEP 3333).
    client.get("/", environ_overrides={"PATH_INFO": raw.encode().decode("latin-1")})
    access = [line for line in out.lines() if logs.ACCESS_LOGGER in line]
    assert json.loads(_one_clean_line("\n".join(access)))["path"] == raw


def test_text_format_is_plain_and_escapes_a_hostile_path(
    app: Flask, capture: Callable[[str], Captured]
) -> None:
    client = app.test_client()
    out = capture("text")
    response = client.get("/health?secret=1")
    line = _one_clean_line(out.text)
    assert not line.startswith("{")
    assert line.endswith(
        f" INFO notification_service.access: GET /health 200 "
        f"{line.split(' 200 ')[1].split(' ')[0]} ms "
        f"request_id={response.headers['X-Request-ID']}"
    )
    assert "secret" not in line

    out = capture("text")
    client.get("/", environ_overrides={"PATH_INFO": "/a\n2024-01-01 CRITICAL forged\x1b[31m"})
    access = [line for line in out.lines() if logs.ACCESS_LOGGER in line]
    assert "GET /a\\x0a2024-01-01 CRITICAL forged\\x1b[31m 404" in _one_clean_line(
        "\n".join(access)
    )

    out = capture("text")
    logging.getLogger("notification_service").warning("hello %s", "world")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING notification_service: hello world",
        out.text.strip(),
    )


# --- configuration -----------------------------------------------------------------


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_notification_service", 0)]


def test_configure_is_idempotent_and_follows_log_format_and_level(
    make_app: Callable[..., Flask], config: Config
) -> None:
    make_app(config)
    make_app(config)
    (handler,) = _ours()
    assert isinstance(handler.formatter, logs.JsonFormatter)
    make_app(replace(config, log_format="text", log_level="WARNING"))
    (handler,) = _ours()
    assert isinstance(handler.formatter, logs.TextFormatter)
    assert logging.getLogger().level == logging.WARNING
    logs.configure(config)
    (handler,) = _ours()
    assert isinstance(handler.formatter, logs.JsonFormatter)
    assert logging.getLogger().level == logging.INFO


def test_the_command_line_configures_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "text")
    assert main(["check-config"]) == 0
    (handler,) = _ours()
    assert isinstance(handler.formatter, logs.TextFormatter)
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert main(["check-config"]) == 0
    (handler,) = _ours()
    assert isinstance(handler.formatter, logs.JsonFormatter)


@pytest.mark.parametrize(
    ("env", "command", "expected"),
    [
        ({}, "serve", "text"),  # make run: a terminal
        ({}, "sink", "text"),
        ({"DB_URI": "mongodb://db/app"}, "serve", None),  # json
        ({}, "worker", None),
        ({"LOG_FORMAT": "json"}, "serve", "json"),  # the variable wins
        ({"LOG_FORMAT": "text", "DB_URI": "mongodb://db/app"}, "serve", "text"),
    ],
)
def test_make_run_defaults_to_text_and_the_variable_wins(
    env: dict[str, str], command: str, expected: str | None
) -> None:
    config = Config.from_env({**env, "DEV_MAIL_SINK": "true"})
    assert log_config_for(config, command).log_format == expected


def test_an_unsubscribe_links_token_is_not_in_the_access_line(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    capture: Callable[[str], Captured],
    user_id: str,
) -> None:
    # The token is the link's credential (anyone who reads it can turn the user's email
    # off and on again): the line names the route, never the token itself.
    secret = "unsubscribe-secret-of-at-least-32-bytes!"
    config = make_config(unsubscribe_secret=Secret(secret), public_url="https://n.example.com")
    client = make_app(config).test_client()
    token = make_token(secret.encode(), user_id, "new_post")
    out = capture("json")
    responses = [
        client.get(f"/unsubscribe/{token}"),
        client.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"}),
        client.get(f"/unsubscribe/{token}/more"),  # no route: still the token
    ]
    assert [r.status_code for r in responses] == [200, 200, 404]
    lines = out.access()
    assert [(d["route"], d["status"]) for d in lines] == [
        ("/unsubscribe/<token>", 200),
        ("/unsubscribe/<token>", 200),
        (None, 404),
    ]
    signature = token.rsplit(".", 1)[1]
    assert signature not in out.text
    assert [d["path"] for d in lines] == ["/unsubscribe/<redacted>"] * 3
