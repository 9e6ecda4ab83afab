"""smtp_sink: the development SMTP server that saves each message as a .eml file."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from notification_service.email_sender import (
    OutgoingEmail,
    SmtpSender,
    SmtpSettings,
    build_message,
)
from notification_service.embedded import free_port
from notification_service.smtp_sink import start_sink, write_eml

NAME_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}\.eml")


def email(n: int = 1) -> EmailMessage:
    return build_message(
        OutgoingEmail(
            to="user@example.com",
            subject=f"Notification {n}: Grüße",
            text=f"Body {n}\n",
            html=None,
            message_id=f"<sink-{n}@example.com>",
        ),
        from_email="notifications@example.com",
        from_name="Notifier",
    )


def sender_for(port: int) -> SmtpSender:
    return SmtpSender(
        SmtpSettings(
            host="127.0.0.1",
            port=port,
            login=None,
            password=None,
            security="none",
            verify=True,
            ca_file=None,
            timeout=5.0,
            max_per_connection=100,
            from_email="notifications@example.com",
        )
    )


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    controller = start_sink("127.0.0.1", port, tmp_path / "mail")
    yield port, tmp_path / "mail"
    controller.stop()


def test_each_message_is_saved_as_an_eml_file(sink: tuple[int, Path]) -> None:
    port, directory = sink
    message = email()
    with sender_for(port) as sender:
        sender.send(message)

    (path,) = directory.iterdir()  # no temporary file left behind
    assert NAME_RE.fullmatch(path.name)
    assert path.read_bytes() == message.as_bytes(policy=policy.SMTP)
    saved = message_from_bytes(path.read_bytes(), policy=policy.default)
    assert saved["Subject"] == "Notification 1: Grüße"
    assert saved["Message-ID"] == "<sink-1@example.com>"


def test_file_names_sort_in_order_of_arrival(sink: tuple[int, Path]) -> None:
    port, directory = sink
    with sender_for(port) as sender:
        for n in range(1, 6):
            sender.send(email(n))

    paths = sorted(directory.glob("*.eml"))
    ids = [message_from_bytes(p.read_bytes(), policy=policy.default)["Message-ID"] for p in paths]
    assert ids == [f"<sink-{n}@example.com>" for n in range(1, 6)]


def test_same_instant_gives_distinct_names(tmp_path: Path) -> None:
    now = datetime(2026, 11, 28, 5, 13, 0, 123456, tzinfo=UTC)
    first = write_eml(tmp_path, b"Subject: a\r\n\r\na\r\n", now=now)
    second = write_eml(tmp_path, b"Subject: b\r\n\r\nb\r\n", now=now)
    assert first != second
    assert first.name.startswith("20261128T051300.123456Z-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])
    assert second.read_bytes() == b"Subject: b\r\n\r\nb\r\n"


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the sink exited early"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"the sink did not listen on {port} within {timeout}s")


def test_serve_sink_saves_mail_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    directory = tmp_path / "new" / "mail"  # created by the sink
    code = (
        "import logging, sys; from pathlib import Path;"
        "from notification_service.smtp_sink import serve_sink;"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr);"
        f"serve_sink('127.0.0.1', {port}, Path({str(directory)!r}))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port, process)
        with sender_for(port) as sender:
            sender.send(email())
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    (path,) = directory.glob("*.eml")
    assert str(path) in stderr.decode()
    assert b"Message-ID: <sink-1@example.com>" in path.read_bytes()
