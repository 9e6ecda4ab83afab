"""Per-key email templates: content, escaping, operator overrides, start-up errors."""

from __future__ import annotations

import shutil
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from notification_service.__main__ import check_config
from notification_service.config import Config
from notification_service.email_sender import OutgoingEmail, build_message
from notification_service.email_templates import PACKAGE_TEMPLATES, EmailTemplates, TemplateError
from notification_service.keys import DEFAULT_KEYS, KeySpec, KeyTable
from notification_service.schemas import Notification


def notification(key: str, **data: Any) -> Notification:
    return {
        "id": "6b0a66bf91db4e783fd745a3",
        "timestamp": 1_700_000_000,
        "is_new": True,
        "user_id": "638f394d4b7243fc0399ea67",
        "key": key,
        "target_id": "0399ea67638f394d4b7243fc",
        "data": data,
    }


USER = {"_id": "638f394d4b7243fc0399ea67", "email": "u@example.com", "name": "Zoë"}


@pytest.mark.parametrize("key", [spec.name for spec in DEFAULT_KEYS.emailing])
def test_default_templates_name_the_key_in_subject_and_body(key: str) -> None:
    content = EmailTemplates().render(key, [notification(key)], USER)
    assert key in content.subject
    assert key in content.text
    assert content.html is not None and key in content.html
    assert "Zoë" in content.text
    assert "0399ea67638f394d4b7243fc" in content.text
    assert "2023-11-14 22:13:20 UTC" in content.text


def test_html_is_autoescaped_and_text_is_not() -> None:
    content = EmailTemplates().render("new_login", [notification("new_login", ip="<script>")], USER)
    assert "ip: <script>" in content.text
    assert content.html is not None
    assert "&lt;script&gt;" in content.html and "<script>" not in content.html


@pytest.fixture
def own_templates(tmp_path: Path) -> Path:
    for path in PACKAGE_TEMPLATES.iterdir():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def test_templates_dir_overrides_and_a_subject_stays_one_line(own_templates: Path) -> None:
    (own_templates / "registration.subject.txt").write_text("Hi {{ user.name }}\n\nfrom {{ key }}")
    content = EmailTemplates(own_templates).render(
        "registration", [notification("registration")], USER
    )
    assert content.subject == "Hi Zoë from registration"


def test_missing_template_stops_the_start_naming_the_file(own_templates: Path) -> None:
    (own_templates / "new_login.html").unlink()
    with pytest.raises(TemplateError, match=r"TEMPLATES_DIR: .*new_login\.html is missing"):
        EmailTemplates(own_templates)


def test_broken_template_syntax_stops_the_start(own_templates: Path) -> None:
    (own_templates / "registration.txt").write_text("Hello {% if %}")
    with pytest.raises(TemplateError, match=r"registration\.txt line 1"):
        EmailTemplates(own_templates)


def test_template_failing_to_render_stops_the_start(own_templates: Path) -> None:
    (own_templates / "new_login.txt").write_text("{{ key | no_such_filter }}")
    with pytest.raises(TemplateError, match="new_login"):
        EmailTemplates(own_templates)


# --- templates from the key table ---------------------------------------------------------

GENERIC_KEYS = KeyTable(
    [
        KeySpec("weekly_report", in_app=False, email="always", mandatory=True),
        KeySpec("new_comment", in_app=True, email="if_unread"),
    ]
)
HOSTILE = '</td><script>alert(1)</script><a href="https://evil.example">x</a>'


def test_a_key_without_a_template_gets_the_generic_one_listing_each_notifications_data() -> None:
    first = {**notification("new_comment", title="Re: plans", votes=3, tags=["a", "b"])}
    second = {**notification("new_comment", title="Lunch?"), "id": "1" * 24, "target_id": None}
    content = EmailTemplates(keys=GENERIC_KEYS).render("new_comment", [first, second], USER)
    assert content.subject == "2 new notifications (new_comment)"
    for part in (content.text, content.html or ""):
        assert "new_comment" in part and "Zoë" in part
        assert "Re: plans" in part and "Lunch?" in part
        assert part.index("Re: plans") < part.index("Lunch?")  # newest first, as given
        assert "0399ea67638f394d4b7243fc" in part  # the first one's target
        assert "2023-11-14 22:13:20 UTC" in part
    assert "votes: 3" in content.text and 'tags: ["a", "b"]' in content.text
    one = EmailTemplates(keys=GENERIC_KEYS).render("weekly_report", [notification("x")], USER)
    assert one.subject == "A new notification (weekly_report)"


def test_the_generic_template_escapes_hostile_data_in_html_and_keeps_it_literal_in_text() -> None:
    note = notification("new_comment", **{HOSTILE: HOSTILE, "nested": {"x": HOSTILE}})
    content = EmailTemplates(keys=GENERIC_KEYS).render(
        "new_comment", [note], {**USER, "name": HOSTILE}
    )
    assert content.html is not None
    assert "<script>" not in content.html and "<a href" not in content.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in content.html
    assert "</td><script>" not in content.html
    assert f"{HOSTILE}: {HOSTILE}" in content.text  # text is shown as written


def test_the_unsubscribe_link_is_shown_only_when_given_and_escaped() -> None:
    templates = EmailTemplates(keys=GENERIC_KEYS)
    note = notification("new_comment")
    plain = templates.render("new_comment", [note], USER)
    assert "nsubscribe" not in plain.text and "nsubscribe" not in (plain.html or "")
    url = 'https://notify.example.com/unsubscribe/abc"><script>x</script>'
    linked = templates.render("new_comment", [note], USER, unsubscribe_url=url)
    assert url in linked.text
    assert linked.html is not None
    assert 'href="https://notify.example.com/unsubscribe/abc&#34;&gt;&lt;script&gt;' in linked.html


def test_data_with_line_breaks_in_the_subject_stays_one_line_and_out_of_the_headers(
    own_templates: Path,
) -> None:
    (own_templates / "alert.subject.txt").write_text("Alert: {{ data.title }}\n")
    (own_templates / "alert.txt").write_text("{{ data.title }}\n")
    (own_templates / "alert.html").write_text("<p>{{ data.title }}</p>")
    keys = KeyTable([KeySpec("alert", in_app=False, email="always", template="alert")])
    title = "hi\r\nBcc: victim@example.com\n\nbody\u2028X-Evil: 1\x85Reply-To: a@evil.example"
    content = EmailTemplates(own_templates, keys).render(
        "alert", [notification("alert", title=title)], USER
    )
    assert (
        content.subject
        == "Alert: hi Bcc: victim@example.com body X-Evil: 1 Reply-To: a@evil.example"
    )
    message = build_message(
        OutgoingEmail(
            "u@example.com", content.subject, content.text, content.html, "<a.b@example.com>"
        ),
        from_email="notifications@example.com",
        from_name=None,
    )
    parsed = BytesParser(policy=policy.default).parsebytes(message.as_bytes(policy=policy.SMTP))
    assert parsed["Bcc"] is None and parsed["X-Evil"] is None and parsed["Reply-To"] is None
    assert parsed["To"] == "u@example.com"
    assert "victim@example.com" in parsed["Subject"]


def test_a_missing_named_template_is_refused_naming_the_file_and_the_key(tmp_path: Path) -> None:
    (tmp_path / "weekly.subject.txt").write_text("Week")
    (tmp_path / "weekly.txt").write_text("Week")
    keys = KeyTable([KeySpec("weekly_report", in_app=False, email="always", template="weekly")])
    with pytest.raises(TemplateError) as raised:
        EmailTemplates(tmp_path, keys)
    assert str(raised.value) == (
        f"TEMPLATES_DIR: {tmp_path / 'weekly.html'} is missing "
        "(the template of key 'weekly_report')"
    )


def test_a_key_that_never_emails_needs_no_template(tmp_path: Path) -> None:
    keys = KeyTable([KeySpec("new_comment", in_app=True, email="never")])
    templates = EmailTemplates(tmp_path, keys)  # an empty directory
    with pytest.raises(KeyError):
        templates.render("new_comment", [notification("new_comment")], USER)


def test_an_operator_template_that_fails_to_render_is_refused_at_start(own_templates: Path) -> None:
    (own_templates / "alert.subject.txt").write_text("{{ notifications | no_such_filter }}")
    (own_templates / "alert.txt").write_text("x")
    (own_templates / "alert.html").write_text("x")
    keys = KeyTable([KeySpec("alert", in_app=False, email="always", template="alert")])
    with pytest.raises(TemplateError, match="'alert'"):
        EmailTemplates(own_templates, keys)


def test_check_config_refuses_a_keys_file_whose_named_template_is_missing(
    tmp_path: Path,
) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(
        '[keys.alert]\nin_app = false\nemail = "always"\nmandatory = true\ntemplate = "alert"\n'
    )
    config = Config.from_env({"KEYS_FILE": str(keys_file), "TEMPLATES_DIR": str(tmp_path)})
    with pytest.raises(
        TemplateError, match=r"alert\.subject\.txt is missing \(the template of key 'alert'\)"
    ):
        check_config(config)


def test_a_template_failing_only_beside_an_unsubscribe_link_is_refused_at_start(
    own_templates: Path,
) -> None:
    (own_templates / "alert.subject.txt").write_text("Alert")
    (own_templates / "alert.txt").write_text("{% if unsubscribe_url %}{{ nope() }}{% endif %}")
    (own_templates / "alert.html").write_text("<p>Alert</p>")
    keys = KeyTable([KeySpec("alert", in_app=False, email="always", template="alert")])
    with pytest.raises(TemplateError, match="'alert'"):
        EmailTemplates(own_templates, keys)
