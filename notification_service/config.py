"""Configuration: read once from the environment (and ./.env), validated at start-up.

Every variable is documented once in README.md and once in .env.example.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn, TypeVar, final
from urllib.parse import urlsplit

from dotenv import dotenv_values

from .keys import DEFAULT_KEYS, KeysFileError, KeyTable
from .schemas import is_email_address
from .tokens import SECRET_MIN_BYTES
from .unsubscribe import TOKEN_MAX_CHARS

T = TypeVar("T")

SmtpSecurity = Literal["auto", "ssl", "starttls", "none"]
_SECURITIES: tuple[SmtpSecurity, ...] = ("auto", "ssl", "starttls", "none")
LogFormat = Literal["json", "text"]
_LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


FAN_OUT_TIMEOUT_FACTOR = 10  # see Config.fan_out_timeout_seconds
UNSUBSCRIBE_SECRET_MIN_BYTES = 32


@final
class Secret:
    """A value that prints as `***` wherever it ends up: str, repr, f-strings (any format
    spec), `%s` in a log line, `json.dumps(default=str)`, a dataclass's repr or asdict.
    `reveal()` is the one way to read it.

    Hand-written rather than pydantic's SecretStr, which keeps its value in `__dict__`,
    so `vars()` and the `json.dumps(default=lambda o: o.__dict__)` habit print it, and
    which raises on a format spec. Slots leave no `__dict__`, and pickling (which would
    write the value out) is refused.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format("***", spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("a Secret cannot be changed")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("a Secret cannot be changed")

    # Immutable, so a copy (dataclasses.asdict, copy.deepcopy) is the same object.
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret is not pickled: it would write the value out")


def _userinfo(uri: str) -> tuple[str, str | None, str]:
    """`uri` cut into its scheme with `://`, its userinfo (None when it has none) and the
    rest, from the `@` on. The userinfo is found where the MongoDB driver looks for it:
    before the last `@` of what comes before the first `?`, then before the first `/`."""
    scheme, sep, rest = uri.partition("://")
    prefix, rest = (scheme + sep, rest) if sep else ("", uri)
    host_part = rest.partition("?")[0].partition("/")[0]
    if "@" not in host_part:
        return prefix, None, rest
    userinfo = host_part.rpartition("@")[0]
    return prefix, userinfo, rest[len(userinfo) :]


def split_password(uri: str) -> tuple[str, str | None]:
    """`uri` without the password of its userinfo, and that password as written (still
    percent-encoded), or None when there is none. `join_password` undoes it exactly."""
    prefix, userinfo, rest = _userinfo(uri)
    if userinfo is None:
        return uri, None
    user, colon, password = userinfo.partition(":")
    return (prefix + user + rest, password) if colon else (uri, None)


def join_password(uri: str, password: str) -> str:
    """`uri`, which has a user and no password, with `password` put back after the user."""
    prefix, user, rest = _userinfo(uri)
    if user is None or ":" in user:
        raise ValueError("the URI has no user without a password to give it to")
    return prefix + user + ":" + password + rest


class ConfigError(ValueError):
    """Variables have values the service cannot start with.

    `problems` holds one message per problem, each starting with the variable's name
    (`PORT: must be ...`); the message is them all, one per line.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: list[str] = list(problems)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, ...]]:
        return (type(self), tuple(self.problems))


@dataclass(frozen=True)
class Config:
    # HTTP
    host: str = "127.0.0.1"
    port: int = 5000
    web_workers: int = 2
    web_threads: int = 8
    max_body_bytes: int = 1024 * 1024
    # A client gets this long to send its headers, and again its body, before it is cut off.
    client_timeout_seconds: float = 5.0
    # Bearer keys every route requires but the open ones (the probes, the API document
    # and its docs page); empty = open, which only a loopback HOST (make run) or
    # ALLOW_UNAUTHENTICATED allows.
    api_keys: tuple[Secret, ...] = ()
    allow_unauthenticated: bool = False
    # USER_TOKEN_SECRET: signs the per-user tokens a browser may use instead of a key
    # (tokens.py); None: no token is accepted.
    user_token_key: Secret | None = None
    # GET /stream: open streams per process (503 past it), the heartbeat comment's
    # period, and how often the watched users' versions are read without change streams.
    stream_max_per_process: int = 1000
    stream_heartbeat_seconds: float = 15.0
    stream_poll_seconds: float = 1.0
    # MongoDB. None means "start the embedded server" (make run only). DB_URI's password
    # is held apart, so that db_uri can be printed: reveal_db_uri() puts it back.
    db_uri: str | None = None
    db_password: Secret | None = None
    db_timeout_ms: int = 3000
    users_collection: str = "users"
    notifications_field: str = "notifications"
    outbox_collection: str = "email_outbox"
    idempotency_collection: str = "idempotency_keys"
    notifications_limit: int = 100
    # Notifications older than this are neither listed nor counted; None keeps them.
    notifications_ttl_days: int | None = None
    # Sent and failed outbox records are removed this long after; 0 keeps them.
    outbox_retention_days: int = 30
    idempotency_ttl_hours: int = 24
    list_max_limit: int = 100
    # Test mode of the original assignment: unknown users are created on /create.
    email: str | None = None
    # SMTP. No host means "start the local sink" (make run only).
    smtp_host: str | None = None
    smtp_port: int | None = None
    smtp_login: str | None = None
    smtp_password: Secret | None = None
    smtp_email: str = "notifications@localhost"
    smtp_name: str | None = None
    smtp_security: SmtpSecurity = "auto"
    smtp_verify: bool = True
    smtp_ca_file: str | None = None
    smtp_timeout: float = 10.0
    smtp_max_per_connection: int = 100
    smtp_rate_limit: float = 0.0  # messages per second, whole deployment; 0 = unlimited
    templates_dir: str | None = None
    # The notification keys (KEYS_FILE replaces the seed's table, keys.py).
    keys: KeyTable = DEFAULT_KEYS
    # Signs one-click unsubscribe links, and where they point ({public_url}/unsubscribe/..):
    # both required when a key that is not mandatory can email.
    unsubscribe_secret: Secret | None = None
    public_url: str | None = None
    # Development: DB_URI without SMTP_HOST is allowed (serve's .eml sink takes the mail).
    dev_mail_sink: bool = False
    # Outbox dispatcher
    dispatcher_threads: int = 1  # inside each server process; 0 = run `worker` separately
    dispatch_poll_seconds: float = 0.5
    dispatch_lease_seconds: float = 60.0
    dispatch_batch_size: int = 32
    dispatch_max_attempts: int = 10
    dispatch_max_age_seconds: float = 86400.0
    dispatch_backoff_base_seconds: float = 2.0
    dispatch_backoff_max_seconds: float = 600.0
    # Local data of make run (embedded database and mail sink)
    data_dir: str = "var"
    log_level: str = "INFO"
    # None: not set, which is json, except for `serve` without DB_URI and `sink` (text).
    log_format: LogFormat | None = None

    def __post_init__(self) -> None:
        # Tests and benchmarks build configs by hand with plain strings (and a DB_URI
        # with its password in it): however a Config was made, its secrets are Secrets.
        keys = tuple(_as_secret(key) for key in self.api_keys)
        object.__setattr__(self, "api_keys", keys)
        for name in ("smtp_password", "unsubscribe_secret"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_secret(value))
        if self.db_uri is None:
            object.__setattr__(self, "db_password", None)
            return
        shown, password = split_password(self.db_uri)
        if password is not None:
            object.__setattr__(self, "db_uri", shown)
            object.__setattr__(self, "db_password", Secret(password))
        elif _userinfo(shown)[1] is None:
            # dataclasses.replace() with a URI that names no user: the old password is
            # not for it.
            object.__setattr__(self, "db_password", None)

    def reveal_db_uri(self) -> str | None:
        """DB_URI as it was given, password included: for the driver, never for a log."""
        if self.db_uri is None or self.db_password is None:
            return self.db_uri
        return join_password(self.db_uri, self.db_password.reveal())

    @property
    def database_name(self) -> str:
        """The database named by the path of DB_URI, `notifications` when it names none."""
        if not self.db_uri:
            return "notifications"
        path = urlsplit(self.db_uri).path.lstrip("/")
        return path or "notifications"

    @property
    def fan_out_timeout_seconds(self) -> float:
        """The database budget of a fan-out request: DB_TIMEOUT_MS per 100 users it
        may hold (1,000 at most), a batch job's rather than a click's."""
        return self.db_timeout_ms / 1000 * FAN_OUT_TIMEOUT_FACTOR

    @property
    def write_window_seconds(self) -> float:
        """How long after it was received a request may still write to the database.

        Every database call of a request shares one budget from its arrival
        (server.py): DB_TIMEOUT_MS; a fan-out then opens `fan_out_timeout_seconds` of
        its own after its Idempotency-Key's claim, itself within the first budget. Past
        both nothing of the request is sent; the margin covers a write already on the
        wire. A request older than this is over: its pending emails may be swept.
        """
        return self.db_timeout_ms / 1000 + self.fan_out_timeout_seconds + 10.0

    @property
    def resolved_smtp_port(self) -> int:
        if self.smtp_port is not None:
            return self.smtp_port
        return {"ssl": 465, "starttls": 587}.get(self.smtp_security, 25)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Config:
        """Build the config from `environ` (default: ./.env overlaid by os.environ).

        :raise ConfigError: naming every variable with a bad value, one per line, in the
            order they are read, then the checks between variables (each skipped when
            one of its variables is itself bad).
        """
        if environ is None:
            env: dict[str, str] = {}
            if dotenv and Path(".env").is_file():
                env.update({k: v for k, v in dotenv_values(".env").items() if v is not None})
            env.update(os.environ)
        else:
            env = dict(environ)
        r = _Reader(env)
        d = cls()
        # Read ahead of the others: it bounds KEYS_FILE's email_after_seconds.
        dispatch_max_age_seconds = r.number(
            "DISPATCH_MAX_AGE_SECONDS", d.dispatch_max_age_seconds, 1, 30 * 86400
        )
        # A bad value is recorded and its default used meanwhile: nothing below is
        # returned unless every variable was read.
        config = cls(
            host=r.text("HOST", d.host),
            port=r.integer("PORT", d.port, 1, 65535),
            web_workers=r.integer("WEB_WORKERS", d.web_workers, 1, 64),
            web_threads=r.integer("WEB_THREADS", d.web_threads, 1, 256),
            max_body_bytes=r.integer("MAX_BODY_BYTES", d.max_body_bytes, 1024, 64 * 1024 * 1024),
            client_timeout_seconds=r.number(
                "CLIENT_TIMEOUT_SECONDS", d.client_timeout_seconds, 0.5, 60
            ),
            api_keys=_api_keys(r),
            user_token_key=_long_secret(r, "USER_TOKEN_SECRET", SECRET_MIN_BYTES),
            stream_max_per_process=r.integer(
                "STREAM_MAX_PER_PROCESS", d.stream_max_per_process, 1, 100_000
            ),
            stream_heartbeat_seconds=r.number(
                "STREAM_HEARTBEAT_SECONDS", d.stream_heartbeat_seconds, 0.1, 300
            ),
            stream_poll_seconds=r.number("STREAM_POLL_SECONDS", d.stream_poll_seconds, 0.05, 60),
            # A refused DB_URI is echoed without its password.
            db_uri=r.optional(
                "DB_URI", _check_mongo_uri, shown=lambda raw: repr(split_password(raw)[0])
            ),
            db_timeout_ms=r.integer("DB_TIMEOUT_MS", d.db_timeout_ms, 100, 60_000),
            users_collection=r.name("USERS_COLLECTION", d.users_collection),
            notifications_field=r.name("NOTIFICATIONS_FIELD", d.notifications_field),
            outbox_collection=r.name("OUTBOX_COLLECTION", d.outbox_collection),
            idempotency_collection=r.name("IDEMPOTENCY_COLLECTION", d.idempotency_collection),
            # 500 notifications of at most 16 KiB of data each stay well inside
            # MongoDB's 16 MB document, beside whatever else the application keeps there.
            notifications_limit=r.integer("NOTIFICATIONS_LIMIT", d.notifications_limit, 1, 500),
            list_max_limit=r.integer("LIST_MAX_LIMIT", d.list_max_limit, 1, 10_000),
            notifications_ttl_days=r.optional(
                "NOTIFICATIONS_TTL_DAYS", lambda v: _parse_int(v, 1, 36_500)
            ),
            outbox_retention_days=r.integer(
                "OUTBOX_RETENTION_DAYS", d.outbox_retention_days, 0, 36_500
            ),
            idempotency_ttl_hours=r.integer(
                "IDEMPOTENCY_TTL_HOURS", d.idempotency_ttl_hours, 1, 24 * 365
            ),
            email=r.optional("EMAIL", _check_email),
            smtp_host=r.optional("SMTP_HOST", _check_host),
            smtp_port=r.optional("SMTP_PORT", lambda v: _parse_int(v, 1, 65535)),
            smtp_login=r.optional("SMTP_LOGIN", str),
            smtp_password=r.secret("SMTP_PASSWORD"),
            smtp_email=r.optional("SMTP_EMAIL", _check_email) or d.smtp_email,
            smtp_name=r.optional("SMTP_NAME", _check_header_text),
            smtp_security=r.choice("SMTP_SECURITY", _SECURITIES, d.smtp_security),
            smtp_verify=r.boolean("SMTP_VERIFY", d.smtp_verify),
            smtp_ca_file=r.optional("SMTP_CA_FILE", _check_file),
            smtp_timeout=r.number("SMTP_TIMEOUT", d.smtp_timeout, 0.1, 600),
            smtp_max_per_connection=r.integer(
                "SMTP_MAX_PER_CONNECTION", d.smtp_max_per_connection, 1, 100_000
            ),
            smtp_rate_limit=r.number("SMTP_RATE_LIMIT", d.smtp_rate_limit, 0, 100_000),
            templates_dir=r.optional("TEMPLATES_DIR", _check_dir),
            keys=_keys(r, dispatch_max_age_seconds),
            unsubscribe_secret=_long_secret(r, "UNSUBSCRIBE_SECRET", UNSUBSCRIBE_SECRET_MIN_BYTES),
            public_url=r.optional("PUBLIC_URL", _check_public_url),
            dev_mail_sink=r.boolean("DEV_MAIL_SINK", d.dev_mail_sink),
            allow_unauthenticated=r.boolean("ALLOW_UNAUTHENTICATED", d.allow_unauthenticated),
            dispatcher_threads=r.integer("DISPATCHER_THREADS", d.dispatcher_threads, 0, 64),
            dispatch_poll_seconds=r.number(
                "DISPATCH_POLL_SECONDS", d.dispatch_poll_seconds, 0.01, 60
            ),
            dispatch_lease_seconds=r.number(
                "DISPATCH_LEASE_SECONDS", d.dispatch_lease_seconds, 1, 3600
            ),
            dispatch_batch_size=r.integer("DISPATCH_BATCH_SIZE", d.dispatch_batch_size, 1, 1000),
            dispatch_max_attempts=r.integer(
                "DISPATCH_MAX_ATTEMPTS", d.dispatch_max_attempts, 1, 1000
            ),
            dispatch_max_age_seconds=dispatch_max_age_seconds,
            dispatch_backoff_base_seconds=r.number(
                "DISPATCH_BACKOFF_BASE_SECONDS", d.dispatch_backoff_base_seconds, 0.01, 3600
            ),
            dispatch_backoff_max_seconds=r.number(
                "DISPATCH_BACKOFF_MAX_SECONDS", d.dispatch_backoff_max_seconds, 0.01, 86400
            ),
            data_dir=r.text("DATA_DIR", d.data_dir),
            log_level=r.choice(
                "LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), d.log_level, upper=True
            ),
            log_format=r.choice("LOG_FORMAT", _LOG_FORMATS, d.log_format),
        )
        problems = r.problems
        if (
            r.ok("HOST", "API_KEYS", "API_KEYS_FILE", "ALLOW_UNAUTHENTICATED")
            and not config.api_keys
            and not config.allow_unauthenticated
            and not is_loopback(config.host)
        ):
            # Like Redis's protected mode: a service that sends email to any address,
            # open to whoever reaches its port, is a relay for anyone's spam.
            problems.append(
                f"API_KEYS: must be set when HOST ({config.host}) listens beyond loopback: "
                "without a key anyone who reaches the port can read every inbox and send "
                "email to any address; set ALLOW_UNAUTHENTICATED=true to serve open on purpose"
            )
        if (
            r.ok("SMTP_LOGIN", "SMTP_PASSWORD")
            and config.smtp_login is not None
            and config.smtp_password is None
        ):
            problems.append("SMTP_PASSWORD: must be set when SMTP_LOGIN is set")
        if (
            r.ok("DISPATCH_LEASE_SECONDS", "SMTP_TIMEOUT")
            and config.dispatch_lease_seconds < 4 * config.smtp_timeout
        ):
            # Claims are renewed at half the lease, so one send (several SMTP exchanges,
            # each up to SMTP_TIMEOUT) must fit in the other half, or another dispatcher
            # takes the email over and sends it again.
            problems.append(
                "DISPATCH_LEASE_SECONDS: must be at least four times SMTP_TIMEOUT "
                f"({config.dispatch_lease_seconds:g} < 4 x {config.smtp_timeout:g})"
            )
        if (
            r.ok("OUTBOX_RETENTION_DAYS", "IDEMPOTENCY_TTL_HOURS")
            and 0 < config.outbox_retention_days * 24 < config.idempotency_ttl_hours
        ):
            # A retried key whose email record is gone could not tell that its first
            # attempt committed, and would write it all again.
            problems.append(
                "IDEMPOTENCY_TTL_HOURS: must be at most OUTBOX_RETENTION_DAYS x 24 "
                f"({config.idempotency_ttl_hours} > {config.outbox_retention_days * 24})"
            )
        if (
            r.ok("SMTP_HOST", "SMTP_PORT", "SMTP_LOGIN")
            and config.smtp_host is None
            and (config.smtp_login or config.smtp_port)
        ):
            problems.append("SMTP_HOST: must be set when SMTP_PORT or SMTP_LOGIN is set")
        elif (
            r.ok("SMTP_HOST", "DB_URI", "DEV_MAIL_SINK")
            and config.db_uri is not None
            and config.smtp_host is None
            and not config.dev_mail_sink
        ):
            # A real database means a real deployment: mail must not silently pile up as
            # .eml files. `make run` alone sets neither (serve passes both to its child).
            # (elif: one SMTP_HOST line is enough, setting it answers both.)
            problems.append(
                "SMTP_HOST: must be set when DB_URI is set (without it mail would go to the "
                "local .eml sink); set DEV_MAIL_SINK=true to allow that in development"
            )
        if r.ok("KEYS_FILE"):
            # A key the user may turn off gets a one-click unsubscribe link in each email
            # (RFC 8058): it cannot be signed without the secret, nor point anywhere
            # without the URL.
            optional = [s.name for s in config.keys.emailing if not s.mandatory]
            for name, value in (
                ("UNSUBSCRIBE_SECRET", config.unsubscribe_secret),
                ("PUBLIC_URL", config.public_url),
            ):
                if optional and value is None and r.ok(name):
                    problems.append(
                        f"{name}: must be set when a key that is not mandatory sends email "
                        f"({', '.join(optional)}): its emails carry an unsubscribe link"
                    )
        if problems:
            raise ConfigError(*problems)
        return config


class _Reader:
    """Typed accessors that record a bad value with a message naming the variable.

    A bad value reads as the default (None for `optional`), so that reading goes on
    and every problem is found; `problems` lists them in reading order.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self._failed: set[str] = set()

    def refuse(self, name: str, message: str) -> None:
        """Record that `name` is bad: `message` must not hold a secret value."""
        self.problems.append(f"{name}: {message}")
        self._failed.add(name)

    def ok(self, *names: str) -> bool:
        """Whether each of `names` was read without a problem (or is not set)."""
        return self._failed.isdisjoint(names)

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def _convert(
        self,
        name: str,
        raw: str,
        convert: Callable[[str], T],
        fallback: T,
        shown: Callable[[str], str] = repr,
    ) -> T:
        try:
            return convert(raw)
        except ValueError as exc:
            self.refuse(name, f"{exc} (got {shown(raw)})")
            return fallback

    def optional(
        self, name: str, convert: Callable[[str], T], *, shown: Callable[[str], str] = repr
    ) -> T | None:
        """`convert` of the value, None when unset; a refused value is echoed as `shown`
        makes it."""
        raw = self._raw(name)
        return None if raw is None else self._convert(name, raw, convert, None, shown)

    def secret(self, name: str) -> Secret | None:
        """The value as a Secret, None when unset; never refused, so never echoed."""
        raw = self._raw(name)
        return None if raw is None else Secret(raw)

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        return self._convert(name, raw, lambda v: _parse_int(v, lo, hi), default)

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        return self._convert(name, raw, lambda v: _parse_float(v, lo, hi), default)

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        return default if raw is None else self._convert(name, raw, _parse_bool, default)

    def name(self, name: str, default: str) -> str:
        raw = self._raw(name)
        return default if raw is None else self._convert(name, raw, _check_name, default)

    def choice(self, name: str, choices: tuple[T, ...], default: T, *, upper: bool = False) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        for choice in choices:
            if choice == value:
                return choice
        self.refuse(name, f"must be one of {', '.join(map(str, choices))} (got {raw!r})")
        return default


def _parse_int(raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw, 10)
    except ValueError:
        raise ValueError("must be a whole number") from None
    if not lo <= value <= hi:
        raise ValueError(f"must be between {lo} and {hi}")
    return value


def _parse_float(raw: str, lo: float, hi: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number") from None
    if not lo <= value <= hi:  # also refuses nan
        raise ValueError(f"must be between {lo:g} and {hi:g}")
    return value


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


API_KEY_MIN_CHARS = 16
_API_KEY_RE = re.compile(r"[!-~]+")  # printable ASCII without spaces: what a header carries


def _as_secret(value: Secret | str) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)


def _api_keys(r: _Reader) -> tuple[Secret, ...]:
    """The union of API_KEYS (comma-separated) and API_KEYS_FILE (one key a line, # comments).

    A short or unusable key is recorded on `r`, naming the variable and the key's
    position, never the key; the other keys are still read.
    """
    keys: list[str] = []
    sources: list[tuple[str, list[str]]] = []
    if (listed := r.secret("API_KEYS")) is not None:
        sources.append(("API_KEYS", listed.reveal().split(",")))
    if (path := r.optional("API_KEYS_FILE", _check_file)) is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            # The exception's own text may quote bytes of the file: its type says enough.
            r.refuse("API_KEYS_FILE", f"cannot be read as UTF-8 text ({type(exc).__name__})")
            lines = None
        if lines is not None:
            # A comment stays as a blank line, so that positions are line numbers.
            sources.append(
                ("API_KEYS_FILE", ["" if ln.lstrip().startswith("#") else ln for ln in lines])
            )
    for name, candidates in sources:
        what = "line" if name == "API_KEYS_FILE" else "key"
        for position, candidate in enumerate(candidates, 1):
            key = candidate.strip()
            if not key:
                continue
            # The message names the key's position, never the key: it may end up in a log.
            if not _API_KEY_RE.fullmatch(key) or "," in key:
                r.refuse(
                    name, f"{what} {position} has spaces, commas or characters a header can't carry"
                )
            elif len(key) < API_KEY_MIN_CHARS:
                r.refuse(name, f"{what} {position} is shorter than {API_KEY_MIN_CHARS} characters")
            else:
                keys.append(key)
        if not any(c.strip() for c in candidates):
            # Set but empty would silently leave the service open.
            r.refuse(name, "is set but holds no key")
    return tuple(Secret(key) for key in dict.fromkeys(keys))


def _long_secret(r: _Reader, name: str, min_bytes: int) -> Secret | None:
    """A secret of at least `min_bytes` (USER_TOKEN_SECRET, UNSUBSCRIBE_SECRET), or None."""
    secret = r.secret(name)
    if secret is not None and len(secret.reveal().encode("utf-8")) < min_bytes:
        # Neither the value nor its length: the message may end up in a log.
        r.refuse(
            name,
            f"must be at least {min_bytes} bytes "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')",
        )
        return None
    return secret


def _keys(r: _Reader, max_age_seconds: float) -> KeyTable:
    path = r.optional("KEYS_FILE", _check_file)
    if path is None or not r.ok("DISPATCH_MAX_AGE_SECONDS"):
        # A bad DISPATCH_MAX_AGE_SECONDS is reported already; the file is judged once
        # its bound is known.
        return DEFAULT_KEYS
    try:
        return KeyTable.load(path, max_age_seconds=max_age_seconds)
    except KeysFileError as exc:
        r.refuse("KEYS_FILE", str(exc))
        return DEFAULT_KEYS


# Each link goes into an email's `List-Unsubscribe: <link>` as it is, on one line of at
# most 998 characters (RFC 5322), so it holds no quote or angle bracket (email_sender's
# _check_unsubscribe_url refuses them at send time: every email would fail for good).
_LINK_PATH = "/unsubscribe/"
PUBLIC_URL_MAX_CHARS = 998 - len("List-Unsubscribe: <>") - len(_LINK_PATH) - TOKEN_MAX_CHARS


def _check_public_url(raw: str) -> str:
    """An http(s) URL the unsubscribe links start with, without its trailing slash."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in raw) or not raw.isascii():
        raise ValueError("must be an ASCII URL without spaces or control characters")
    if any(c in raw for c in '"<>'):
        raise ValueError("must hold no quote or angle bracket: it goes into an email header")
    if len(raw.rstrip("/")) > PUBLIC_URL_MAX_CHARS:
        raise ValueError(
            f"must be at most {PUBLIC_URL_MAX_CHARS} characters: each link is one header line"
        )
    if "?" in raw or "#" in raw:
        # Links are built as PUBLIC_URL + "/unsubscribe/<token>": a query or a fragment
        # would swallow that path.
        raise ValueError("must have no query (?) or fragment (#)")
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise ValueError("must not carry a user or password: it is sent in every email")
    try:
        parts.port  # noqa: B018  # raises on a port that is not a number in 0-65535
    except ValueError:
        raise ValueError("has a bad port") from None
    return raw.rstrip("/")


def _check_name(raw: str) -> str:
    if not _NAME_RE.fullmatch(raw):
        raise ValueError("must be letters, digits and underscores, not starting with a digit")
    return raw


def _check_email(raw: str) -> str:
    if not is_email_address(raw):
        raise ValueError("must be an email address like name@example.com")
    return raw


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _check_host(raw: str) -> str:
    if any(c.isspace() for c in raw) or "/" in raw:
        raise ValueError("must be a host name or address, without scheme or path")
    return raw


def _check_header_text(raw: str) -> str:
    if "\r" in raw or "\n" in raw:
        raise ValueError("must be one line")
    return raw


def _check_mongo_uri(raw: str) -> str:
    if not raw.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError("must start with mongodb:// or mongodb+srv://")
    return raw


def _check_file(raw: str) -> str:
    if not Path(raw).is_file():
        raise ValueError("no such file")
    return raw


def _check_dir(raw: str) -> str:
    if not Path(raw).is_dir():
        raise ValueError("no such directory")
    return raw
