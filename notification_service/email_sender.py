"""Building and sending email: the only module that speaks SMTP (imports smtplib).

`build_message` is pure; `SmtpSender` only speaks SMTP. Every failure of a send is
a `SendError` whose `permanent` flag tells the caller whether a retry can help.
"""

from __future__ import annotations

import base64
import email.policy
import functools
import ipaddress
import logging
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from .config import Secret

if TYPE_CHECKING:
    from email.policy import Policy

    from notification_service.config import Config, SmtpSecurity

log = logging.getLogger(__name__)

TlsMode = Literal["implicit", "starttls", "starttls-if-offered", "plain"]

# Messages are built 7-bit clean (quoted-printable or base64 bodies, RFC 2047
# headers) so that any server takes them, with or without 8BITMIME or SMTPUTF8.
_BUILD_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_WIRE_POLICY = email.policy.SMTP
# RFC 5322 msg-id with dot-atom-text on both sides (no-fold-literal domains left out).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_MESSAGE_ID_RE = re.compile(rf"<{_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*>")


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    login: str | None
    password: Secret | None  # reveal()ed only for AUTH
    security: SmtpSecurity
    verify: bool
    ca_file: str | None
    timeout: float
    max_per_connection: int
    from_email: str  # the envelope's MAIL FROM; the From header is the message's own

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
        )


# The one table of transport security: SMTP_SECURITY, and for "auto" the port.
_MODE_BY_SECURITY: dict[str, TlsMode] = {"ssl": "implicit", "starttls": "starttls", "none": "plain"}
_AUTO_MODE_BY_PORT: dict[int, TlsMode] = {465: "implicit", 587: "starttls"}


def tls_mode(security: SmtpSecurity, port: int) -> TlsMode:
    """Say how to protect a connection to `port` under SMTP_SECURITY=`security`.

    "starttls" fails when the server does not offer STARTTLS; "starttls-if-offered"
    goes on in plain text then, but logs in only to a server on loopback.
    """
    if security == "auto":
        return _AUTO_MODE_BY_PORT.get(port, "starttls-if-offered")
    return _MODE_BY_SECURITY[security]


def is_loopback(address: str) -> bool:
    """Whether `address`, an IP address as a socket reports its peer, is this machine's
    loopback (127.0.0.0/8, ::1, or 127.x mapped into IPv6); a name is never one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


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
    # The one-click unsubscribe link of an email of a non-mandatory key (unsubscribe.py).
    unsubscribe_url: str | None = None


def build_message(
    email: OutgoingEmail,
    *,
    from_email: str,
    from_name: str | None,
    date: datetime | None = None,
) -> EmailMessage:
    """Build the message to send; pure apart from reading the clock when `date` is None.

    With `email.unsubscribe_url`, the message carries `List-Unsubscribe: <url>` and
    `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 2369, RFC 8058 section
    3.1); without it, neither.

    :raise ValueError: for a line break in a header value (header injection), a bad
        address, Message-ID or unsubscribe URL, or a naive `date`.
    """
    for name, value in (
        ("to", email.to),
        ("subject", email.subject),
        ("from_name", from_name or ""),
        ("message_id", email.message_id),
        ("from_email", from_email),
    ):
        _require_one_line(name, value)
    if not _MESSAGE_ID_RE.fullmatch(email.message_id) or "=?" in email.message_id:
        raise ValueError(f"message_id must look like <id@domain>, got {email.message_id!r}")
    if email.unsubscribe_url is not None:
        _check_unsubscribe_url(email.unsubscribe_url)
    if date is None:
        date = datetime.now(UTC)
    elif date.tzinfo is None:
        raise ValueError("date must be timezone-aware")

    sender = ascii_address(from_email)
    message = EmailMessage(policy=_BUILD_POLICY)
    # Every header from outside is written by _Written, never by the header registry,
    # which decodes RFC 2047 encoded words in what it is given: a caller's
    # "=?utf-8?q?=0D=0A?=" would become a real line break on the wire.
    if from_name:
        tokens = [*_phrase(from_name), f"<{sender}>"]
        message["From"] = _Written("From", f"{from_name} <{sender}>", tokens)
    else:
        message["From"] = _Written("From", sender, [sender])
    to = ascii_address(email.to)
    message["To"] = _Written("To", to, [to])
    message["Subject"] = _Written("Subject", email.subject, _unstructured("Subject", email.subject))
    date_text = format_datetime(date)
    message["Date"] = _Written("Date", date_text, date_text.split(" "))
    message["Message-ID"] = _Written("Message-ID", email.message_id, [email.message_id])
    if email.unsubscribe_url is not None:
        link = f"<{email.unsubscribe_url}>"
        message["List-Unsubscribe"] = _Written("List-Unsubscribe", link, [link])
        one_click = "List-Unsubscribe=One-Click"
        message["List-Unsubscribe-Post"] = _Written("List-Unsubscribe-Post", one_click, [one_click])
    message.set_content(email.text)  # adds MIME-Version
    if email.html is not None:
        message.add_alternative(email.html, subtype="html")
    return message


def ascii_address(address: str) -> str:
    """Return `address` with its domain in IDNA (punycode) form.

    :raise ValueError: if it is not one bare address, its local part is not ASCII
        (that needs SMTPUTF8, which this sender does not speak), or it holds an RFC 2047
        encoded word.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"not an email address: {address!r}")
    if "=?" in address:
        # An address cannot be encoded (RFC 2047 section 5), so its only literal form is
        # the bare token, which Python's parser (and others) would decode as an encoded
        # word: "=?utf-8?q?a=0D=0ABcc=3A...?=@example.com". No real address looks so.
        raise ValueError(f"an address must not hold an encoded word ('=?'): {address!r}")
    if not local.isascii():
        raise ValueError(f"non-ASCII local part is not supported: {address!r}")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"bad domain in {address!r}: {exc}") from None
    normalized = f"{local}@{domain}"
    # Address() parses the addr-spec and refuses what is not exactly one address.
    try:
        return Address(addr_spec=normalized).addr_spec
    except HeaderParseError as exc:  # a dot first or last in a part, or two in a row
        raise ValueError(f"not an email address: {address!r} ({exc})") from None


# -- header values, written as literal text ------------------------------------------

_MAX_LINE = 78  # RFC 5322's recommended limit, CRLF excluded
_MAX_ENCODED_WORD = 75  # RFC 2047 section 2
_EW_OVERHEAD = len("=?utf-8?q??=")
# RFC 2047 section 5 (3): what Q may leave unencoded even inside a phrase.
_Q_LITERAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_PLAIN_TEXT_RE = re.compile(r"[!-~]+(?: [!-~]+)*")  # printable ASCII words, single spaces
_PLAIN_PHRASE_RE = re.compile(rf"{_ATEXT}(?: {_ATEXT})*")  # RFC 5322 atoms, single spaces


class _Written(str):
    """A header field laid out by this module, which every policy keeps as it is.

    An EmailPolicy stores a value that has a matching `name` without parsing it, and
    serializes it by calling its `fold()`, so the header registry never reads (and
    decodes) what was written here. The str value is `text`, what a reader decodes.
    """

    name: str
    _tokens: tuple[str, ...]

    def __new__(cls, name: str, text: str, tokens: list[str]) -> _Written:
        self = super().__new__(cls, text)
        self.name = name
        self._tokens = tuple(tokens)
        return self

    def __reduce__(self) -> tuple[type[_Written], tuple[str, str, list[str]]]:
        # For copy.deepcopy(), which the generator applies to a message in some cases.
        return (_Written, (self.name, str(self), list(self._tokens)))

    def fold(self, *, policy: Policy) -> str:
        """The field as it goes on the wire: tokens one blank apart, lines of at most 78
        characters where tokens allow, each continuation line starting with the blank."""
        lines = [f"{self.name}:"]
        for i, token in enumerate(self._tokens):
            # The first token stays on the first line: a line break right after the
            # colon would read back as a leading blank.
            if i > 0 and len(lines[-1]) + 1 + len(token) > _MAX_LINE:
                lines.append("")
            lines[-1] += f" {token}"
        return policy.linesep.join(lines) + policy.linesep


def _unstructured(name: str, text: str) -> list[str]:
    """The tokens of unstructured text (a Subject), which reads back exactly as `text`."""
    if _PLAIN_TEXT_RE.fullmatch(text) and "=?" not in text:
        # Plain words fold at their blanks, and unfolding gives them back.
        return _plain_or_encoded(name, text)
    return _encoded_words(text, _MAX_LINE - len(name) - 2)


def _phrase(name: str) -> list[str]:
    """The tokens of a From display name (an RFC 5322 phrase): atoms, else encoded words."""
    if _PLAIN_PHRASE_RE.fullmatch(name) and "=?" not in name:
        return _plain_or_encoded("From", name)
    return _encoded_words(name, _MAX_LINE - len("From: "))


def _plain_or_encoded(field_name: str, text: str) -> list[str]:
    # A word too long for any line is the one plain case that needs encoding to fold.
    words = text.split(" ")
    first_room = _MAX_LINE - len(field_name) - 2
    if len(words[0]) <= first_room and all(len(w) < _MAX_LINE for w in words[1:]):
        return words
    return _encoded_words(text, first_room)


def _encoded_words(text: str, first_room: int) -> list[str]:
    """`text` as RFC 2047 encoded words (UTF-8; Q or B, whichever is shorter), each
    whole characters and short enough for its line.

    The whole value is encoded, literal text included, so that no "=?" of the caller's
    stays outside a word to be decoded by a reader.
    """
    data = text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError
    q_length = sum(len(_q(c)) for c in text)
    encoding = "q" if q_length <= 4 * -(-len(data) // 3) else "b"
    words: list[str] = []
    chunk = ""
    room = min(first_room, _MAX_ENCODED_WORD)
    for char in text:
        if chunk and _word_length(chunk + char, encoding) > room:
            words.append(_word(chunk, encoding))
            chunk = ""
            room = min(_MAX_LINE - 1, _MAX_ENCODED_WORD)
        chunk += char
    words.append(_word(chunk, encoding))
    return words


def _q(char: str) -> str:
    if char in _Q_LITERAL:
        return char
    if char == " ":
        return "_"
    return "".join(f"={b:02X}" for b in char.encode("utf-8"))


def _word_length(chunk: str, encoding: str) -> int:
    if encoding == "q":
        return _EW_OVERHEAD + sum(len(_q(c)) for c in chunk)
    return _EW_OVERHEAD + 4 * -(-len(chunk.encode("utf-8")) // 3)


def _word(chunk: str, encoding: str) -> str:
    if encoding == "q":
        payload = "".join(_q(c) for c in chunk)
    else:
        payload = base64.b64encode(chunk.encode("utf-8")).decode("ascii")
    return f"=?utf-8?{encoding}?{payload}?="


# An http(s) URL as unsubscribe.py makes it: printable ASCII without blanks, quotes or
# angle brackets (which would end the header's <...>), short enough for one line. The
# scheme in any case, as config.py takes PUBLIC_URL's (RFC 3986: it is case-insensitive).
_UNSUBSCRIBE_URL_RE = re.compile(r"(?i:https?)://[!#-;=?-~]+")
_UNSUBSCRIBE_URL_MAX = 998 - len("List-Unsubscribe: <>")  # RFC 5322's line limit


def _check_unsubscribe_url(url: str) -> None:
    # The URL is the service's own (PUBLIC_URL and a token); it is checked all the same,
    # as it is written into the header as it is, unfolded and unencoded.
    if len(url) > _UNSUBSCRIBE_URL_MAX or not _UNSUBSCRIBE_URL_RE.fullmatch(url):
        raise ValueError(f"unsubscribe_url must be one line of an http(s) URL, got {url[:200]!r}")


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
            encrypted = self.mode == "implicit"
            if self.mode == "starttls" or (
                self.mode == "starttls-if-offered" and conn.has_extn("starttls")
            ):
                # Raises SMTPNotSupportedError when the server does not offer it.
                conn.starttls(context=self._context)
                conn.ehlo()  # RFC 3207: forget what was learned before TLS
                encrypted = True
            if s.login is not None:
                if self.mode == "starttls-if-offered" and not encrypted:
                    self._refuse_cleartext_login(conn)
                _login(conn, s.login, s.password.reveal() if s.password is not None else "")
        except BaseException:
            _close_quietly(conn, polite=False)
            raise
        log.debug("connected to SMTP %s:%d (%s)", s.host, s.port, self.mode)
        return conn

    def _refuse_cleartext_login(self, conn: smtplib.SMTP) -> None:
        """Allow AUTH without TLS under "auto" only to a server on this machine.

        The peer address is the one the bytes go to, whatever SMTP_HOST resolved to.
        :raise SendError: transient: the operator fixes the configuration, emails wait.
        """
        try:
            peer = str(conn.sock.getpeername()[0]) if conn.sock is not None else ""
        except OSError:
            peer = ""
        if is_loopback(peer):
            return
        s = self.settings
        raise SendError(
            f"SMTP_SECURITY=auto: the server at {s.host}:{s.port} offers no STARTTLS; "
            "refusing to send SMTP_LOGIN's password in cleartext; "
            "set SMTP_SECURITY=none to allow it on purpose",
            permanent=False,
        )

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
