"""Per-key email templates: content, escaping, operator overrides, start-up errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from notification_service.email_templates import PACKAGE_TEMPLATES, EmailTemplates, TemplateError
from notification_service.keys import DEFAULT_KEYS
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
