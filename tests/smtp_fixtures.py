"""Real SMTP servers for tests: aiosmtpd on free localhost ports, recording what they get.

A pytest plugin: load it with ``pytest_plugins = ("smtp_fixtures",)``.

Fixtures
--------
``smtp_ca -> Path``
    PEM file of the session's test CA (trustme). A client trusts the TLS servers
    below by passing it as ``ca_file`` / ``SMTP_CA_FILE``; without it, verification
    fails as it would against any self-signed server.
``smtp_factory(**options) -> SmtpServer``
    Start a new server; every server it made is stopped at teardown. Options:

    - ``tls``: ``"none"`` (default), ``"starttls"`` (offered, not required) or
      ``"implicit"`` (TLS from the first byte, like port 465).
    - ``auth``: offer AUTH PLAIN/LOGIN and refuse MAIL before it (530). The
      credentials are ``SMTP_USER`` / ``SMTP_PASSWORD``. On a ``"starttls"`` server
      AUTH is offered only after STARTTLS. ``password`` replaces the password.
    - ``fail_first`` (0) and ``fail_code`` (451): the first N transactions are
      answered with ``fail_code`` at ``fail_at`` (``"DATA"``, the final reply after
      the content, or ``"RCPT"``), then accepted.
    - ``permanent_code`` (None): once ``fail_first`` is used up, every transaction
      is refused with this code (e.g. 550) at ``fail_at``.
    - ``port``: listen on this port instead of a free one.
    - ``host``: listen on this address instead of 127.0.0.1 (another address of this
      machine, say, to be a server that is not on loopback).
    - ``server_context``: the server's ssl.SSLContext, e.g. with a certificate from
      ``smtp_trustme_ca`` for another host name. Default: a certificate of the test
      CA for localhost, 127.0.0.1 and ::1.
``smtp_trustme_ca -> trustme.CA``
    The session's test CA, to issue other certificates.
``smtp_server -> SmtpServer``
    A started plain server: no TLS, no AUTH, accepts everything.

SmtpServer
----------
``host``, ``port``, ``tls``, ``auth``, ``ca_file``
``messages -> list[ReceivedMessage]``: a snapshot, in order of arrival.
``connections -> int``: client connections accepted (over restarts).
``quits -> int``: QUIT commands received.
``received -> bytes``: every byte clients sent, in order of arrival over all
connections (decrypted after STARTTLS): commands, AUTH exchanges and message data.
``wait_for_messages(n, timeout=5.0) -> list[ReceivedMessage]``: block until ``n`` arrived.
``stop()``, ``start()``, ``restart()``: stop closes every client connection and the
listener; start listens again on the SAME port ("SMTP down, then up"). Records are kept.
``drop_connections(reply=None)``: close every open client connection from the server
side, as an idle timeout does; with ``reply`` (e.g. ``"421 4.4.2 Idle timeout"``, as
Postfix says) send that line first. The server keeps listening.
``fail_remaining``, ``fail_code``, ``fail_at``, ``permanent_code``: the script, which a
test may change between sends (e.g. ``server.fail_remaining = 2``).
``clear()``: forget messages and counters.
``config_kwargs() -> dict``: Config fields (smtp_host, smtp_port, smtp_security, and
smtp_ca_file / smtp_login / smtp_password as needed) to reach this server.
``env() -> dict[str, str]``: the same as SMTP_* environment variables.

ReceivedMessage
---------------
``mail_from``, ``rcpt_tos``, ``data`` (bytes as received, dot-unstuffed), ``message``
(parsed ``EmailMessage``), ``tls`` (whether the connection was encrypted), ``login``
(the authenticated user or None), ``connection`` (1-based number of the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, cast

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from notification_service.embedded import free_port

SMTP_USER = "mailer"
SMTP_PASSWORD = "s3cret-password"
HOST = "127.0.0.1"

Tls = Literal["none", "starttls", "implicit"]
Stage = Literal["RCPT", "DATA"]


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message: EmailMessage
    tls: bool
    login: str | None
    connection: int


class _CountedSMTP(SMTP):
    """aiosmtpd's protocol, one per client connection, knowing its connection number."""

    connection_number = 0
    recorder: SmtpServer | None = None

    def data_received(self, data: bytes) -> None:
        # Below aiosmtpd's parsing, so that even what it would refuse is recorded.
        if self.recorder is not None:
            self.recorder._bytes_received(data)
        super().data_received(data)


class _Controller(Controller):
    def __init__(self, server: SmtpServer, **kwargs: Any) -> None:
        super().__init__(_Handler(server), **kwargs)
        self._owner = server

    def factory(self) -> SMTP:
        # Called once per accepted connection, on the server's event loop thread.
        smtp = _CountedSMTP(self.handler, **self.SMTP_kwargs)
        self._owner._connection_made(smtp)
        return smtp


class SmtpServer:
    """One scripted aiosmtpd server on a fixed port, recording what it receives."""

    def __init__(
        self,
        *,
        tls: Tls = "none",
        auth: bool = False,
        password: str = SMTP_PASSWORD,
        fail_first: int = 0,
        fail_code: int = 451,
        fail_at: Stage = "DATA",
        permanent_code: int | None = None,
        port: int | None = None,
        server_context: ssl.SSLContext | None = None,
        ca_file: Path | None = None,
        host: str = HOST,
    ) -> None:
        if tls != "none" and server_context is None:
            raise ValueError("a TLS server needs server_context")
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self.auth = auth
        self.password = password
        self.ca_file = ca_file
        self.fail_remaining = fail_first
        self.fail_code = fail_code
        self.fail_at: Stage = fail_at
        self.permanent_code = permanent_code
        self._server_context = server_context
        self._lock = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._connections = 0
        self._quits = 0
        self._raw = bytearray()
        self._counting = False
        self._live: weakref.WeakSet[_CountedSMTP] = weakref.WeakSet()
        self._controller: _Controller | None = None

    # -- control (test thread) -------------------------------------------------

    def start(self) -> SmtpServer:
        if self._controller is not None:
            return self
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            # Otherwise aiosmtpd runs socket.getfqdn() (DNS) for every connection.
            "server_hostname": "smtp.test",
            "authenticator": self._authenticate,
            # auth_required=True with auth_require_tls=False makes aiosmtpd warn
            # (an error under filterwarnings=error), so handle_MAIL enforces AUTH.
            # aiosmtpd cannot see implicit TLS (aio-libs/aiosmtpd#281): with
            # auth_require_tls it would refuse AUTH on an encrypted connection.
            "auth_require_tls": self.tls == "starttls",
        }
        if self.tls == "implicit":
            kwargs["ssl_context"] = self._server_context
        elif self.tls == "starttls":
            kwargs["tls_context"] = self._server_context
        controller = _Controller(self, **kwargs)
        # start() connects once to check the server is up; that is not a client.
        self._counting = False
        try:
            controller.start()
        except BaseException:
            _abandon(controller)
            raise
        self._counting = True
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is None:
            return
        self._close_connections(controller)
        controller.stop()

    def restart(self) -> SmtpServer:
        self.stop()
        return self.start()

    def drop_connections(self, reply: str | None = None) -> None:
        if self._controller is not None:
            self._close_connections(self._controller, reply)

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._connections = 0
            self._quits = 0
            self._raw.clear()

    @property
    def running(self) -> bool:
        return self._controller is not None

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def quits(self) -> int:
        with self._lock:
            return self._quits

    @property
    def received(self) -> bytes:
        with self._lock:
            return bytes(self._raw)

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self._messages)} messages arrived within {timeout}s, "
                        f"expected {count}"
                    )
                self._lock.wait(left)
            return list(self._messages)

    def config_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "smtp_host": self.host,
            "smtp_port": self.port,
            "smtp_security": {"none": "none", "starttls": "starttls", "implicit": "ssl"}[self.tls],
        }
        if self.tls != "none" and self.ca_file is not None:
            kwargs["smtp_ca_file"] = str(self.ca_file)
        if self.auth:
            kwargs["smtp_login"] = SMTP_USER
            kwargs["smtp_password"] = self.password
        return kwargs

    def env(self) -> dict[str, str]:
        return {f"{name.upper()}": str(value) for name, value in self.config_kwargs().items()}

    def _close_connections(self, controller: _Controller, reply: str | None = None) -> None:
        async def close_all() -> None:
            for smtp in list(self._live):
                transport = smtp.transport
                if not isinstance(transport, asyncio.WriteTransport):
                    continue
                if reply is None:
                    # abort(): a TLS close() would wait for the client's close_notify,
                    # which an idle smtplib client never sends.
                    transport.abort()
                elif not transport.is_closing():
                    transport.write(reply.encode() + b"\r\n")
                    transport.close()  # after the reply is written
            # Let connection_lost() run before the loop is stopped.
            for _ in range(3):
                await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(close_all(), controller.loop).result(timeout=5)

    # -- aiosmtpd hooks (server thread) ------------------------------------------

    def _connection_made(self, smtp: _CountedSMTP) -> None:
        self._live.add(smtp)
        if not self._counting:
            return
        smtp.recorder = self
        with self._lock:
            self._connections += 1
            smtp.connection_number = self._connections

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            SMTP_USER.encode(),
            self.password.encode(),
        )
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def _received(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    def _bytes_received(self, data: bytes) -> None:
        with self._lock:
            self._raw += data

    def _quit(self) -> None:
        with self._lock:
            self._quits += 1

    def _scripted_reply(self, stage: Stage) -> str | None:
        with self._lock:
            if stage != self.fail_at:
                return None
            if self.fail_remaining > 0:
                self.fail_remaining -= 1
                code = self.fail_code
            elif self.permanent_code is not None:
                code = self.permanent_code
            else:
                return None
        if 400 <= code < 500:
            return f"{code} 4.3.0 Try again later (scripted)"
        return f"{code} 5.1.1 Mailbox unavailable (scripted)"


def _abandon(controller: Controller) -> None:
    # A failed start() (port taken, say) leaves aiosmtpd's loop open: a ResourceWarning.
    with contextlib.suppress(Exception):
        controller.stop(no_assert=True)
    if not controller.loop.is_closed():
        controller.loop.close()


class _Handler:
    """The aiosmtpd handler of a SmtpServer (its handle_* hooks run on the server thread).

    Apart from the server, because aiosmtpd inspects every attribute of its handler.
    """

    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.server.auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self.server._scripted_reply("RCPT")
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        refusal = self.server._scripted_reply("DATA")
        if refusal is not None:
            return refusal
        data = cast(bytes, envelope.original_content)
        assert server.transport is not None
        login = None
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            login = session.auth_data.login.decode()
        received = ReceivedMessage(
            mail_from=cast(str, envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            message=message_from_bytes(data, policy=policy.default),
            tls=server.transport.get_extra_info("ssl_object") is not None,
            login=login,
            connection=getattr(server, "connection_number", 0),
        )
        self.server._received(received)
        return "250 2.0.0 OK queued"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.server._quit()
        return "221 Bye"


@pytest.fixture(scope="session")
def smtp_trustme_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def smtp_ca(smtp_trustme_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smtp-ca") / "ca.pem"
    smtp_trustme_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def smtp_server_context(smtp_trustme_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    smtp_trustme_ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(context)
    return context


@pytest.fixture
def smtp_factory(
    smtp_server_context: ssl.SSLContext, smtp_ca: Path
) -> Iterator[Callable[..., SmtpServer]]:
    servers: list[SmtpServer] = []

    def make(**options: Any) -> SmtpServer:
        options.setdefault("server_context", smtp_server_context)
        options.setdefault("ca_file", smtp_ca)
        server = SmtpServer(**options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def smtp_server(smtp_factory: Callable[..., SmtpServer]) -> SmtpServer:
    return smtp_factory()
