"""The local development SMTP sink: a real SMTP server that keeps each message as a .eml file.

`make run` points the service at it when SMTP_HOST is not set, so the whole path
(outbox, dispatcher, SMTP) runs without a mail provider. Open the files with any mail
client, or read them as text.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from aiosmtpd.controller import Controller

log = logging.getLogger(__name__)


class EmlDirectoryHandler:
    """aiosmtpd handler that writes each message it receives to `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        data = content if isinstance(content, bytes) else str(content).encode("utf-8")
        path = write_eml(self.directory, data)
        log.info(
            "SMTP sink: message from %s to %s saved as %s",
            envelope.mail_from,
            ", ".join(envelope.rcpt_tos),
            path,
        )
        return "250 2.0.0 Message accepted"


def write_eml(directory: Path, data: bytes, *, now: datetime | None = None) -> Path:
    """Write `data` to a new file in `directory` atomically; return its path.

    Names sort by arrival time (to the microsecond) and a random suffix keeps them
    unique; readers never see a partial file, because it appears by rename.
    """
    now = now or datetime.now(UTC)
    name = f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(4)}.eml"
    path = directory / name
    # A dot-name is not *.eml, so a reader globbing for messages skips it.
    temp = directory / f".{name}.tmp"
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def start_sink(host: str, port: int, directory: Path) -> Controller:
    """Start the sink in a background thread and return its controller (call `.stop()`).

    `port` must be a real port: the controller connects to itself to check that it
    is up, so port 0 does not work; use `free_port()`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        EmlDirectoryHandler(directory),
        hostname=host,
        port=port,
        # Otherwise aiosmtpd calls socket.getfqdn() (DNS) for every connection.
        server_hostname="localhost",
    )
    try:
        controller.start()
    except BaseException:
        # A failed start (port taken, say) leaves aiosmtpd's event loop open.
        with contextlib.suppress(Exception):
            controller.stop(no_assert=True)
        if not controller.loop.is_closed():
            controller.loop.close()
        raise
    log.info("SMTP sink listening on %s:%d, saving messages to %s", host, port, directory)
    return controller


def serve_sink(host: str, port: int, directory: Path) -> None:
    """Run the sink until SIGINT or SIGTERM. Call from the main thread (signal handlers)."""
    stop = threading.Event()
    # aiosmtpd logs every connection at INFO; the sink's own line per message is enough.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        controller = start_sink(host, port, directory)
        try:
            stop.wait()
        finally:
            controller.stop()
            log.info("SMTP sink stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
