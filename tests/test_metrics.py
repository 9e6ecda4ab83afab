"""GET /metrics: counters by route and status, the outbox read at scrape time, the
dispatchers' figures, and one answer summed over every process of a deployment."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from conftest import DatabaseLink, free_port, runtime
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from smtp_fixtures import SmtpServer

from notification_service import metrics
from notification_service.__main__ import web_server_argv
from notification_service.config import Config
from notification_service.keys import KeySpec, KeyTable

KEY = "metrics-key-0123456789"
FAST_RETRY = {"dispatch_backoff_base_seconds": 0.01, "dispatch_backoff_max_seconds": 0.05}


class Scrape:
    """One parsed exposition: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a series not (yet) there, as Prometheus reads it."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _ in self.samples)

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for n, labels in self.samples if n == name}


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def scrape(client: FlaskClient, key: str | None = None) -> Scrape:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return Scrape(response.get_data(as_text=True))


# --- one process, the Flask app in-process ----------------------------------------


def test_metrics_need_the_api_key_when_keys_are_set(
    make_app: Callable[..., Flask], make_config: Callable[..., Config]
) -> None:
    client = make_app(make_config(api_keys=(KEY,))).test_client()
    assert client.get("/metrics").status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert client.get("/metrics", headers=wrong).status_code == 401
    assert scrape(client, KEY).value("notification_service_database_up") == 1


def test_notifications_created_are_counted_by_key(
    client: FlaskClient, make_user: Callable[..., str]
) -> None:
    alice, bob = make_user(), make_user()
    missing = "0123456789abcdef01234567"
    before = scrape(client)
    assert client.post("/create", json={"user_id": alice, "key": "new_post"}).status_code == 201
    fan_out = {"user_ids": [alice, bob, missing], "key": "new_message"}
    assert client.post("/create", json=fan_out).status_code == 201
    assert client.post("/create", json={"user_id": alice, "key": "nonsense"}).status_code == 422
    after = scrape(client)
    name = "notification_service_notifications_created_total"
    assert grew(before, after, name, key="new_post") == 1
    assert grew(before, after, name, key="new_message") == 2
    # Every key is there from the start, and nothing a caller sent became a label. (This
    # process's registry also holds the keys of other tests' tables.)
    labels = after.label_values(name, "key")
    assert {"registration", "new_message", "new_post", "new_login"} <= labels
    assert "nonsense" not in labels


def test_the_keys_of_the_apps_table_are_labels_from_the_start(
    make_app: Callable[..., Flask], make_config: Callable[..., Config]
) -> None:
    table = KeyTable([KeySpec("metrics_only_key", in_app=True, email="never")])
    client = make_app(make_config(keys=table)).test_client()
    after = scrape(client)
    name = "notification_service_notifications_created_total"
    assert "metrics_only_key" in after.label_values(name, "key")
    assert after.value(name, key="metrics_only_key") == 0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_outbox_gauges_are_read_from_the_database_at_each_scrape(app: Flask, db: Any) -> None:
    clock = Clock()
    services = runtime(app).services
    runtime(app).services = replace(services, clock=clock)
    client = app.test_client()
    empty = scrape(client)
    assert empty.value("notification_service_outbox_emails", status="queued") == 0
    assert empty.value("notification_service_outbox_oldest_due_seconds") == 0
    email = {"to": "someone@example.com", "subject": "s", "text": "t"}
    ids = []
    for _ in range(3):
        ids.append(client.post("/email", json=email).get_json()["data"]["email_id"])
        clock.now += timedelta(seconds=10)
    # The first one claimed by another process: the gauges read the database.
    db.email_outbox.update_one(
        {"_id": ObjectId(ids[0])}, {"$set": {"status": "sending", "claimed_by": "elsewhere"}}
    )
    clock.now += timedelta(seconds=2.5)
    figures = scrape(client)
    assert figures.value("notification_service_database_up") == 1
    assert figures.value("notification_service_outbox_emails", status="queued") == 2
    assert figures.value("notification_service_outbox_emails", status="sending") == 1
    # The oldest still queued was enqueued second: 10 + 10 + 2.5 seconds ago.
    assert figures.value("notification_service_outbox_oldest_due_seconds") == 22.5


def test_a_scrape_answers_with_database_up_0_when_the_database_link_is_cut(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    db_link: DatabaseLink,
    db_name: str,
) -> None:
    client = make_app(make_config(db_uri=db_link.uri(db_name), db_timeout_ms=3000)).test_client()
    assert scrape(client).value("notification_service_database_up") == 1
    db_link.cut()
    started = time.monotonic()
    down = scrape(client)
    took = time.monotonic() - started
    assert down.value("notification_service_database_up") == 0
    assert not down.has("notification_service_outbox_emails")  # unknown, not 0
    # The process's own figures are still there, the last scrape among them.
    assert down.value(
        "notification_service_http_requests_total", method="GET", route="/metrics", status="200"
    )
    assert took < 2.0, took


def test_unmatched_paths_and_unknown_methods_add_no_label_values(client: FlaskClient) -> None:
    before = scrape(client)
    hostile = [f"/{uuid.uuid4().hex}", "/%00%0a", "/" + "a" * 2000, "/email/../../etc/passwd"]
    for path in hostile:
        assert client.get(path).status_code == 404
    assert client.open("/health", method="BREW").status_code == 405
    assert client.get("/health").status_code == 200
    after = scrape(client)
    name = "notification_service_http_requests_total"
    assert grew(before, after, name, method="GET", route="unmatched", status="404") == len(hostile)
    assert grew(before, after, name, method="other", route="unmatched", status="405") == 1
    routes = after.label_values(name, "route")
    assert not any(path in routes for path in hostile)
    assert "BREW" not in after.label_values(name, "method")
    latency = "notification_service_http_request_duration_seconds_count"
    assert grew(before, after, latency, method="GET", route="/health") == 1


def test_invented_methods_and_paths_do_not_grow_the_request_series_cache(
    client: FlaskClient,
) -> None:
    # observe_request keeps each (method, route, status)'s series for reuse: a client
    # inventing methods or paths must not make it grow without bound.
    client.get("/health")
    client.get(f"/{uuid.uuid4().hex}")
    before = len(metrics._request_series)
    for n in range(200):
        assert client.open("/health", method=f"X{n}").status_code == 405
        assert client.get(f"/{uuid.uuid4().hex}/{n}").status_code == 404
        assert client.get("/health").status_code == 200
    assert len(metrics._request_series) == before


def test_the_apps_dispatcher_moves_the_email_and_smtp_metrics(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_factory: Callable[..., SmtpServer],
) -> None:
    flaky = smtp_factory(fail_first=1)  # the first attempt gets a 451: a retry
    refusing = smtp_factory(permanent_code=550)
    client = make_app(make_config()).test_client()
    before = scrape(client)
    sender = make_app(
        make_config(**flaky.config_kwargs(), dispatcher_threads=1, **FAST_RETRY)
    ).test_client()
    email = {"to": "someone@example.com", "subject": "s", "text": "t"}
    for _ in range(2):
        assert sender.post("/email", json=email).status_code == 202
    flaky.wait_for_messages(2, timeout=10)
    failing = make_app(make_config(**refusing.config_kwargs(), dispatcher_threads=1))
    assert failing.test_client().post("/email", json=email).status_code == 202
    name = "notification_service_emails_total"
    after = before
    # The SMTP server has the messages a moment before the dispatcher hears it did.
    deadline = time.monotonic() + 10
    while grew(before, after, name, outcome="sent") < 2 or not grew(
        before, after, name, outcome="failed"
    ):
        assert time.monotonic() < deadline, "the sends were not reported"
        time.sleep(0.05)
        after = scrape(client)
    assert grew(before, after, name, outcome="sent") == 2
    assert grew(before, after, name, outcome="retry") == 1
    assert grew(before, after, name, outcome="failed") == 1
    latency = "notification_service_smtp_send_duration_seconds"
    assert grew(before, after, f"{latency}_count", outcome="sent") == 2
    assert grew(before, after, f"{latency}_count", outcome="retry") == 1
    assert grew(before, after, f"{latency}_count", outcome="failed") == 1
    assert grew(before, after, f"{latency}_sum", outcome="sent") > 0
    batches = "notification_service_dispatcher_batch_size"
    assert grew(before, after, f"{batches}_count") >= 3  # the retry is claimed again
    assert grew(before, after, f"{batches}_sum") >= 4


# --- a deployment: granian's worker processes and a worker, one directory ------------


@dataclass
class Web:
    port: int
    process: subprocess.Popen[str]
    reader: threading.Thread

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        # A connection per request: granian's workers share the listening socket, so
        # new connections spread over them.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def scrape(self) -> Scrape:
        status, body = self.request("GET", "/metrics")
        assert status == 200, body
        return Scrape(body.decode())


@pytest.fixture
def start_web(db_uri: str) -> Iterator[Callable[..., Web]]:
    started: list[Web] = []

    def start(metrics_dir: Path, workers: int = 2) -> Web:
        port = free_port()
        config = replace(Config(), port=port, web_workers=workers)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DB_", "SMTP_", "API_", "PROMETHEUS_", "DISPATCH"))
        }
        env.update(
            DB_URI=db_uri,
            SMTP_HOST="127.0.0.1",  # never used: no dispatchers here
            DISPATCHER_THREADS="0",
            API_KEYS=KEY,
            LOG_LEVEL="WARNING",
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        )
        process = subprocess.Popen(
            web_server_argv(config),
            env=env,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        reader = threading.Thread(target=_echo_until_started, args=(process, workers, ready))
        reader.start()
        web = Web(port, process, reader)
        started.append(web)
        # Every worker, not only the first to answer: granian loses a SIGTERM that
        # reaches a worker still loading the app, and the stop then takes 30 s.
        assert ready.wait(60), "the web server's workers did not start"
        while web.request("GET", "/health")[0] != 200:
            time.sleep(0.1)
        return web

    yield start
    for web in started:
        web.process.terminate()
        web.process.wait(30)
        web.reader.join(5)
        assert web.process.stdout is not None
        web.process.stdout.close()


def _echo_until_started(
    process: subprocess.Popen[str], workers: int, ready: threading.Event
) -> None:
    """Pass the web server's lines on to stderr; set `ready` once every worker started."""
    assert process.stdout is not None
    started = 0
    for line in process.stdout:
        sys.stderr.write(line)
        started += "Started worker-" in line
        if started == workers:
            ready.set()


def test_every_web_worker_answers_for_the_requests_of_all(
    start_web: Callable[..., Web], tmp_path: Path
) -> None:
    (tmp_path / "metrics").mkdir()
    web = start_web(tmp_path / "metrics", workers=3)
    for _ in range(30):
        assert web.request("GET", f"/{uuid.uuid4().hex}")[0] == 404
    name = "notification_service_http_requests_total"
    # Whichever worker answers a scrape, it counts every worker's requests (the probes
    # of start-up included).
    for _ in range(5):
        assert web.scrape().value(name, method="GET", route="unmatched", status="404") == 30
    assert len(list((tmp_path / "metrics").glob("counter_*.db"))) > 1  # several processes


def test_a_worker_sharing_the_directory_shows_in_the_web_scrape(
    start_web: Callable[..., Web],
    tmp_path: Path,
    db_uri: str,
    db: Any,
    smtp_server: SmtpServer,
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    now = datetime.now(UTC)
    db.email_outbox.insert_many(
        [
            {"kind": "custom", "to": f"u{i}@example.com", "subject": f"n{i}", "text": "hi",
             "html": None, "message_id": f"<{i}.metrics@test>", "status": "queued",
             "attempts": 0, "created_at": now, "next_attempt_at": now, "last_error": None,
             "sent_at": None, "claimed_by": None}
            for i in range(3)
        ]
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SMTP_", "DISPATCH"))}
    env.update(
        smtp_server.env(),
        DB_URI=db_uri,
        LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "notification_service", "worker"], env=env, cwd="/"
    )
    try:
        smtp_server.wait_for_messages(3, timeout=20)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    web = start_web(metrics_dir)
    figures = web.scrape()
    # The worker has exited: its counts stay, summed with the web workers' own.
    assert figures.value("notification_service_emails_total", outcome="sent") == 3
    latency = "notification_service_smtp_send_duration_seconds_count"
    assert figures.value(latency, outcome="sent") == 3
    assert figures.value("notification_service_dispatcher_batch_size_sum") == 3
    assert figures.value("notification_service_outbox_emails", status="queued") == 0
