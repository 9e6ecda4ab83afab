"""Building and sending email: the only module that speaks SMTP (imports smtplib).

`build_message` is pure; `SmtpSender` only speaks SMTP. Every failure of a send is
a `SendError` whose `permanent` flag tells the caller whether a retry can help.
"""

from __future__ import annotations

import base64
import email.policy
import functools
import logging
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses
from types import TracebackType
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from notification_service.config import Config, SmtpSecurity

log = logging.getLogger(__name__)

TlsMode = Literal["implicit", "starttls", "starttls-if-offered", "plain"]

# Messages are built 7-bit clean (quoted-printable or base64 bodies, RFC 2047
# headers) so that any server takes them, with or without 8BITMIME or SMTPUTF8.
_BUILD_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_WIRE_POLICY = email.policy.SMTP
_MESSAGE_ID_RE = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")  # printable ASCII, no < > inside


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    login: str | None
    password: str | None = field(repr=False)
    security: SmtpSecurity
    verify: bool
    ca_file: str | None
    timeout: float
    max_per_connection: int
    from_email: str
    from_name: str | None

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.max_per_connection < 1:
            raise ValueError("max_per_connection must be at least 1")

    @classmethod
    def from_config(cls, config: Config) -> SmtpSettings:
        """Take the SMTP_* settings of `config`.

        :raise ValueError: when SMTP_HOST is not set (the caller runs the local sink then).
        """
        if config.smtp_host is None:
            raise ValueError("SMTP_HOST is not set")
        return cls(
            host=config.smtp_host,
            port=config.resolved_smtp_port,
            login=config.smtp_login,
            password=config.smtp_password,
            security=config.smtp_security,
            verify=config.smtp_verify,
            ca_file=config.smtp_ca_file,
            timeout=config.smtp_timeout,
            max_per_connection=config.smtp_max_per_connection,
            from_email=config.smtp_email,
            from_name=config.smtp_name,
        )


# The one table of transport security: SMTP_SECURITY, and for "auto" the port.
_MODE_BY_SECURITY: dict[str, TlsMode] = {"ssl": "implicit", "starttls": "starttls", "none": "plain"}
_AUTO_MODE_BY_PORT: dict[int, TlsMode] = {465: "implicit", 587: "starttls"}


def tls_mode(security: SmtpSecurity, port: int) -> TlsMode:
    """Say how to protect a connection to `port` under SMTP_SECURITY=`security`.

    "starttls" fails when the server does not offer STARTTLS; "starttls-if-offered"
    goes on in plain text then.
    """
    if security == "auto":
        return _AUTO_MODE_BY_PORT.get(port, "starttls-if-offered")
    return _MODE_BY_SECURITY[security]


def tls_context(*, verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """Make the client TLS context; `ca_file` replaces the system's trusted CAs."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class OutgoingEmail:
    to: str
    subject: str
    text: str
    html: str | None
    message_id: str  # with its angle brackets: "<abc@example.com>"


def build_message(
    email: OutgoingEmail,
    *,
    from_email: str,
    from_name: str | None,
    date: datetime | None = None,
) -> EmailMessage:
    """Build the message to send; pure apart from reading the clock when `date` is None.

    :raise ValueError: for a line break in a header value (header injection), a bad
        address or Message-ID, or a naive `date`.
    """
    for name, value in (
        ("to", email.to),
        ("subject", email.subject),
        ("from_name", from_name or ""),
        ("message_id", email.message_id),
        ("from_email", from_email),
    ):
        _require_one_line(name, value)
    if not _MESSAGE_ID_RE.fullmatch(email.message_id):
        raise ValueError(f"message_id must look like <id@domain>, got {email.message_id!r}")
    if date is None:
        date = datetime.now(UTC)
    elif date.tzinfo is None:
        raise ValueError("date must be timezone-aware")

    message = EmailMessage(policy=_BUILD_POLICY)
    # The header registry encodes a non-ASCII display name per RFC 2047 and quotes
    # specials, which hand-made "Name <addr>" strings get wrong.
    message["From"] = Address(display_name=from_name or "", addr_spec=ascii_address(from_email))
    message["To"] = Address(addr_spec=ascii_address(email.to))
    message["Subject"] = email.subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = email.message_id
    message.set_content(email.text)  # adds MIME-Version
    if email.html is not None:
        message.add_alternative(email.html, subtype="html")
    return message


def ascii_address(address: str) -> str:
    """Return `address` with its domain in IDNA (punycode) form.

    :raise ValueError: if it is not one bare address, or its local part is not ASCII
        (that needs SMTPUTF8, which this sender does not speak).
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"not an email address: {address!r}")
    if not local.isascii():
        raise ValueError(f"non-ASCII local part is not supported: {address!r}")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"bad domain in {address!r}: {exc}") from None
    normalized = f"{local}@{domain}"
    # Address() parses the addr-spec and refuses what is not exactly one address.
    return Address(addr_spec=normalized).addr_spec


def _require_one_line(name: str, value: str) -> None:
    # splitlines() also catches \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029.
    if "\r" in value or "\n" in value or len(value.splitlines()) > 1:
        raise ValueError(f"{name} must be one line (no line breaks): {value!r}")


class SendError(Exception):
    """A send failed; `permanent` says that retrying the same message cannot help."""

    def __init__(self, reply: str, *, permanent: bool, code: int | None = None) -> None:
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent
        self.code = code

    def __str__(self) -> str:
        kind = "permanent" if self.permanent else "transient"
        code = f" {self.code}" if self.code is not None else ""
        return f"{kind} SMTP failure{code}: {self.reply}"

    def __repr__(self) -> str:
        return f"SendError({self.reply!r}, permanent={self.permanent}, code={self.code})"


def classify(exc: BaseException) -> SendError:
    """Map an exception from smtplib, socket or ssl to a SendError.

    5xx replies are permanent, everything else is transient: 4xx replies, lost
    connections, timeouts, TLS and authentication failures.
    """
    if isinstance(exc, SendError):
        return exc
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refusals = list(exc.recipients.values())
        if not refusals:
            return SendError("all recipients refused", permanent=False)
        code = refusals[0][0]
        reply = "; ".join(f"{to}: {c} {_text(r)}" for to, (c, r) in exc.recipients.items())
        # One 4xx among them means the server may take the message later.
        return SendError(reply, permanent=all(500 <= c <= 599 for c, _ in refusals), code=code)
    if isinstance(
        exc, smtplib.SMTPAuthenticationError | smtplib.SMTPConnectError | smtplib.SMTPHeloError
    ):
        # Wrong credentials, or a server refusing us at the greeting or EHLO, would refuse
        # every message alike: that is a configuration problem an operator fixes, and
        # the message must wait for the fix instead of being dropped.
        return SendError(_text(exc.smtp_error), permanent=False, code=exc.smtp_code)
    if isinstance(exc, smtplib.SMTPResponseException):
        # SMTPSenderRefused, SMTPDataError and bare replies (as to STARTTLS).
        code = exc.smtp_code
        # 530 is "authentication required" (RFC 4954), typically the answer to MAIL
        # when SMTP_LOGIN is missing: configuration again, not this message's fault.
        permanent = 500 <= code <= 599 and code != 530
        return SendError(_text(exc.smtp_error), permanent=permanent, code=code)
    # Everything else is transient. This includes SMTPServerDisconnected, and
    # SMTPNotSupportedError (STARTTLS or AUTH required but not offered: configuration).
    # ssl.SSLCertVerificationError is an OSError: a server certificate we do not
    # trust is configuration too (SMTP_CA_FILE, SMTP_VERIFY), so it is transient.
    return SendError(f"{type(exc).__name__}: {exc}", permanent=False)


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


@functools.cache
def _local_hostname() -> str:
    # smtplib would call getfqdn() (a DNS lookup without a timeout) on every connection.
    return socket.getfqdn()


class SmtpSender:
    """Send messages over one SMTP connection, reused across consecutive sends.

    Not thread-safe (neither is an smtplib connection): each dispatcher thread owns
    one sender. The connection is replaced after `max_per_connection` messages and
    after any failure. Use as a context manager, or call `close()`.
    """

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self.mode = tls_mode(settings.security, settings.port)
        # Made once, so that a bad SMTP_CA_FILE fails at start-up.
        self._context = (
            None
            if self.mode == "plain"
            else tls_context(verify=settings.verify, ca_file=settings.ca_file)
        )
        self._envelope_from = ascii_address(settings.from_email)
        self._conn: smtplib.SMTP | None = None
        self._sent_on_connection = 0

    def __enter__(self) -> SmtpSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send(self, message: EmailMessage) -> None:
        """Send `message` to its To address, with SMTP_EMAIL as the envelope sender.

        :raise SendError: for any failure; no other exception escapes.
        """
        try:
            recipient = _envelope_recipient(message)
            payload = message.as_bytes(policy=_WIRE_POLICY)
        except Exception as exc:
            raise SendError(f"unsendable message: {exc}", permanent=True) from exc
        retried = False
        while True:
            reused = self._conn is not None
            conn = self._connection()
            stage = "MAIL"
            try:
                code, reply = conn.mail(self._envelope_from)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, reply, self._envelope_from)
                stage = "RCPT"
                code, reply = conn.rcpt(recipient)
                if code not in (250, 251):
                    raise smtplib.SMTPRecipientsRefused({recipient: (code, reply)})
                stage = "DATA"
                code, reply = conn.data(payload)
                if code != 250:
                    raise smtplib.SMTPDataError(code, reply)
            except Exception as exc:
                closing = _server_closed(exc)
                # A server still talking deserves a QUIT; after a socket error or a
                # 421 ("closing the channel") QUIT could only wait for the timeout.
                polite = not closing and isinstance(
                    exc, smtplib.SMTPResponseException | smtplib.SMTPRecipientsRefused
                )
                self._discard(polite=polite)
                # Servers close idle connections when they like (Postfix says 421
                # first). Found at MAIL, the server had accepted nothing of this
                # message, so sending again on a new connection cannot duplicate it.
                if closing and reused and stage == "MAIL" and not retried:
                    log.info(
                        "SMTP server closed the idle connection (%s); reconnecting", classify(exc)
                    )
                    retried = True
                    continue
                raise classify(exc) from exc
            except BaseException:
                # Interrupted mid-transaction: the session state is unknown.
                self._discard(polite=False)
                raise
            self._sent_on_connection += 1
            if self._sent_on_connection >= self.settings.max_per_connection:
                self.close()
            return

    def close(self) -> None:
        """Say QUIT and close the connection, if any.

        Never raises, so that calling it while another error propagates cannot hide it.
        """
        self._discard(polite=True)

    def _connection(self) -> smtplib.SMTP:
        if self._conn is not None:
            return self._conn
        try:
            self._conn = self._connect()
        except Exception as exc:
            error = classify(exc)
            # Nothing of the message was sent yet, and a refusal while setting up
            # the session (greeting, EHLO, STARTTLS, AUTH) would refuse every message
            # alike: it is the server's or the operator's problem, never permanent.
            raise SendError(error.reply, permanent=False, code=error.code) from exc
        self._sent_on_connection = 0
        return self._conn

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        conn: smtplib.SMTP
        # The timeout covers the TCP connect, the TLS handshake and every later
        # read and write on the socket.
        if self.mode == "implicit":
            conn = smtplib.SMTP_SSL(
                s.host,
                s.port,
                local_hostname=_local_hostname(),
                timeout=s.timeout,
                context=self._context,
            )
        else:
            conn = smtplib.SMTP(s.host, s.port, local_hostname=_local_hostname(), timeout=s.timeout)
        try:
            conn.ehlo_or_helo_if_needed()
            if self.mode == "starttls" or (
                self.mode == "starttls-if-offered" and conn.has_extn("starttls")
            ):
                # Raises SMTPNotSupportedError when the server does not offer it.
                conn.starttls(context=self._context)
                conn.ehlo()  # RFC 3207: forget what was learned before TLS
            if s.login is not None:
                _login(conn, s.login, s.password or "")
        except BaseException:
            _close_quietly(conn, polite=False)
            raise
        log.debug("connected to SMTP %s:%d (%s)", s.host, s.port, self.mode)
        return conn

    def _discard(self, *, polite: bool) -> None:
        conn, self._conn = self._conn, None
        self._sent_on_connection = 0
        if conn is not None:
            _close_quietly(conn, polite=polite)


def _close_quietly(conn: smtplib.SMTP, *, polite: bool) -> None:
    try:
        if polite:
            conn.quit()
    except Exception as exc:
        log.debug("SMTP QUIT failed: %s", exc)
    finally:
        try:
            conn.close()
        except Exception as exc:
            log.debug("closing the SMTP connection failed: %s", exc)


def _server_closed(exc: Exception) -> bool:
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return True
    return isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code == 421


def _login(conn: smtplib.SMTP, login: str, password: str) -> None:
    if (login + password).isascii():
        conn.login(login, password)  # picks the best mechanism the server offers
        return
    # smtplib encodes AUTH responses as ASCII, but RFC 4616 PLAIN carries UTF-8.
    mechanisms = conn.esmtp_features.get("auth", "").upper().split()
    if "PLAIN" not in mechanisms:
        raise smtplib.SMTPNotSupportedError(
            "non-ASCII SMTP credentials need AUTH PLAIN, which the server does not offer"
        )
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode("ascii")
    code, reply = conn.docmd("AUTH", f"PLAIN {token}")
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


def _envelope_recipient(message: EmailMessage) -> str:
    values = message.get_all("To", [])
    addresses = [addr for _, addr in getaddresses([str(v) for v in values]) if addr]
    if len(addresses) != 1:
        raise ValueError(f"exactly one To address needed, found {len(addresses)}")
    return ascii_address(addresses[0])
