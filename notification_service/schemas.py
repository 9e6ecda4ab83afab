"""Request and response models: the one place that says what the API accepts and returns.

Pydantic models can later produce the OpenAPI document (SPEC §9). Bodies are parsed in
strict mode so that `{"user_id": {"$ne": null}}` or `123` never pass for a string.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

# pydantic makes JSON schemas only of typing_extensions' TypedDict before Python 3.12.
from typing_extensions import TypeAliasType, TypedDict

from .errors import ValidationFailed
from .keys import DEFAULT_KEYS, KEY_NAME_PATTERN, KeyTable
from .tokens import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, MIN_TTL_SECONDS, TOKEN_MAX_CHARS

DATA_MAX_BYTES = 16 * 1024
DATA_MAX_DEPTH = 32
DEFAULT_LIST_MAX_LIMIT = 100
FAN_OUT_MAX_USERS = 1000
COLLAPSE_KEY_MAX_CHARS = 128
# Printable ASCII without spaces: any id, path or name a client builds of a thread fits
# ("thread:6756b2f1", "/posts/42#comments"), while whitespace, control characters and
# non-ASCII are refused, so two keys that look the same are the same (no trailing
# spaces, no Unicode look-alikes or normalisation forms) and a key shows safely in logs.
# `$` is harmless: the stores take it as a value, never as an expression.
COLLAPSE_KEY_PATTERN = "^[!-~]+$"
# BSON integers are signed 64-bit; a larger JSON number would fail only at the driver.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_OBJECT_ID_RE = re.compile(r"[0-9a-fA-F]{24}")
# Deliberately loose: the SMTP server is the judge of an address; this refuses what
# could never be one, would break a header (spaces, controls, line breaks), cannot be
# sent (a non-ASCII local part needs SMTPUTF8, which email_sender does not speak) or
# that Python's address parser refuses (a dot first or last, or two in a row, in either
# part). Written out, not with `\s`: one pattern for Python and for the document's ECMA
# regex (their `\s` differ: Python's holds \x1c-\x1f and \x85).
_ATEXT = r"\x21\x23-\x27\x2a\x2b\x2d\x2f-\x39\x3d\x3f\x41-\x5a\x5e-\x7e"  # RFC 5322
_LABEL = r"A-Za-z0-9-"
EMAIL_PATTERN = (
    # "=?" could start an RFC 2047 encoded word, which a reader of the To header might
    # decode into line breaks and headers of its own; no real address needs it.
    r"(?!.*\.\.)(?!.*=\?)"
    # Dots inside each part only. No other lookahead: schemathesis generates from the
    # document's pattern, and lookaheads (lengths of parts, say) make it crawl.
    rf"[{_ATEXT}](?:[{_ATEXT}.]{{0,62}}[{_ATEXT}])?"
    rf"@[{_LABEL}](?:[{_LABEL}.]{{0,251}}[{_LABEL}])?"
)
_EMAIL_RE = re.compile(EMAIL_PATTERN)


def is_email_address(value: str) -> bool:
    return _EMAIL_RE.fullmatch(value) is not None


def _object_id(value: str) -> str:
    # fullmatch, not a `$` anchor: `$` would also accept a trailing newline.
    if not _OBJECT_ID_RE.fullmatch(value):
        raise ValueError("must be a 24-character hexadecimal ObjectId")
    return value.lower()


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    _check_value(value, depth=0)
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > DATA_MAX_BYTES:
        raise ValueError(f"is {size} bytes once encoded; at most {DATA_MAX_BYTES} are allowed")
    return value


def _check_value(value: Any, depth: int) -> None:
    if depth > DATA_MAX_DEPTH:
        raise ValueError(f"nests deeper than {DATA_MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if key.startswith("$") or "." in key or "\x00" in key:
                raise ValueError(f"key {key!r} starts with '$' or contains '.' or a NUL")
            _check_text(key)
            _check_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_value(item, depth + 1)
    elif isinstance(value, str):
        _check_text(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError("holds an integer outside the signed 64-bit range")
    elif isinstance(value, float) and not math.isfinite(value):
        # 1e999 parses as infinity, which JSON cannot carry back out.
        raise ValueError("holds a number too large to represent")


def _check_text(value: str) -> None:
    # A lone surrogate ("\ud800" in JSON) parses but cannot be stored as UTF-8.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds text that is not valid Unicode") from None


def _valid_text(value: str) -> str:
    _check_text(value)
    return value


def _email_address(value: str) -> str:
    _check_text(value)
    if len(value) > 254 or not is_email_address(value):
        raise ValueError("must be one email address like name@example.com")
    return value


def _one_line(value: str) -> str:
    # A line break in a header value would let a caller add headers of their own;
    # splitlines() also knows \v, \f, \x85, \u2028..., which the message builder refuses.
    _check_text(value)
    if "\r" in value or "\n" in value or len(value.splitlines()) > 1:
        raise ValueError("must be a single line")
    return value


def _true_or_false(value: Any) -> Any:
    # Only the words JSON itself uses: pydantic's lax booleans would also take "yes",
    # "on", "1" or "f" from a query string, and a typo should not pass for a filter.
    if isinstance(value, str):
        if value not in ("true", "false"):
            raise ValueError("must be true or false")
        return value == "true"
    return value


def _distinct(values: list[str]) -> list[str]:
    # After each id is validated (and lowercased), so "AB…" and "ab…" are one user.
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise ValueError(f"lists {repeated[0]} more than once")
    return values


# The JSON schemas (what OpenAPI shows, and what contract tests generate from) state the
# validators' rules where JSON Schema can; the validators stay the judges.
ObjectIdStr = Annotated[
    str,
    AfterValidator(_object_id),
    WithJsonSchema(
        {"type": "string", "pattern": "^[0-9a-fA-F]{24}$", "examples": ["6756b2f1a4c3e0d9b8f71234"]}
    ),
]
Flag = Annotated[bool, BeforeValidator(_true_or_false)]
EmailAddress = Annotated[
    str,
    AfterValidator(_email_address),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 254,
            "pattern": f"^{EMAIL_PATTERN}$",
            "examples": ["someone@example.com"],
        }
    ),
]


class _SchemaExtra:
    """Keywords added to a type's JSON schema; unlike WithJsonSchema, the type's own
    schema (and the references in it) stays."""

    def __init__(self, **extra: Any) -> None:
        self.extra = extra

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(core_schema), **self.extra}


_JSON_KEY = {"pattern": "^(?![$])[^.\\u0000]*$"}
# What `_check_value` lets through at every depth, as far as JSON Schema can say it: keys
# without `$` first, `.` or NUL; integers in BSON's 64 bits, any other number (JSON
# Schema calls 1e30 an integer too, so one written that way is documented as refused).
# The size and depth limits, counted over the whole, are in JsonObject's description.
JsonValue = TypeAliasType(
    "JsonValue",
    "Annotated[dict[str, JsonValue], _SchemaExtra(propertyNames=_JSON_KEY)]"
    " | list[JsonValue] | str"
    " | Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX)]"
    " | Annotated[float, WithJsonSchema({'type': 'number', 'not': {'type': 'integer'}})]"
    " | bool | None",
)
JsonObject = Annotated[
    dict[str, Any],
    # The schema only: `_json_object` is the judge, with its own messages.
    BeforeValidator(
        lambda value: value,
        json_schema_input_type=Annotated[
            dict[str, JsonValue],
            _SchemaExtra(
                description=f"Any JSON object, stored and listed as given: at most "
                f"{DATA_MAX_BYTES} bytes once encoded, {DATA_MAX_DEPTH} levels deep; no "
                "key, at any depth, starts with `$` or holds `.`; integers fit in 64 bits.",
                propertyNames=_JSON_KEY,
                examples=[{"title": "A new post"}],
            ),
        ],
    ),
    AfterValidator(_json_object),
]


def _known_key(value: str, info: ValidationInfo) -> str:
    # The table is configuration (KEYS_FILE), passed as validation context like
    # LIST_MAX_LIMIT; without one (a model built in a test or a benchmark) the seed's.
    keys: KeyTable = (info.context or {}).get("keys", DEFAULT_KEYS)
    if value not in keys:
        # The code and message pydantic gives a Literal, which this replaced: clients
        # and tests that read the 422's details see no change.
        quoted = [repr(name) for name in keys.names]
        expected = " or ".join(filter(None, [", ".join(quoted[:-1]), *quoted[-1:]]))
        raise PydanticCustomError(
            "literal_error", "Input should be {expected}", {"expected": expected}
        )
    return value


# A key of the app's table. Its JSON schema's enum is the table's (`key_schema`, through
# the models' `schema_overrides`); the pattern says what any table's names look like.
NotificationKey = Annotated[
    str,
    AfterValidator(_known_key),
    WithJsonSchema({"type": "string", "pattern": KEY_NAME_PATTERN}),
]


def key_schema(context: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema keywords a key field gets from the app's table."""
    keys: KeyTable = context.get("keys", DEFAULT_KEYS)
    return {"enum": list(keys.names)}


# The line breaks str.splitlines() knows, which a header must not hold.
_ONE_LINE_PATTERN = "^[^\n\r\u000b\u000c\u001c\u001d\u001e\u0085\u2028\u2029]*$"
Text = Annotated[str, AfterValidator(_valid_text)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _exactly_one(**kinds: str) -> dict[str, Any]:
    """The JSON schema of "exactly one of these fields, not null": null, like an absent
    field, is none (the models' `... | None = None`)."""
    return {
        "oneOf": [
            {"required": [name], "properties": {name: {"type": kind}}}
            for name, kind in kinds.items()
        ]
    }


class _Query(BaseModel):
    # Query values arrive as strings, so integers are parsed (not strict), but
    # unknown parameters are still refused: a typo like `limt=5` must not pass.
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateRequest(_Body):
    """One notification for one user (`user_id`), or for each of `user_ids` (fan-out)."""

    model_config = ConfigDict(json_schema_extra=_exactly_one(user_id="string", user_ids="array"))

    user_id: ObjectIdStr | None = None
    user_ids: (
        Annotated[
            list[ObjectIdStr],
            # uniqueItems says it of equal strings; _distinct also of "AB…" and "ab…".
            Field(
                min_length=1,
                max_length=FAN_OUT_MAX_USERS,
                json_schema_extra={
                    "uniqueItems": True,
                    "description": "Distinct ids (compared without regard to case).",
                },
            ),
            AfterValidator(_distinct),
        ]
        | None
    ) = None
    key: NotificationKey
    target_id: ObjectIdStr | None = None
    data: JsonObject = Field(default_factory=dict)
    # Notifications of one thread as one row: see notifications.create_notification.
    collapse_key: (
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=COLLAPSE_KEY_MAX_CHARS,
                pattern=COLLAPSE_KEY_PATTERN,
                description="An unread notification of this user with the same `key` and "
                "`collapse_key` is updated instead of a new one made: it keeps its id, "
                "moves to the top, its `count` goes up by one and its `data`, `target_id` "
                "and `timestamp` are this create's. 1 to 128 printable ASCII characters, "
                "no spaces. Ignored for a key that records nothing.",
                examples=["thread:6756b2f1a4c3e0d9b8f75678"],
            ),
        ]
        | None
    ) = None

    @classmethod
    def schema_overrides(cls, context: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """What the configuration adds to the fields' JSON schemas (openapi.py)."""
        return {"key": key_schema(context)}

    @model_validator(mode="after")
    def _one_audience(self) -> CreateRequest:
        if (self.user_id is None) == (self.user_ids is None):
            # Raised as is (pydantic wraps only ValueError), so the error names a field.
            raise ValidationFailed(
                details=[
                    {"field": "user_id", "problem": "give exactly one of user_id and user_ids"}
                ]
            )
        return self


def _at_most_list_max(value: int, info: ValidationInfo) -> int:
    # The maximum is configuration (LIST_MAX_LIMIT), passed as validation context.
    maximum = (info.context or {}).get("list_max_limit", DEFAULT_LIST_MAX_LIMIT)
    if value > maximum:
        raise ValueError(f"must be at most {maximum}")
    return value


# A page's size: /list's and GET /email's, at most LIST_MAX_LIMIT.
PageLimit = Annotated[int, Field(ge=0), AfterValidator(_at_most_list_max)]


def limit_schema(context: dict[str, Any]) -> dict[str, Any]:
    """What the configuration adds to a PageLimit's JSON schema (openapi.py)."""
    return {"maximum": context.get("list_max_limit", DEFAULT_LIST_MAX_LIMIT)}


class ListQuery(_Query):
    user_id: ObjectIdStr
    skip: Annotated[int, Field(ge=0, le=_INT64_MAX)] = 0
    limit: PageLimit = 10
    # Filters: `elements` and `new` stay the user's totals, `matched` counts these.
    is_new: Flag | None = None
    key: NotificationKey | None = None

    @classmethod
    def schema_overrides(cls, context: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """What the configuration adds to the fields' JSON schemas (openapi.py)."""
        return {"limit": limit_schema(context), "key": key_schema(context)}


class ReadRequest(_Query):
    user_id: ObjectIdStr
    notification_id: ObjectIdStr


class UserQuery(_Query):
    user_id: ObjectIdStr


class ReadAllRequest(_Query):
    user_id: ObjectIdStr
    # The watermark: this notification and the older ones are marked, newer ones not.
    up_to: ObjectIdStr | None = None


class DeleteRequest(_Query):
    user_id: ObjectIdStr
    notification_id: ObjectIdStr


class DeleteAllRequest(_Query):
    user_id: ObjectIdStr
    read: Flag = False  # true: only the read ones


SUBJECT_MAX_CHARS = 998  # RFC 5322's line limit
TEXT_MAX_CHARS = 256 * 1024
HTML_MAX_CHARS = 512 * 1024


class EmailRequest(_Body):
    """An email with the caller's own subject and text, to a user or to an address."""

    model_config = ConfigDict(json_schema_extra=_exactly_one(user_id="string", to="string"))

    user_id: ObjectIdStr | None = None
    to: EmailAddress | None = None
    subject: Annotated[
        str,
        Field(
            min_length=1,
            max_length=SUBJECT_MAX_CHARS,
            json_schema_extra={"pattern": _ONE_LINE_PATTERN},
        ),
        AfterValidator(_one_line),
    ]
    text: Annotated[
        str, Field(min_length=1, max_length=TEXT_MAX_CHARS), AfterValidator(_valid_text)
    ]
    html: Annotated[str, Field(max_length=HTML_MAX_CHARS), AfterValidator(_valid_text)] | None = (
        None
    )

    @model_validator(mode="after")
    def _one_recipient(self) -> EmailRequest:
        if (self.user_id is None) == (self.to is None):
            raise ValueError("give exactly one of user_id and to")
        return self


def _whole_number(value: Any) -> Any:
    # JSON Schema's "integer" holds 3600.0 too (what some JSON writers send); strict
    # parsing would refuse it. Other floats stay floats, and are refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class TokenRequest(_Body):
    user_id: ObjectIdStr
    ttl_seconds: Annotated[
        int, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS), BeforeValidator(_whole_number)
    ] = DEFAULT_TTL_SECONDS


class InboxQuery(_Query):
    """What the inbox page reads from its own URL (the page, not the server, uses them)."""

    user_id: ObjectIdStr | None = None
    token: Annotated[str, Field(max_length=TOKEN_MAX_CHARS)] | None = None


class EmailIdPath(_Query):
    email_id: ObjectIdStr


# The files of the /docs and /inbox pages (notification_handler serves them, and
# nothing else).
DOCS_ASSETS = ("docs.js", "swagger-ui-bundle.js", "swagger-ui.css")
INBOX_ASSETS = ("inbox.css", "inbox.js")


class AssetPath(_Query):
    # Any other name is a 404 `not_found`, as any unknown path is, not a 422.
    asset: Annotated[str, Field(max_length=64, json_schema_extra={"enum": list(DOCS_ASSETS)})]


class InboxAssetPath(_Query):
    asset: Annotated[str, Field(max_length=64, json_schema_extra={"enum": list(INBOX_ASSETS)})]


# -- preferences and unsubscribe links (preferences.py) ---------------------------------


class ChannelChoices(TypedDict, total=False):
    """The channels of one key to turn on (true) or off (false); those left out stay."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)  # type: ignore[misc]

    in_app: bool
    email: bool


KeyName = Annotated[str, Field(pattern=KEY_NAME_PATTERN)]


class PreferencesUpdate(_Body):
    """A partial update: only the keys and channels given change. Each key must be one
    of the service's, each channel one its key uses (the domain checks both against the
    key table the service runs with)."""

    user_id: ObjectIdStr
    keys: Annotated[
        dict[KeyName, ChannelChoices], Field(json_schema_extra={"additionalProperties": False})
    ]

    @classmethod
    def schema_overrides(cls, context: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The table's keys, each with the channels it uses; a mandatory key's can only
        be true (openapi.py)."""
        table: KeyTable = context.get("keys", DEFAULT_KEYS)
        choices = {
            spec.name: {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    channel: {"const": True} if spec.mandatory else {"type": "boolean"}
                    for channel in spec.channels
                },
            }
            for spec in table
        }
        # The table's names replace the pattern any name is checked against.
        return {
            "keys": {"properties": choices, "patternProperties": {}, "additionalProperties": False}
        }


_UNSUBSCRIBE_EXAMPLE = "6756b2f1a4c3e0d9b8f71234.new_post." + "A" * 43


class UnsubscribePath(_Query):
    # Any text: a malformed token is a 403 `invalid_unsubscribe_token`, like a forged one.
    token: Annotated[str, WithJsonSchema({"type": "string", "examples": [_UNSUBSCRIBE_EXAMPLE]})]


def _one_form_action(schema: dict[str, Any]) -> None:
    # A form field is sent or not: it has no null default to document.
    for field in schema["properties"].values():
        field.pop("default", None)
    schema["oneOf"] = [{"required": ["List-Unsubscribe"]}, {"required": ["undo"]}]


class UnsubscribeForm(BaseModel):
    """RFC 8058's one-click body, or this service's undo. Other fields are ignored: a
    mail provider's one-click POST must never fail for something it added."""

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra=_one_form_action,
    )

    # A form field is text or absent, never null: the schema says so.
    one_click: Annotated[Literal["One-Click"] | None, WithJsonSchema({"const": "One-Click"})] = (
        Field(default=None, alias="List-Unsubscribe")
    )
    undo: Annotated[Literal["1"] | None, WithJsonSchema({"const": "1"})] = None

    @model_validator(mode="after")
    def _one_action(self) -> UnsubscribeForm:
        if (self.one_click is None) == (self.undo is None):
            raise ValueError("send exactly one of List-Unsubscribe=One-Click and undo=1")
        return self


class KeyPreferences(TypedDict):
    """One key's channels as the user has them (a channel the key does not use is not
    listed), and whether it is mandatory (then every channel shows true)."""

    in_app: NotRequired[bool]
    email: NotRequired[bool]
    mandatory: bool


class Preferences(TypedDict):
    keys: dict[str, KeyPreferences]  # every key of the service, in the table's order


class TokenIssued(TypedDict):
    token: str
    user_id: str
    expires_at: int  # unix seconds


class EmailQueued(TypedDict):
    # null only in a replay (Idempotency-Key) after the email's user was erased
    email_id: str | None


class Health(TypedDict):
    status: str


class EarlierLife(TypedDict):
    """How a resent email's earlier life ended: its attempts, last error and failure."""

    attempts: int
    last_error: dict[str, Any] | None
    failed_at: str | None


class EmailState(TypedDict):
    """What GET /email/<id> shows of an outbox record."""

    id: str
    status: str  # outbox.Status: pending, scheduled, queued, sending, sent, failed, cancelled
    to: str | None  # None: a digest not rendered yet (its content is made at due time)
    subject: str | None
    kind: str  # notification, custom, or digest
    user_id: str | None
    notification_id: str | None
    notification_ids: list[str] | None  # a digest's batch; None for other kinds
    key: str | None
    message_id: str | None
    attempts: int
    created_at: str
    next_attempt_at: str | None  # when it is due: queued, or scheduled (a digest)
    sent_at: str | None
    failed_at: str | None
    cancelled_at: str | None
    cancel_reason: str | None  # outbox.CancelReason, e.g. nothing_unread, unsubscribed
    last_error: dict[str, Any] | None
    # Set by a resend (POST /email/<id>/resend): when, and the lives before it (at most
    # dead_letter_store.HISTORY_MAX, oldest first; empty for an email never resent).
    requeued_at: str | None
    history: list[EarlierLife]


class Notification(TypedDict):
    """A notification as stored in the user's document and listed (one stored before
    collapse keys is listed with `count` 1 and `collapse_key` null: `listed`)."""

    id: str
    timestamp: int  # of its last create (collapsed ones are stamped again)
    is_new: bool
    user_id: str
    key: str
    target_id: str | None
    data: dict[str, Any]
    count: int  # the creates it stands for: 1, plus one for each collapsed into it
    collapse_key: str | None


def listed(item: Any) -> Any:
    """A stored notification as /list and /stream show it: one stored before collapse
    keys (no `count`, no `collapse_key`) is copied with their defaults, 1 and null.

    Filled here, in Python over the elements shown only, rather than by the database's
    pipeline: a `$map` with `$mergeObjects` would cost the database CPU for every
    element of every read, and this costs two membership tests per element shown (new
    notifications store both fields: the item itself is returned). A copy, not a
    change in place: a stream's state is shared by the streams of one user. Anything
    but an object (the array is the application's too) is shown as it is.
    """
    if isinstance(item, dict) and ("count" not in item or "collapse_key" not in item):
        return {**item, "count": item.get("count", 1), "collapse_key": item.get("collapse_key")}
    return item


class ListRequestEcho(TypedDict):
    user_id: str
    skip: int
    limit: int
    is_new: NotRequired[bool]
    key: NotRequired[str]


class InboxPage(TypedDict):
    elements: int
    new: int
    request: ListRequestEcho
    list: list[Notification]
    matched: int  # how many match the filters (all of them without one)


class OutboxHealth(TypedDict):
    queued: int
    sending: int
    scheduled: int  # digests waiting for their due time: not late, not counted as queued
    oldest_due_seconds: float | None  # how long the longest-waiting due email has waited


class Readiness(TypedDict):
    status: str
    outbox: OutboxHealth


class Counts(TypedDict):
    """The user's totals: every listed notification, and the unread ones."""

    elements: int
    new: int


class ReadAllResult(TypedDict):
    changed: int
    elements: int
    new: int


class DeleteResult(TypedDict):
    deleted: int
    elements: int
    new: int


class CreateResult(TypedDict):
    # With `collapse_key`: the id of the notification it collapsed into, when it did.
    notification_id: str | None
    email_id: str | None
    collapsed: bool  # updated an unread notification instead of making one
    # The key's channels not used for this user: turned off in their preferences (and
    # `email` of an if_unread key for a user with no address). All of them: 200, null ids.
    skipped: list[str]
    # The user's counts after it; null for a key that records nothing.
    elements: int | None
    new: int | None


class FanOutOutcome(TypedDict, total=False):
    user_id: str
    # created | skipped (every channel turned off) | user_not_found | user_has_no_email |
    # user_document_invalid
    status: str
    notification_id: str | None
    email_id: str | None
    collapsed: bool
    skipped: list[str]  # as CreateResult's


class FanOutResult(TypedDict):
    results: list[FanOutOutcome]
    totals: dict[str, int]


# -- a user's data: export and erasure (user_data.py) ------------------------------------


class UserDataQuery(_Query):
    """A user (the path's id) and, optionally, their address: what the application's
    document no longer says once the application has deleted it."""

    user_id: ObjectIdStr
    email: EmailAddress | None = None


class UserExport(TypedDict):
    """Everything the service holds about a user."""

    user_id: str
    # Whether the application's document of the user exists (false: deleted, or an id
    # that was never a user's; the rest is then what is held by id and by `email`).
    user_document: bool
    # The addresses the emails were looked up by: the document's, and `?email=`.
    addresses: list[str]
    notifications: list[Notification]  # every one stored, newest first, as /list shows them
    preferences: Preferences | None  # as GET /preferences; null without a document
    emails: list[EmailState]  # newest first, as GET /email/<id> shows each


class ErasureReport(TypedDict):
    """What an erasure removed, by kind (all 0 when there was nothing left)."""

    notifications: int  # removed from the user's array (with its counts)
    emails_cancelled: int  # not sent yet, or in flight: cancelled, without their address
    emails_in_flight: int  # of those, being sent at that moment: they may have gone out
    emails_erased: int  # sent, failed or cancelled earlier: deleted
    idempotency_records: int  # stored answers the user was removed from


# -- dead letters: failed emails, listed and sent again (dead_letters.py) ---------------

# The statuses GET /email lists and POST /email/failed/resend requeues: the failed ones only
# (outbox.Status has the others; a listing of them would need an index of its own).
DeadLetterStatus = Literal["failed"]
# Any key's name, not only the table's: an email of a key since removed from KEYS_FILE
# can still be failed. A custom email (POST /email) has no key.
AnyKeyName = Annotated[
    str, Field(pattern=KEY_NAME_PATTERN, json_schema_extra={"examples": ["new_login"]})
]


class DeadLetterQuery(_Query):
    """GET /email: one page of the failed emails, newest failure first."""

    status: DeadLetterStatus
    skip: Annotated[int, Field(ge=0, le=_INT64_MAX)] = 0
    limit: PageLimit = 10
    key: AnyKeyName | None = None

    @classmethod
    def schema_overrides(cls, context: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The bound of `limit`, as /list's (openapi.py)."""
        return {"limit": limit_schema(context)}


def _text_time(value: Any) -> Any:
    # Lax parsing (the body's strict mode takes no text for a time) of text only: a
    # number would otherwise pass as unix seconds, a unit the API uses nowhere.
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time with its offset, e.g. 2026-12-01T00:00:00Z")
    return value


class ResendAllRequest(_Body):
    """Which failed emails to send again: all, or those of a key, or failed before a time."""

    status: DeadLetterStatus
    key: AnyKeyName | None = None
    failed_before: (
        Annotated[AwareDatetime, Field(strict=False), BeforeValidator(_text_time)] | None
    ) = None


class DeadLetterPage(TypedDict):
    list: list[EmailState]  # newest failure first
    matched: int  # how many are failed (of `key`), over every page


class ResendResult(TypedDict):
    requeued: int  # how many failed emails this request put back in the queue
