"""email_sender: building messages (pure) and sending them to real SMTP servers."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import ipaddress
import json
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import runtime
from flask import Flask
from smtp_fixtures import SMTP_USER, SmtpServer
from test_dispatcher import context_of, drain, make_dispatcher

from notification_service.config import Config, Secret
from notification_service.email_sender import (
    OutgoingEmail,
    SendError,
    SmtpSender,
    SmtpSettings,
    build_message,
    classify,
    is_loopback,
    tls_mode,
)
from notification_service.email_templates import PACKAGE_TEMPLATES, EmailTemplates
from notification_service.embedded import free_port

FROM = "notifications@example.com"
SECURITY = {"none": "none", "starttls": "starttls", "implicit": "ssl"}


def outgoing(**overrides: Any) -> OutgoingEmail:
    fields: dict[str, Any] = {
        "to": "user@example.com",
        "subject": "New notification: welcome",
        "text": "Hello,\nyou have a new notification.\n",
        "html": None,
        "message_id": "<n1.abc@example.com>",
    }
    fields.update(overrides)
    return OutgoingEmail(**fields)


def message(**overrides: Any) -> EmailMessage:
    return build_message(outgoing(**overrides), from_email=FROM, from_name="Notifier")


def parse(msg: EmailMessage) -> EmailMessage:
    """What a mail client would read from the bytes on the wire."""
    return message_from_bytes(msg.as_bytes(), policy=policy.default)


def content(part: Any) -> str:
    # Encoded text bodies are in canonical form (CRLF line ends, RFC 2045); readers
    # show them with local line ends.
    text: str = part.get_content()
    return text.replace("\r\n", "\n")


def settings(server: SmtpServer | None = None, **overrides: Any) -> SmtpSettings:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port if server else free_port(),
        "login": None,
        "password": None,
        "security": SECURITY[server.tls] if server else "none",
        "verify": True,
        "ca_file": str(server.ca_file) if server and server.tls != "none" else None,
        "timeout": 5.0,
        "max_per_connection": 100,
        "from_email": FROM,
    }
    if server is not None and server.auth:
        fields.update(login=SMTP_USER, password=server.password)
    fields.update(overrides)
    if isinstance(fields["password"], str):
        fields["password"] = Secret(fields["password"])
    return SmtpSettings(**fields)


@pytest.fixture
def make_sender() -> Iterator[Callable[..., SmtpSender]]:
    senders: list[SmtpSender] = []

    def make(server: SmtpServer | None = None, **overrides: Any) -> SmtpSender:
        sender = SmtpSender(settings(server, **overrides))
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        sender.close()


def send_error(sender: SmtpSender, msg: EmailMessage | None = None) -> SendError:
    with pytest.raises(SendError) as caught:
        sender.send(msg or message())
    return caught.value


# -- build_message ------------------------------------------------------------


def test_non_ascii_from_name_and_subject_are_rfc2047_encoded() -> None:
    msg = build_message(
        outgoing(subject="Grüße, Ihre Benachrichtigung — 日本"),
        from_email=FROM,
        from_name="Zoë Åström",
    )
    raw = msg.as_bytes()
    assert raw.isascii()
    headers = raw.split(b"\r\n\r\n", 1)[0]
    assert headers.count(b"=?utf-8?") >= 2
    parsed = parse(msg)
    assert parsed["Subject"] == "Grüße, Ihre Benachrichtigung — 日本"
    (sender,) = parsed["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Zoë Åström", FROM)


def test_from_name_with_specials_is_quoted_not_parsed_as_addresses() -> None:
    parsed = parse(
        build_message(outgoing(), from_email=FROM, from_name='ACME, Inc. "Alerts" <x@evil>')
    )
    (sender,) = parsed["From"].addresses
    assert sender.display_name == 'ACME, Inc. "Alerts" <x@evil>'
    assert sender.addr_spec == FROM


def test_from_without_name_is_the_bare_address() -> None:
    msg = build_message(outgoing(), from_email=FROM, from_name=None)
    assert msg["From"] == FROM


def test_headers_carry_to_message_id_date_and_mime_version() -> None:
    date = datetime(2026, 11, 28, 5, 13, tzinfo=timezone(timedelta(hours=1)))
    msg = build_message(
        outgoing(message_id="<stable.42@notifications.example.com>"),
        from_email=FROM,
        from_name=None,
        date=date,
    )
    parsed = parse(msg)
    assert parsed["To"] == "user@example.com"
    assert parsed["Message-ID"] == "<stable.42@notifications.example.com>"
    assert parsed["Date"] == "Sat, 28 Nov 2026 05:13:00 +0100"
    assert parsed["Date"].datetime == date
    assert parsed["MIME-Version"] == "1.0"


def test_date_defaults_to_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    parsed = parse(message())
    assert before <= parsed["Date"].datetime <= datetime.now(UTC)


def test_text_only_message_is_a_single_utf8_text_part() -> None:
    parsed = parse(message(text="Grüße aus Köln — 日本語\n"))
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert content(parsed) == "Grüße aus Köln — 日本語\n"
    assert not parsed.is_multipart()


def test_html_is_an_alternative_after_the_text() -> None:
    parsed = parse(message(text="Plain ✓\n", html="<p>Rich ✓</p>\n"))
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert [content(p) for p in parts] == ["Plain ✓\n", "<p>Rich ✓</p>\n"]


def test_long_and_non_ascii_lines_go_on_the_wire_7bit_clean() -> None:
    text = "x" * 2000 + "\nÄ\n"
    raw = message(text=text).as_bytes()
    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert content(parse(message(text=text))) == text


@pytest.mark.parametrize("field", ["to", "subject", "message_id", "from_name"])
@pytest.mark.parametrize(
    "brk", ["\r\n", "\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_line_breaks_in_header_values_are_refused(field: str, brk: str) -> None:
    injected = {
        "to": f"user@example.com{brk}Bcc: victim@example.com",
        "subject": f"Hi{brk}Bcc: victim@example.com",
        "message_id": f"<a@b>{brk}Bcc: victim@example.com",
        "from_name": f"Notifier{brk}Bcc: victim@example.com",
    }[field]
    with pytest.raises(ValueError, match="one line"):
        if field == "from_name":
            build_message(outgoing(), from_email=FROM, from_name=injected)
        else:
            build_message(outgoing(**{field: injected}), from_email=FROM, from_name=None)


@pytest.mark.parametrize(
    "to",
    [
        "not-an-address",
        "a@b.example, c@d.example",
        "Bob <bob@example.com>",
        "jörg@example.de",
        # The parser's own error, not a ValueError, before: the dispatcher took it for a
        # bug and retried the email, and its batch, until the attempts ran out.
        "a@.example.com",
        "a@example.com.",
        "a@example..com",
    ],
)
def test_anything_but_one_bare_ascii_address_is_refused(to: str) -> None:
    with pytest.raises(ValueError):
        message(to=to)


def test_international_domain_is_sent_in_punycode() -> None:
    assert message(to="anna@münchen.de")["To"] == "anna@xn--mnchen-3ya.de"


@pytest.mark.parametrize("message_id", ["abc@example.com", "<abc>", "<a b@example.com>", "<>"])
def test_message_id_must_be_one_bracketed_id(message_id: str) -> None:
    with pytest.raises(ValueError, match="message_id"):
        message(message_id=message_id)


def test_naive_date_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        build_message(outgoing(), from_email=FROM, from_name=None, date=datetime(2026, 1, 1))


# -- one-click unsubscribe (RFC 2369, RFC 8058) --------------------------------------

UNSUBSCRIBE_URL = (
    "https://notify.example.com/unsubscribe/6756b2f1a4c3e0d9b8f71234.new_post."
    "Qk9hN2tqYlVwTXlkQ3hWRm5aUmdYc0pqT3lKd2VtNEd"
)


def test_an_unsubscribe_url_adds_list_unsubscribe_and_the_one_click_post() -> None:
    wire = message(unsubscribe_url=UNSUBSCRIBE_URL).as_bytes()
    # One line each, as RFC 8058 section 3.1 writes them (a URL is never folded inside).
    assert f"\r\nList-Unsubscribe: <{UNSUBSCRIBE_URL}>\r\n".encode() in wire
    assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in wire
    read = parse(message(unsubscribe_url=UNSUBSCRIBE_URL, html="<p>hi</p>"))
    assert read["List-Unsubscribe"] == f"<{UNSUBSCRIBE_URL}>"
    assert read["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_without_an_unsubscribe_url_neither_header_is_there() -> None:
    read = parse(message())
    assert read["List-Unsubscribe"] is None
    assert read["List-Unsubscribe-Post"] is None


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/u/x\r\nBcc: victim@example.com",
        "https://example.com/u/x\nBcc: victim@example.com",
        "https://example.com/u/x\u2028y",
        "https://example.com/u/x>, <mailto:attacker@example.com",
        "https://example.com/u/x y",
        "https://example.com/u/\u00e9",
        "javascript:alert(1)",
        "mailto:unsubscribe@example.com",
        'https://example.com/u/=?utf-8?q?=0D=0ABcc:_x?="',
        "https://example.com/" + "a" * 1000,
        "",
    ],
)
def test_an_unsubscribe_url_that_is_not_one_ascii_http_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="unsubscribe_url"):
        message(unsubscribe_url=url)


def test_the_dispatcher_sends_the_unsubscribe_headers_of_a_record_that_has_the_url(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
) -> None:
    app = make_app(make_config(**smtp_server.config_kwargs()))
    outbox = runtime(app).services.outbox
    record = {
        "kind": "notification",
        "subject": "Hello",
        "text": "Hi.",
        "html": None,
        "user_id": None,
        "notification_id": None,
        "key": "new_post",
    }
    with_url = {**record, "to": "a@example.com", "message_id": "<a@example.com>"}
    without = {**record, "to": "b@example.com", "message_id": "<b@example.com>"}
    outbox.enqueue_many(
        [{**with_url, "unsubscribe_url": UNSUBSCRIBE_URL}, without],
        datetime.now(UTC),
        email_ids=["6756b2f1a4c3e0d9b8f70001", "6756b2f1a4c3e0d9b8f70002"],
    )
    dispatcher = make_dispatcher(context_of(app))
    try:
        assert drain(dispatcher) == 2
    finally:
        dispatcher.close()
    by_to = {m.message["To"]: m.message for m in smtp_server.wait_for_messages(2)}
    assert by_to["a@example.com"]["List-Unsubscribe"] == f"<{UNSUBSCRIBE_URL}>"
    assert by_to["a@example.com"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert by_to["b@example.com"]["List-Unsubscribe"] is None
    assert by_to["b@example.com"]["List-Unsubscribe-Post"] is None


# -- header values are literal text (RFC 2047 encoded words) ------------------------
#
# A caller's text must reach a reader exactly as sent. Python's header registry decodes
# encoded words in any value assigned to a header, so "=?utf-8?q?Hi=0D=0ABcc:...?=" in a
# subject used to become a real line break on the wire: a forged header, or with
# "=0D=0A=0D=0A" the real headers pushed into the body. Every check reads the bytes as
# a mail client would, with a fresh parser.

WIRE_HEADERS = [
    "From", "To", "Subject", "Date", "Message-ID",
    "Content-Type", "Content-Transfer-Encoding", "MIME-Version",
]  # fmt: skip
TEXT = "Hello,\nyou have a new notification.\n"
# Every character str.splitlines() breaks on, NUL, and a blank line (headers into the body).
BREAKS = {
    "CR": "\r", "LF": "\n", "CRLF": "\r\n", "CRLFCRLF": "\r\n\r\n", "NUL": "\x00",
    "VT": "\v", "FF": "\f", "FS": "\x1c", "GS": "\x1d", "RS": "\x1e",
    "NEL": "\x85", "LS": "\u2028", "PS": "\u2029",
}  # fmt: skip
# Charset and encoding letters as attackers may spell them: RFC 2047 ignores case.
ENCODINGS = [
    ("utf-8", "q"), ("UTF-8", "Q"), ("utf-8", "b"), ("UTF-8", "B"),
    ("iso-8859-1", "q"), ("ISO-8859-1", "B"),
]  # fmt: skip


def encoded_word(text: str, charset: str, encoding: str) -> str:
    """`text` as one RFC 2047 encoded word, made by hand as an attacker would."""
    data = text.encode(charset)
    if encoding.lower() == "b":
        payload = base64.b64encode(data).decode("ascii")
    else:
        payload = "".join(chr(b) if chr(b).isalnum() and b < 0x80 else f"={b:02X}" for b in data)
    return f"=?{charset}?{encoding}?{payload}?="


def _encoded_attacks(template: str) -> Iterator[Any]:
    for brk_name, brk in BREAKS.items():
        for charset, encoding in ENCODINGS:
            with contextlib.suppress(UnicodeEncodeError):  # \u2028 has no Latin-1 byte
                word = encoded_word(template.format(brk=brk), charset, encoding)
                yield pytest.param(word, id=f"{brk_name}-{charset}-{encoding}")


OTHER_ATTACKS = [
    pytest.param("=?utf-8?q?Hi=0D=0AReply-To:attacker@evil.example?=", id="issue"),
    pytest.param("=?utf-8?q?Hi=0D=0A=0D=0Anow_the_body?=", id="body-move"),
    pytest.param("Hello =?utf-8?q?=0D=0ABcc:_victim@example.com?= there", id="mid-text"),
    pytest.param("Hi=?utf-8?q?=0D=0ABcc:victim@example.com?=", id="no-space-before"),
    pytest.param("Grüße =?utf-8?b?DQpCY2M6IHZpY3RpbUBleGFtcGxlLmNvbQ==?=", id="non-ascii"),
    pytest.param("=?utf-8?q?a?= =?utf-8?q?=0D=0AX-Evil:_1?=", id="adjacent-words"),
    pytest.param("=?utf-8*en?q?Hi=0D=0AX-Evil:_1?=", id="rfc2231-language"),
]


SUBJECT_ATTACKS = [
    *_encoded_attacks("Hi{brk}Reply-To: attacker@evil.example{brk}Bcc: victim@example.com"),
    *OTHER_ATTACKS,
]
# Shorter, so that the name stays one encoded word: Python's address parser reads the
# blank between two encoded words of a display name as a space (RFC 2047 section 6.2
# says to drop it), and this test compares what Python reads.
FROM_NAME_ATTACKS = list(_encoded_attacks("{brk}Bcc:v@x"))


def wire(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=policy.SMTP)


def read_wire(raw: bytes) -> EmailMessage:
    """The message a mail client reads from `raw`: a fresh parser, nothing shared."""
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    return parsed


def raw_headers(raw: bytes) -> list[tuple[str, str]]:
    """The header fields of `raw`, unfolded (RFC 5322 section 2.2.3) but not decoded."""
    head, _, _ = raw.partition(b"\r\n\r\n")
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", head).decode("ascii")
    return [(name, value.lstrip(" \t")) for name, _, value in
            (line.partition(":") for line in unfolded.split("\r\n"))]  # fmt: skip


def assert_literal(
    raw: bytes,
    *,
    subject: str = "New notification: welcome",
    from_name: str = "Notifier",
    text: str = TEXT,
    headers: list[str] = WIRE_HEADERS,
) -> None:
    """`raw` has exactly the service's headers, in order, each read back as it was given."""
    assert raw.isascii()
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    fields = dict(raw_headers(raw))
    assert [name for name, _ in raw_headers(raw)] == headers
    parsed = read_wire(raw)
    assert list(parsed.keys()) == headers
    assert parsed["Subject"] == subject
    (sender,) = parsed["From"].addresses
    assert sender.addr_spec == FROM
    # The display name as an RFC 2047 reader shows it (see FROM_NAME_ATTACKS).
    assert str(make_header(decode_header(fields["From"]))) == f"{from_name} <{FROM}>"
    assert [a.addr_spec for a in parsed["To"].addresses] == ["user@example.com"]
    assert parsed["Message-ID"] == "<n1.abc@example.com>"
    if not parsed.is_multipart():
        assert content(parsed) == text


@pytest.mark.parametrize("subject", SUBJECT_ATTACKS)
def test_encoded_words_in_the_subject_stay_literal_text(subject: str) -> None:
    assert_literal(wire(message(subject=subject)), subject=subject)


@pytest.mark.parametrize("name", FROM_NAME_ATTACKS)
def test_encoded_words_in_the_from_name_stay_literal_text(name: str) -> None:
    raw = wire(build_message(outgoing(), from_email=FROM, from_name=name))
    assert_literal(raw, from_name=name)
    (sender,) = read_wire(raw)["From"].addresses
    assert sender.display_name == name


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("nul\x00inside", id="NUL"),
        pytest.param("tab\there", id="TAB"),
        pytest.param("  leading and trailing  ", id="spaces"),
        pytest.param("two  spaces", id="double-space"),
        pytest.param("=?", id="opener-only"),
        pytest.param("?= =? ?=", id="fragments"),
        pytest.param('ACME, Inc. "Alerts" <x@evil.example>', id="specials"),
        pytest.param("=?utf-8?q?x?=" * 40, id="long-words"),
        pytest.param(("Grüße, =?utf-8?q?=0D=0A?= 日本 " * 30).strip(), id="long-mixed"),
        pytest.param("word " * 150 + "end", id="long-plain"),
        pytest.param("x" * 900, id="long-token"),
        *OTHER_ATTACKS,
    ],
)
def test_any_subject_or_from_name_reads_back_exactly(value: str) -> None:
    msg = build_message(outgoing(subject=value), from_email=FROM, from_name=value)
    assert_literal(wire(msg), subject=value, from_name=value)


def test_plain_ascii_values_are_written_as_they_are() -> None:
    # Only what needs it is encoded: plain subjects stay readable (and unsuspicious to
    # spam filters) on the wire.
    head = wire(message()).partition(b"\r\n\r\n")[0]
    assert b"\r\nSubject: New notification: welcome\r\n" in head
    assert head.startswith(b"From: Notifier <notifications@example.com>\r\n")


def test_html_message_headers_stay_literal_too() -> None:
    subject = "=?utf-8?q?Hi=0D=0A=0D=0A<b>body</b>?="
    raw = wire(message(subject=subject, html="<p>Rich</p>\n"))
    headers = ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
    assert_literal(raw, subject=subject, headers=headers)
    assert [content(p) for p in read_wire(raw).iter_parts()] == [TEXT, "<p>Rich</p>\n"]


def test_headers_read_from_the_built_message_are_the_literal_values() -> None:
    subject = "=?utf-8?q?Hi=0D=0AX-Evil:_1?="
    msg = build_message(outgoing(subject=subject), from_email=FROM, from_name=subject)
    assert msg["Subject"] == subject
    assert msg["To"] == "user@example.com"
    assert "X-Evil" not in msg
    assert_literal(copy.deepcopy(msg).as_bytes(), subject=subject, from_name=subject)


def test_template_data_in_the_subject_stays_literal(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(PACKAGE_TEMPLATES, templates)
    (templates / "registration.subject.txt").write_text("Welcome, {{ user.name }}: {{ data.x }}\n")
    name = "=?utf-8?q?Eve=0D=0AReply-To:attacker@evil.example?="
    rendered = EmailTemplates(templates).render(
        "registration",
        [
            {
                "id": "0" * 24,
                "timestamp": 0,
                "is_new": True,
                "user_id": "0" * 24,
                "key": "registration",
                "target_id": None,
                "data": {"x": "=?UTF-8?B?DQoNCm1vdmVkIHRvIHRoZSBib2R5?="},
            }
        ],
        {"_id": "0" * 24, "email": "user@example.com", "name": name},
    )
    assert rendered.subject == f"Welcome, {name}: =?UTF-8?B?DQoNCm1vdmVkIHRvIHRoZSBib2R5?="
    msg = build_message(
        outgoing(subject=rendered.subject, text=rendered.text, html=rendered.html),
        from_email=FROM,
        from_name="Notifier",
    )
    parsed = read_wire(wire(msg))
    assert "Reply-To" not in parsed
    assert parsed["Subject"] == rendered.subject
    assert content(parsed.get_body(("plain",))) == rendered.text.replace("\r\n", "\n")


@pytest.mark.parametrize(
    "to",
    [
        "=?utf-8?q?a=0D=0ABcc=3Avictim=40example.com?=@example.com",
        "a=?utf-8?q?=0D=0ABcc=3Avictim=40example.com?=@example.com",
        "=?UTF-8?B?YQ0KQmNjOiB2aWN0aW1AZXhhbXBsZS5jb20=?=@example.com",
    ],
)
def test_an_encoded_word_in_the_to_address_is_refused(to: str) -> None:
    # An address cannot be RFC 2047-encoded (RFC 2047 section 5), so the only literal
    # form is the bare token, and a reader that decodes it anyway would show a forged
    # one. Nothing legitimate looks like that: refuse it by name.
    with pytest.raises(ValueError, match="encoded word"):
        message(to=to)


def test_an_encoded_word_in_the_message_id_is_refused() -> None:
    with pytest.raises(ValueError, match="message_id"):
        message(message_id="<=?utf-8?q?a=0D=0AX-Evil:1?=@example.com>")


def test_encoded_words_reach_the_smtp_server_as_literal_text(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    subject = "=?utf-8?q?Hi=0D=0AReply-To:attacker@evil.example=0D=0A=0D=0Amoved?="
    name = "=?UTF-8?B?T3BzDQpCY2M6IHZpY3RpbUBleGFtcGxlLmNvbQ==?="
    msg = build_message(outgoing(subject=subject), from_email=FROM, from_name=name)
    make_sender(smtp_server).send(msg)
    (got,) = smtp_server.wait_for_messages(1)
    assert got.rcpt_tos == ["user@example.com"]
    assert got.data == wire(msg)
    assert_literal(got.data, subject=subject, from_name=name)


def test_encoded_words_sent_through_the_api_arrive_as_literal_text(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_server: SmtpServer,
    db: Any,
) -> None:
    name = "=?iso-8859-1?q?Ops=0D=0ABcc:_victim@example.com?="
    app = make_app(
        make_config(
            **smtp_server.config_kwargs(),
            smtp_email=FROM,
            smtp_name=name,
            dispatcher_threads=1,
            dispatch_poll_seconds=0.05,
        )
    )
    client = app.test_client()
    subject = "=?utf-8?q?Hi=0D=0AReply-To:attacker@evil.example=0D=0A=0D=0Amoved?="
    body = {"to": "user@example.com", "subject": subject, "text": TEXT}
    assert client.post("/email", json=body).status_code == 202
    # A literal line break is still refused at the edge, before anything is queued.
    refused = client.post("/email", json={**body, "subject": "Hi\r\nBcc: victim@example.com"})
    assert refused.status_code == 422
    assert db.email_outbox.count_documents({}) == 1
    (got,) = smtp_server.wait_for_messages(1)
    parsed = read_wire(got.data)
    assert list(parsed.keys()) == WIRE_HEADERS
    assert parsed["Subject"] == subject
    assert [a.addr_spec for a in parsed["From"].addresses] == [FROM]
    from_field = dict(raw_headers(got.data))["From"]
    assert str(make_header(decode_header(from_field))) == f"{name} <{FROM}>"
    assert content(parsed) == TEXT


# -- settings and the security table --------------------------------------------


@pytest.mark.parametrize(
    ("security", "port", "mode"),
    [
        ("auto", 465, "implicit"),
        ("auto", 587, "starttls"),
        ("auto", 25, "starttls-if-offered"),
        ("auto", 2525, "starttls-if-offered"),
        ("ssl", 2525, "implicit"),
        ("starttls", 465, "starttls"),
        ("none", 587, "plain"),
        ("none", 465, "plain"),
    ],
)
def test_tls_mode_table(security: Any, port: int, mode: str) -> None:
    assert tls_mode(security, port) == mode


def test_settings_from_config_use_the_resolved_port() -> None:
    s = SmtpSettings.from_config(Config(smtp_host="mail.example.com", smtp_security="ssl"))
    assert (s.host, s.port, s.security) == ("mail.example.com", 465, "ssl")
    assert (s.verify, s.timeout, s.max_per_connection) == (True, 10.0, 100)


def test_settings_from_config_without_host_is_refused() -> None:
    with pytest.raises(ValueError, match="SMTP_HOST"):
        SmtpSettings.from_config(Config())


def test_password_is_not_in_the_settings_repr() -> None:
    assert "hunter2" not in repr(settings(login="u", password="hunter2"))


def test_password_is_not_in_the_settings_as_a_dict_or_json() -> None:
    held = settings(login="u", password="hunter2")
    assert "hunter2" not in str(dataclasses.asdict(held))
    assert "hunter2" not in json.dumps(dataclasses.asdict(held), default=str)


# -- classify --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "permanent", "code"),
    [
        (smtplib.SMTPDataError(554, b"5.6.0 rejected"), True, 554),
        (smtplib.SMTPDataError(451, b"4.3.0 later"), False, 451),
        (smtplib.SMTPSenderRefused(553, b"5.7.1 not yours", FROM), True, 553),
        (smtplib.SMTPSenderRefused(530, b"5.7.0 Authentication required", FROM), False, 530),
        (smtplib.SMTPRecipientsRefused({"a@x": (550, b"no"), "b@x": (551, b"no")}), True, 550),
        (smtplib.SMTPRecipientsRefused({"a@x": (550, b"no"), "b@x": (452, b"full")}), False, 550),
        (smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials"), False, 535),
        (smtplib.SMTPConnectError(554, b"no service"), False, 554),
        (smtplib.SMTPServerDisconnected("gone"), False, None),
        (smtplib.SMTPNotSupportedError("STARTTLS extension not supported"), False, None),
        (ssl.SSLCertVerificationError("certificate verify failed"), False, None),
        (ConnectionRefusedError(111, "Connection refused"), False, None),
        (TimeoutError("timed out"), False, None),
        (OSError(101, "Network is unreachable"), False, None),
    ],
)
def test_classify_says_whether_a_retry_can_help(
    exc: BaseException, permanent: bool, code: int | None
) -> None:
    error = classify(exc)
    assert (error.permanent, error.code) == (permanent, code)


def test_send_error_keeps_the_server_reply() -> None:
    error = classify(smtplib.SMTPDataError(550, b"5.1.1 <x@example.com>: no such user"))
    assert error.reply == "5.1.1 <x@example.com>: no such user"
    assert str(error) == "permanent SMTP failure 550: 5.1.1 <x@example.com>: no such user"


# -- sending to real servers -------------------------------------------------------


def test_plain_send_delivers_the_exact_bytes(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    # A leading dot must survive SMTP's dot-stuffing; non-ASCII must survive encoding.
    msg = message(text=".leading dot\nGrüße\n", html="<p>Grüße</p>")
    make_sender(smtp_server).send(msg)

    (got,) = smtp_server.messages
    assert got.mail_from == FROM
    assert got.rcpt_tos == ["user@example.com"]
    assert got.data == msg.as_bytes(policy=policy.SMTP)
    assert got.message["Message-ID"] == "<n1.abc@example.com>"
    assert content(got.message.get_body(("plain",))) == ".leading dot\nGrüße\n"
    assert not got.tls


def test_auth_logs_in_when_login_is_set(
    smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(auth=True)
    make_sender(server).send(message())
    assert [m.login for m in server.messages] == [SMTP_USER]


def test_non_ascii_password_is_sent_as_utf8(
    smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(auth=True, password="pässwörd-€")
    make_sender(server).send(message())
    assert [m.login for m in server.messages] == [SMTP_USER]


@pytest.mark.parametrize("password", ["wrong", "wröng"])
def test_wrong_password_is_a_transient_error(
    password: str, smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(auth=True)
    error = send_error(make_sender(server, password=password))
    assert (error.permanent, error.code) == (False, 535)
    assert server.messages == []


def test_missing_login_on_a_server_requiring_auth_is_transient(
    smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(auth=True)
    error = send_error(make_sender(server, login=None, password=None))
    assert (error.permanent, error.code) == (False, 530)


def test_auto_mode_upgrades_with_starttls_when_offered(
    smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(tls="starttls", auth=True)  # AUTH is offered only after TLS
    make_sender(server, security="auto").send(message())
    (got,) = server.messages
    assert got.tls
    assert got.login == SMTP_USER


def test_auto_mode_stays_plain_when_starttls_is_not_offered(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    make_sender(smtp_server, security="auto").send(message())
    assert [m.tls for m in smtp_server.messages] == [False]


def test_implicit_tls_with_auth(
    smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(tls="implicit", auth=True)
    make_sender(server, security="ssl").send(message())
    (got,) = server.messages
    assert got.tls
    assert got.login == SMTP_USER


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_untrusted_certificate_is_a_transient_error(
    tls: str, smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(tls=tls)
    error = send_error(make_sender(server, ca_file=None))  # system CAs don't know the test CA
    assert not error.permanent
    assert "CERTIFICATE_VERIFY_FAILED" in error.reply
    assert server.messages == []


def test_certificate_for_another_host_name_is_refused(
    smtp_factory: Callable[..., SmtpServer],
    make_sender: Callable[..., SmtpSender],
    smtp_trustme_ca: trustme.CA,
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    smtp_trustme_ca.issue_cert("mail.example.com").configure_cert(context)
    server = smtp_factory(tls="implicit", server_context=context)
    error = send_error(make_sender(server))  # trusts the CA, but connects to 127.0.0.1
    assert not error.permanent
    assert "IP address mismatch" in error.reply
    assert server.messages == []


def test_verify_off_accepts_an_untrusted_certificate(
    smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(tls="starttls")
    make_sender(server, ca_file=None, verify=False).send(message())
    assert [m.tls for m in server.messages] == [True]


def test_required_starttls_not_offered_is_a_transient_error(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    error = send_error(make_sender(smtp_server, security="starttls"))
    assert not error.permanent
    assert "STARTTLS" in error.reply
    assert smtp_server.messages == []


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
def test_4xx_reply_is_transient_and_the_next_send_goes_through(
    stage: str, smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(fail_first=1, fail_code=451, fail_at=stage)
    sender = make_sender(server)
    error = send_error(sender)
    assert (error.permanent, error.code) == (False, 451)
    assert "Try again later" in error.reply
    sender.send(message())
    assert len(server.messages) == 1
    assert server.connections == 2  # a failure ends the connection


@pytest.mark.parametrize(("stage", "code"), [("RCPT", 550), ("DATA", 554)])
def test_5xx_reply_is_permanent_with_the_reply_stored(
    stage: str,
    code: int,
    smtp_factory: Callable[..., SmtpServer],
    make_sender: Callable[..., SmtpSender],
) -> None:
    server = smtp_factory(permanent_code=code, fail_at=stage)
    error = send_error(make_sender(server))
    assert (error.permanent, error.code) == (True, code)
    assert "Mailbox unavailable (scripted)" in error.reply
    assert server.messages == []


def test_connection_refused_is_transient(make_sender: Callable[..., SmtpSender]) -> None:
    error = send_error(make_sender(port=free_port()))  # nothing listens there
    assert (error.permanent, error.code) == (False, None)
    assert "ConnectionRefusedError" in error.reply


def test_silent_server_times_out_as_a_transient_error(
    make_sender: Callable[..., SmtpSender],
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel accepts; nobody ever says 220
        sender = make_sender(port=listener.getsockname()[1], timeout=0.3)
        started = time.monotonic()
        error = send_error(sender)
    assert time.monotonic() - started < 3
    assert not error.permanent
    assert "timed out" in error.reply


def test_consecutive_sends_reuse_one_connection(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    sender = make_sender(smtp_server)
    for i in range(3):
        sender.send(message(message_id=f"<m{i}@example.com>"))
    assert smtp_server.connections == 1
    assert [m.connection for m in smtp_server.messages] == [1, 1, 1]
    assert smtp_server.quits == 0


def test_max_per_connection_starts_a_new_connection(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    sender = make_sender(smtp_server, max_per_connection=2)
    for i in range(5):
        sender.send(message(message_id=f"<m{i}@example.com>"))
    assert [m.connection for m in smtp_server.messages] == [1, 1, 2, 2, 3]
    assert smtp_server.quits == 2  # the full connections were closed politely
    sender.close()
    assert smtp_server.quits == 3


def test_dropped_idle_connection_is_replaced_and_the_send_retried(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    sender = make_sender(smtp_server)
    sender.send(message(message_id="<first@example.com>"))
    smtp_server.drop_connections()
    sender.send(message(message_id="<second@example.com>"))
    assert [m.message["Message-ID"] for m in smtp_server.messages] == [
        "<first@example.com>",
        "<second@example.com>",
    ]
    assert [m.connection for m in smtp_server.messages] == [1, 2]


@pytest.mark.parametrize("tls", ["none", "starttls"])
def test_idle_connection_closed_with_421_is_replaced_and_the_send_retried(
    tls: str, smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(tls=tls)
    sender = make_sender(server)
    sender.send(message())
    server.drop_connections(reply="421 4.4.2 smtp.test Error: timeout exceeded")
    sender.send(message())
    assert [m.connection for m in server.messages] == [1, 2]


def test_421_on_a_new_connection_is_not_retried(
    smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(fail_first=1, fail_code=421, fail_at="RCPT")
    error = send_error(make_sender(server))
    assert (error.permanent, error.code) == (False, 421)
    assert server.connections == 1


def test_dropped_tls_connection_is_replaced_too(
    smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    server = smtp_factory(tls="starttls", auth=True)
    sender = make_sender(server)
    sender.send(message())
    server.drop_connections()
    sender.send(message())
    assert [(m.connection, m.tls) for m in server.messages] == [(1, True), (2, True)]


def test_server_down_is_transient_and_sending_resumes_when_it_is_back(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    sender = make_sender(smtp_server)
    sender.send(message())
    smtp_server.stop()
    # The reused connection is dead and the one retry finds nobody listening.
    error = send_error(sender)
    assert not error.permanent
    smtp_server.start()
    sender.send(message())
    assert len(smtp_server.messages) == 2


def test_close_says_quit_and_leaves_the_sender_usable(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    sender = make_sender(smtp_server)
    sender.close()  # nothing to close yet
    sender.send(message())
    sender.close()
    assert smtp_server.quits == 1
    sender.send(message())
    assert smtp_server.connections == 2


def test_close_never_raises_when_the_server_is_gone(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    sender = make_sender(smtp_server)
    sender.send(message())
    smtp_server.stop()
    sender.close()
    sender.close()


def test_context_manager_closes_the_connection(smtp_server: SmtpServer) -> None:
    with SmtpSender(settings(smtp_server)) as sender:
        sender.send(message())
    assert smtp_server.quits == 1


def test_message_without_a_to_address_is_a_permanent_error(
    smtp_server: SmtpServer, make_sender: Callable[..., SmtpSender]
) -> None:
    msg = message()
    del msg["To"]
    error = send_error(make_sender(smtp_server), msg)
    assert error.permanent
    assert smtp_server.connections == 0


def test_bad_ca_file_fails_when_the_sender_is_made(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        SmtpSender(settings(security="starttls", ca_file=str(tmp_path / "missing.pem")))


@pytest.mark.parametrize(
    ("tls", "auth"), [("none", False), ("none", True), ("starttls", True), ("implicit", True)]
)
def test_sender_from_config_reaches_the_fixture_server(
    tls: str, auth: bool, smtp_factory: Callable[..., SmtpServer]
) -> None:
    server = smtp_factory(tls=tls, auth=auth)
    from_env = Config.from_env(server.env(), dotenv=False)
    assert from_env == Config(**server.config_kwargs())
    with SmtpSender(SmtpSettings.from_config(from_env)) as sender:
        sender.send(message())
    (got,) = server.wait_for_messages(1)
    assert got.tls == (tls != "none")
    assert got.login == (SMTP_USER if auth else None)


# -- no cleartext password off this machine (SMTP_SECURITY=auto) -------------------


@pytest.fixture
def own_address() -> str:
    """A non-loopback IPv4 address of this machine, to be a server that is not local."""
    try:
        words = subprocess.run(
            ["hostname", "-I"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        words = []
    for word in words:
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(word)
            if address.version == 4 and not address.is_loopback:
                return word
    pytest.skip("this machine has no non-loopback IPv4 address (hostname -I)")


def secrets_on_the_wire(password: str) -> list[bytes]:
    """The forms a password takes in AUTH PLAIN and AUTH LOGIN, and the password itself."""
    return [
        password.encode(),
        base64.b64encode(password.encode()),
        base64.b64encode(f"\0{SMTP_USER}\0{password}".encode()),
    ]


def commands(server: SmtpServer) -> list[bytes]:
    return [line.split(b" ")[0].upper() for line in server.received.split(b"\r\n") if line]


def test_auto_refuses_a_cleartext_login_to_a_server_off_this_machines_loopback(
    smtp_factory: Callable[..., SmtpServer],
    make_sender: Callable[..., SmtpSender],
    own_address: str,
) -> None:
    server = smtp_factory(auth=True, host=own_address)  # offers AUTH, no STARTTLS
    error = send_error(make_sender(server, host=own_address, security="auto"))
    # Configuration the operator fixes: the email waits for it instead of failing.
    assert not error.permanent
    assert error.reply == (
        f"SMTP_SECURITY=auto: the server at {own_address}:{server.port} offers no STARTTLS; "
        "refusing to send SMTP_LOGIN's password in cleartext; "
        "set SMTP_SECURITY=none to allow it on purpose"
    )
    assert server.messages == []
    assert commands(server)[0] == b"EHLO"  # the recording works: it saw the greeting
    assert b"AUTH" not in commands(server)
    for secret in secrets_on_the_wire(server.password):
        assert secret not in server.received


def test_security_none_still_sends_a_cleartext_login_on_purpose(
    smtp_factory: Callable[..., SmtpServer],
    make_sender: Callable[..., SmtpSender],
    own_address: str,
) -> None:
    server = smtp_factory(auth=True, host=own_address)
    make_sender(server, host=own_address, security="none").send(message())
    assert [m.login for m in server.messages] == [SMTP_USER]
    assert b"AUTH" in commands(server)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_auto_logs_in_in_cleartext_on_loopback(
    host: str, smtp_factory: Callable[..., SmtpServer], make_sender: Callable[..., SmtpSender]
) -> None:
    # A local relay (or make run's sink) is reached without leaving the machine.
    server = smtp_factory(auth=True, host="::1" if host == "::1" else "127.0.0.1")
    make_sender(server, host=host, security="auto").send(message())
    assert [(m.login, m.tls) for m in server.messages] == [(SMTP_USER, False)]


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.2", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::ffff:192.0.2.2", False),
        ("fe80::1%eth0", False),
        ("localhost", False),  # a name, not an address a socket reports
        ("", False),
    ],
)
def test_only_a_loopback_peer_may_get_a_cleartext_password(peer: str, loopback: bool) -> None:
    assert is_loopback(peer) is loopback
