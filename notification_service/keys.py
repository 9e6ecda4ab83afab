"""The table of notification keys and what each one does (SPEC §3, issue 17).

The table is data: `KEYS_FILE` names a TOML file that replaces the built-in one
(`DEFAULT_KEYS`, the seed's four keys with their exact behaviour). The request models
validate a key against the table the app runs with, the domain follows its channels,
and the templates of each key that emails are loaded (and checked) at start.

A file is refused whole, before the service starts, with a message naming the file,
the key and the field, so an operator never runs with half a table.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

EmailMode = Literal["never", "always", "if_unread"]
EMAIL_MODES: tuple[str, ...] = get_args(EmailMode)

# A key is a metrics label, a path segment of the preferences in the user's document
# and a template name: lower-case ASCII keeps it safe in all three.
KEY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
KEY_NAME_PATTERN = "^[a-z][a-z0-9_]{0,63}$"
# A template name becomes three file names in TEMPLATES_DIR: no separators, no dots.
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

DEFAULT_EMAIL_AFTER_SECONDS = 900


@dataclass(frozen=True)
class KeySpec:
    """What a create of one key does: store it in the inbox, email it, or both."""

    name: str
    in_app: bool
    email: EmailMode
    email_after_seconds: int = DEFAULT_EMAIL_AFTER_SECONDS  # only meaningful for if_unread
    mandatory: bool = False  # the user cannot turn it off
    template: str | None = None  # None: the package's generic template

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this key uses, in a fixed order: `in_app` then `email`."""
        used = (("in_app", self.in_app), ("email", self.email != "never"))
        return tuple(name for name, on in used if on)

    @property
    def emails(self) -> bool:
        return self.email != "never"


class KeysFileError(ValueError):
    """A KEYS_FILE that cannot be used; the message names the file, the key and the field."""

    def __init__(
        self, path: str | Path, problem: str, *, key: str | None = None, field: str | None = None
    ) -> None:
        self.path = str(path)
        self.key = key
        self.field = field
        where = "".join(
            [f" key {key!r}" if key is not None else "", f" field {field!r}" if field else ""]
        )
        super().__init__(f"{self.path}:{where}: {problem}" if where else f"{self.path}: {problem}")


class KeyTable:
    """An immutable, ordered table of keys (the order is the file's, or the seed's)."""

    __slots__ = ("_specs", "emailing", "names")

    def __init__(self, specs: Iterable[KeySpec]) -> None:
        table: dict[str, KeySpec] = {}
        for spec in specs:
            if spec.name in table:
                raise ValueError(f"key {spec.name!r} is defined twice")
            table[spec.name] = spec
        self._specs: Mapping[str, KeySpec] = table
        self.names: tuple[str, ...] = tuple(table)
        self.emailing: tuple[KeySpec, ...] = tuple(s for s in table.values() if s.emails)

    def get(self, name: str) -> KeySpec:
        """The spec of `name`; :raise KeyError: when the table has no such key."""
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def mandatory(self, name: str) -> bool:
        """Whether `name` is a mandatory key of the table (an unknown one is not)."""
        spec = self._specs.get(name)
        return spec is not None and spec.mandatory

    def __iter__(self) -> Iterator[KeySpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyTable):
            return NotImplemented
        return tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        # Short: it shows in the Config's repr.
        return f"KeyTable({', '.join(self.names)})"

    @classmethod
    def load(cls, path: str | Path, *, max_age_seconds: float) -> KeyTable:
        """Read a KEYS_FILE. `max_age_seconds` (DISPATCH_MAX_AGE_SECONDS) bounds
        `email_after_seconds`: a later due time would only be given up.

        :raise KeysFileError: naming the file, and the key and field when one is at fault.
        """
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise KeysFileError(
                path, f"cannot be read ({exc.strerror or type(exc).__name__})"
            ) from exc
        try:
            document = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise KeysFileError(path, "is not UTF-8 text") from exc
        except tomllib.TOMLDecodeError as exc:
            raise KeysFileError(path, f"is not valid TOML ({exc})") from exc
        return cls.from_document(document, path=path, max_age_seconds=max_age_seconds)

    @classmethod
    def from_document(
        cls, document: Mapping[str, Any], *, path: str | Path, max_age_seconds: float
    ) -> KeyTable:
        """Build a table from parsed TOML (`{"keys": {name: {field: value}}}`)."""
        extra = sorted(set(document) - {"keys"})
        if extra:
            raise KeysFileError(path, f"unknown top-level entry {extra[0]!r}; only [keys] is read")
        keys = document.get("keys")
        if not isinstance(keys, dict):
            raise KeysFileError(path, "has no [keys] table (write [keys.<name>] sections)")
        if not keys:
            raise KeysFileError(path, "[keys] defines no key")
        return cls(_spec(path, name, fields, max_age_seconds) for name, fields in keys.items())


_FIELDS: dict[str, type] = {
    "in_app": bool,
    "email": str,
    "email_after_seconds": int,
    "mandatory": bool,
    "template": str,
}


def _spec(path: str | Path, name: str, fields: object, max_age_seconds: float) -> KeySpec:
    def refuse(problem: str, field: str | None = None) -> KeysFileError:
        return KeysFileError(path, problem, key=name, field=field)

    if not KEY_NAME.fullmatch(name):
        raise refuse(f"a key name must match {KEY_NAME_PATTERN}")
    if not isinstance(fields, dict):
        raise refuse("must be a table ([keys.<name>] with fields)")
    for field, value in fields.items():
        expected = _FIELDS.get(field)
        if expected is None:
            raise refuse(f"unknown field; the fields are {', '.join(_FIELDS)}", field)
        # bool is an int in Python; TOML's true must not pass for a number of seconds.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise refuse(f"must be {_TYPE_NAMES[expected]}, not {type(value).__name__}", field)
    for field in ("in_app", "email"):
        if field not in fields:
            raise refuse("is required", field)
    in_app: bool = fields["in_app"]
    email: str = fields["email"]
    if email not in EMAIL_MODES:
        raise refuse(f"must be one of {', '.join(map(repr, EMAIL_MODES))}, not {email!r}", "email")
    if email == "if_unread" and not in_app:
        raise refuse('email = "if_unread" needs in_app = true (nothing to read otherwise)', "email")
    if not in_app and email == "never":
        raise refuse('no channel: set in_app = true, or email to "always" or "if_unread"', "in_app")
    after = fields.get("email_after_seconds", DEFAULT_EMAIL_AFTER_SECONDS)
    if not 1 <= after <= max_age_seconds:
        raise refuse(
            f"must be from 1 to {max_age_seconds:g} (DISPATCH_MAX_AGE_SECONDS), not {after}",
            "email_after_seconds",
        )
    if "email_after_seconds" in fields and email != "if_unread":
        raise refuse('only applies to email = "if_unread"', "email_after_seconds")
    template = fields.get("template")
    if template is not None:
        if email == "never":
            raise refuse("a key that never emails has no template", "template")
        if not TEMPLATE_NAME.fullmatch(template):
            raise refuse(f"must match {TEMPLATE_NAME.pattern} (a file name stem)", "template")
    return KeySpec(
        name=name,
        in_app=in_app,
        email=email,  # type: ignore[arg-type]  # checked against EMAIL_MODES above
        email_after_seconds=after,
        mandatory=fields.get("mandatory", False),
        template=template,
    )


_TYPE_NAMES = {bool: "true or false", str: "a string", int: "an integer"}


DEFAULT_KEYS = KeyTable(
    [
        KeySpec(
            "registration", in_app=False, email="always", mandatory=True, template="registration"
        ),
        KeySpec("new_message", in_app=True, email="never"),
        KeySpec("new_post", in_app=True, email="never"),
        KeySpec("new_login", in_app=True, email="always", mandatory=True, template="new_login"),
    ]
)
