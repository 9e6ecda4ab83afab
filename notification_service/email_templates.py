"""Per-key email templates (subject, plain text, HTML), rendered at enqueue time.

Rendering when the email is queued makes each outbox record self-contained: a retry
days later sends exactly what was queued, and a template error shows up in the API
call (or, better, at start-up) instead of in a dispatcher's log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from .keys import EMAIL_KEYS
from .schemas import Notification

PARTS = ("subject.txt", "txt", "html")
PACKAGE_TEMPLATES = Path(__file__).parent / "templates" / "email"


class TemplateError(ValueError):
    """A template is missing or broken; raised at start-up."""


@dataclass(frozen=True)
class EmailContent:
    subject: str
    text: str
    html: str | None


class EmailTemplates:
    """Loads `<key>.subject.txt`, `<key>.txt` and `<key>.html` for every email key."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else PACKAGE_TEMPLATES
        loader = jinja2.FileSystemLoader(self.directory)
        self._text_env = jinja2.Environment(
            loader=loader, autoescape=False, keep_trailing_newline=True
        )
        self._html_env = jinja2.Environment(loader=loader, autoescape=True)
        self._templates: dict[tuple[str, str], jinja2.Template] = {}
        for key in EMAIL_KEYS:
            for part in PARTS:
                name = f"{key}.{part}"
                env = self._html_env if part == "html" else self._text_env
                try:
                    self._templates[key, part] = env.get_template(name)
                except jinja2.TemplateNotFound:
                    raise TemplateError(
                        f"TEMPLATES_DIR: {self.directory / name} is missing"
                    ) from None
                except jinja2.TemplateSyntaxError as exc:
                    raise TemplateError(
                        f"TEMPLATES_DIR: {self.directory / name} line {exc.lineno}: {exc.message}"
                    ) from None
        self._self_check()

    def render(self, notification: Notification, user: dict[str, Any]) -> EmailContent:
        key = notification["key"]
        context = {
            "key": key,
            "data": notification["data"],
            "target_id": notification["target_id"],
            "timestamp": notification["timestamp"],
            "time": datetime.fromtimestamp(notification["timestamp"], UTC),
            "notification": notification,
            "user": {**user, "_id": str(user.get("_id", ""))},
        }
        subject = self._templates[key, "subject.txt"].render(context)
        return EmailContent(
            # A subject is one line: a template's newline must not become a header break.
            subject=" ".join(subject.split()),
            text=self._templates[key, "txt"].render(context),
            html=self._templates[key, "html"].render(context),
        )

    def _self_check(self) -> None:
        # Render each key once with a sample so runtime template errors (an unknown
        # filter, a bad expression) stop the start, not a send hours later.
        for key in EMAIL_KEYS:
            sample: Notification = {
                "id": "0" * 24,
                "timestamp": 0,
                "is_new": True,
                "user_id": "0" * 24,
                "key": key,
                "target_id": None,
                "data": {},
            }
            try:
                self.render(sample, {"_id": "0" * 24, "email": "user@example.com"})
            except jinja2.TemplateError as exc:
                raise TemplateError(
                    f"TEMPLATES_DIR: {key} templates fail to render: {exc}"
                ) from None
