"""Email templates of the keys that send email (subject, plain text, HTML), rendered
when an email is queued (or, for a digest, when it falls due).

Rendering into the outbox record makes each record self-contained: a retry days later
sends exactly what was rendered, and a template error shows up at start-up, not in a
dispatcher's log. Each key that emails names its template in the key table
(`template = "x"`: `x.subject.txt`, `x.txt`, `x.html` in TEMPLATES_DIR, or in the
package's templates/email without it); a key without one uses the package's `generic`
template, which names the key and lists the notifications' data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from .keys import DEFAULT_KEYS, KeySpec, KeyTable
from .schemas import Notification

PARTS = ("subject.txt", "txt", "html")
PACKAGE_TEMPLATES = Path(__file__).parent / "templates" / "email"
GENERIC = "generic"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


class TemplateError(ValueError):
    """A template is missing or broken; raised at start-up."""


@dataclass(frozen=True)
class EmailContent:
    subject: str
    text: str
    html: str | None


def _utc(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime(TIME_FORMAT)


def _show(value: Any) -> str:
    """A data value as a reader sees it: a string as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _environment(directory: Path, *, html: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        # Only the HTML part is escaped: the subject and the text are plain text, where
        # an entity would show as written.
        autoescape=html,
        keep_trailing_newline=not html,
    )
    env.filters["utc"] = _utc
    env.filters["show"] = _show
    return env


class EmailTemplates:
    """The three parts of each emailing key's template, loaded and checked at start.

    :raise TemplateError: a named template is missing (naming TEMPLATES_DIR's file and
        the key), broken, or fails to render a sample.
    """

    def __init__(self, directory: str | Path | None = None, keys: KeyTable = DEFAULT_KEYS) -> None:
        self.directory = Path(directory) if directory else PACKAGE_TEMPLATES
        self.keys = keys
        own = {html: _environment(self.directory, html=html) for html in (False, True)}
        # `generic` is always the package's: an operator who wants another names it.
        package = {html: _environment(PACKAGE_TEMPLATES, html=html) for html in (False, True)}
        self._templates: dict[tuple[str, str], jinja2.Template] = {}
        for spec in keys.emailing:
            envs, where, name = (
                (package, PACKAGE_TEMPLATES, GENERIC)
                if spec.template is None
                else (own, self.directory, spec.template)
            )
            for part in PARTS:
                self._templates[spec.name, part] = _load(
                    envs[part == "html"], where, name, part, spec
                )
        self._self_check()

    def render(
        self,
        key: str,
        notifications: list[Notification],
        user: dict[str, Any],
        *,
        unsubscribe_url: str | None = None,
    ) -> EmailContent:
        """The email of `notifications` (newest first; one for an `always` key, the
        batch still unread for a digest) of `key` to `user`.

        :raise KeyError: `key` sends no email in the table these templates were loaded for.
        :raise ValueError: `notifications` is empty.
        """
        if not notifications:
            raise ValueError("an email needs at least one notification")
        first = notifications[0]
        context = {
            "key": key,
            "notifications": notifications,
            # One notification's fields, as the seed's templates read them.
            "notification": first,
            "data": first["data"],
            "target_id": first["target_id"],
            "timestamp": first["timestamp"],
            "time": datetime.fromtimestamp(first["timestamp"], UTC),
            "user": {**user, "_id": str(user.get("_id", ""))},
            "unsubscribe_url": unsubscribe_url,
        }
        subject = self._templates[key, "subject.txt"].render(context)
        return EmailContent(
            # A subject is one line: a template's (or the data's) line break must not
            # become a header break. str.split() also splits at \x85, \u2028, \u2029.
            subject=" ".join(subject.split()),
            text=self._templates[key, "txt"].render(context),
            html=self._templates[key, "html"].render(context),
        )

    def _self_check(self) -> None:
        # Render each key once with a sample so runtime template errors (an unknown
        # filter, a bad expression) stop the start, not a send hours later.
        for spec in self.keys.emailing:
            sample: Notification = {
                "id": "0" * 24,
                "timestamp": 0,
                "is_new": True,
                "user_id": "0" * 24,
                "key": spec.name,
                "target_id": None,
                "data": {},
                "count": 1,
                "collapse_key": None,
            }
            try:
                # With and without a link: a template's branch on it must render too.
                for url in (None, "https://example.com/unsubscribe/sample"):
                    self.render(
                        spec.name,
                        [sample],
                        {"_id": "0" * 24, "email": "user@example.com"},
                        unsubscribe_url=url,
                    )
            except jinja2.TemplateError as exc:
                raise TemplateError(
                    f"TEMPLATES_DIR: the templates of key {spec.name!r} "
                    f"({spec.template or GENERIC}) fail to render: {exc}"
                ) from None


def _load(
    env: jinja2.Environment, directory: Path, name: str, part: str, spec: KeySpec
) -> jinja2.Template:
    file = f"{name}.{part}"
    try:
        return env.get_template(file)
    except jinja2.TemplateNotFound:
        raise TemplateError(
            f"TEMPLATES_DIR: {directory / file} is missing (the template of key {spec.name!r})"
        ) from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"TEMPLATES_DIR: {directory / file} line {exc.lineno}: {exc.message} "
            f"(the template of key {spec.name!r})"
        ) from None
