"""Configuration: defaults, the .env file, and refusals that name the variable."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import pickle
from pathlib import Path

import pytest

from notification_service.__main__ import main
from notification_service.config import Config, ConfigError, Secret, join_password, split_password
from notification_service.email_sender import OutgoingEmail, build_message
from notification_service.unsubscribe import unsubscribe_url


def test_defaults_need_no_variable() -> None:
    config = Config.from_env({})
    assert (config.host, config.port, config.db_uri, config.smtp_host) == (
        "127.0.0.1",
        5000,
        None,
        None,
    )
    assert config.notifications_limit == 100 and config.list_max_limit == 100
    assert config.smtp_security == "auto" and config.smtp_verify is True
    assert config.resolved_smtp_port == 25


def test_seed_variables_are_read() -> None:
    config = Config.from_env(
        {
            "PORT": "8080",
            "DB_URI": "mongodb://db:27017/app",
            "SMTP_HOST": "smtp.example.com",
            "SMTP_PORT": "465",
            "SMTP_LOGIN": "mailer",
            "SMTP_PASSWORD": "pa55-w0rd",
            "SMTP_EMAIL": "noreply@example.com",
            "SMTP_NAME": "Служба",
            "EMAIL": "test@example.com",
        }
    )
    assert config.port == 8080
    assert config.database_name == "app"
    assert (config.smtp_host, config.resolved_smtp_port) == ("smtp.example.com", 465)
    assert config.smtp_login == "mailer"
    assert config.smtp_password is not None and config.smtp_password.reveal() == "pa55-w0rd"
    assert (config.smtp_email, config.smtp_name, config.email) == (
        "noreply@example.com",
        "Служба",
        "test@example.com",
    )
    assert "pa55-w0rd" not in repr(config)


def test_log_format_is_read_in_any_case_and_unset_by_default() -> None:
    assert Config.from_env({}).log_format is None  # json, or text for make run
    assert Config.from_env({"LOG_FORMAT": " Text "}).log_format == "text"
    assert Config.from_env({"LOG_FORMAT": "JSON"}).log_format == "json"


def test_security_picks_the_default_port() -> None:
    assert Config.from_env({"SMTP_HOST": "h", "SMTP_SECURITY": "SSL"}).resolved_smtp_port == 465
    assert (
        Config.from_env({"SMTP_HOST": "h", "SMTP_SECURITY": "starttls"}).resolved_smtp_port == 587
    )


def test_dotenv_is_read_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("PORT=7000\nSMTP_NAME=From dotenv\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", "7001")
    monkeypatch.delenv("SMTP_NAME", raising=False)
    config = Config.from_env()
    assert (config.port, config.smtp_name) == (7001, "From dotenv")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"DB_URI": "postgres://x"}, "DB_URI"),
        ({"DB_TIMEOUT_MS": "0"}, "DB_TIMEOUT_MS"),
        ({"NOTIFICATIONS_LIMIT": "-1"}, "NOTIFICATIONS_LIMIT"),
        ({"NOTIFICATIONS_LIMIT": "100000"}, "NOTIFICATIONS_LIMIT"),
        ({"USERS_COLLECTION": "users; drop"}, "USERS_COLLECTION"),
        ({"NOTIFICATIONS_FIELD": "a.b"}, "NOTIFICATIONS_FIELD"),
        ({"EMAIL": "not an address"}, "EMAIL"),
        ({"SMTP_HOST": "smtp://host"}, "SMTP_HOST"),
        ({"SMTP_HOST": "h", "SMTP_PORT": "x"}, "SMTP_PORT"),
        ({"SMTP_HOST": "h", "SMTP_LOGIN": "u"}, "SMTP_PASSWORD"),
        ({"SMTP_PORT": "25"}, "SMTP_HOST"),
        ({"SMTP_EMAIL": "nobody"}, "SMTP_EMAIL"),
        ({"SMTP_NAME": "a\nBcc: x@example.com"}, "SMTP_NAME"),
        ({"SMTP_SECURITY": "tls"}, "SMTP_SECURITY"),
        ({"SMTP_VERIFY": "maybe"}, "SMTP_VERIFY"),
        ({"SMTP_CA_FILE": "/no/such/file.pem"}, "SMTP_CA_FILE"),
        ({"SMTP_TIMEOUT": "nan"}, "SMTP_TIMEOUT"),
        ({"TEMPLATES_DIR": "/no/such/dir"}, "TEMPLATES_DIR"),
        ({"DISPATCHER_THREADS": "many"}, "DISPATCHER_THREADS"),
        ({"DISPATCH_LEASE_SECONDS": "30", "SMTP_TIMEOUT": "10"}, "DISPATCH_LEASE_SECONDS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"NOTIFICATIONS_TTL_DAYS": "0"}, "NOTIFICATIONS_TTL_DAYS"),
        ({"OUTBOX_RETENTION_DAYS": "-1"}, "OUTBOX_RETENTION_DAYS"),
        ({"IDEMPOTENCY_TTL_HOURS": "0"}, "IDEMPOTENCY_TTL_HOURS"),
        ({"IDEMPOTENCY_COLLECTION": "a b"}, "IDEMPOTENCY_COLLECTION"),
        ({"STREAM_MAX_PER_PROCESS": "0"}, "STREAM_MAX_PER_PROCESS"),
        ({"STREAM_HEARTBEAT_SECONDS": "0"}, "STREAM_HEARTBEAT_SECONDS"),
        ({"STREAM_POLL_SECONDS": "nan"}, "STREAM_POLL_SECONDS"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_FORMAT": "json,text"}, "LOG_FORMAT"),
        ({"LOG_FORMAT": "plain"}, "LOG_FORMAT"),
        # A key must not outlive the email records that tell a retry what was done.
        ({"OUTBOX_RETENTION_DAYS": "1", "IDEMPOTENCY_TTL_HOURS": "25"}, "IDEMPOTENCY_TTL_HOURS"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}: "):
        Config.from_env(env)


# --- every bad variable at once ---------------------------------------------------------


def test_every_bad_variable_is_named_in_one_error_in_reading_order() -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"LOG_LEVEL": "LOUD", "SMTP_TIMEOUT": "nan", "PORT": "x"})
    lines = str(raised.value).splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["PORT", "SMTP_TIMEOUT", "LOG_LEVEL"]
    assert raised.value.problems == lines
    assert lines[0] == "PORT: must be a whole number (got 'x')"


def test_a_single_problem_keeps_its_one_line_message() -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"PORT": "x"})
    assert str(raised.value) == "PORT: must be a whole number (got 'x')"
    assert raised.value.problems == [str(raised.value)]
    assert isinstance(raised.value, ValueError)


def test_a_cross_check_is_skipped_when_one_of_its_inputs_is_bad() -> None:
    # The lease check would compare 30 with 4 x SMTP_TIMEOUT: not with a bad SMTP_TIMEOUT.
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"SMTP_TIMEOUT": "nan", "DISPATCH_LEASE_SECONDS": "30"})
    assert [p.split(":", 1)[0] for p in raised.value.problems] == ["SMTP_TIMEOUT"]
    # A bad SMTP_HOST is reported as bad, not also as missing beside SMTP_LOGIN.
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"SMTP_HOST": "smtp://host", "SMTP_LOGIN": "u", "SMTP_PASSWORD": "p"})
    assert [p.split(":", 1)[0] for p in raised.value.problems] == ["SMTP_HOST"]


def test_cross_checks_are_reported_after_the_variables_they_follow() -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env(
            {
                "PORT": "0",
                "OUTBOX_RETENTION_DAYS": "1",
                "IDEMPOTENCY_TTL_HOURS": "25",
                "SMTP_LOGIN": "mailer",
                "SMTP_TIMEOUT": "20",
                "DISPATCH_LEASE_SECONDS": "60",
            }
        )
    assert [p.split(":", 1)[0] for p in raised.value.problems] == [
        "PORT",
        "SMTP_PASSWORD",
        "DISPATCH_LEASE_SECONDS",
        "IDEMPOTENCY_TTL_HOURS",
        "SMTP_HOST",
    ]


def test_secrets_stay_out_of_a_many_problem_message(tmp_path: Path) -> None:
    # A deployment with a typo'd host, a short key and a key file that lost a line:
    # the password and the keys sit right beside the bad values, and must not show.
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{GOOD_KEY}\nfile-s3cr3t\n")
    env = {
        "API_KEYS": f"{GOOD_KEY},s3cr3t-short,also s3cr3t with spaces",
        "API_KEYS_FILE": str(keys_file),
        "DB_URI": "mongodb://db:27017/app",
        "SMTP_HOST": "smtp.example.com/",
        "SMTP_LOGIN": "mailer",
        "SMTP_PASSWORD": "hunter2-pa55word",
        "SMTP_PORT": "submission",
    }
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env)
    message = str(raised.value)
    assert raised.value.problems == [
        "API_KEYS: key 2 is shorter than 16 characters",
        "API_KEYS: key 3 has spaces, commas or characters a header can't carry",
        "API_KEYS_FILE: line 2 is shorter than 16 characters",
        "SMTP_HOST: must be a host name or address, without scheme or path "
        "(got 'smtp.example.com/')",
        "SMTP_PORT: must be a whole number (got 'submission')",
    ]
    for secret in ("s3cr3t", "hunter2", "pa55word", GOOD_KEY):
        assert secret not in message
        assert secret not in repr(raised.value)


def test_check_config_prints_every_problem(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./.env
    monkeypatch.setenv("PORT", "x")
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert "PORT: " in err and "LOG_LEVEL: " in err


# --- API keys ---------------------------------------------------------------------

GOOD_KEY = "0123456789abcdef-key"


def test_api_keys_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated 2026-11\n{GOOD_KEY}-file\n\n{GOOD_KEY}\n")
    config = Config.from_env(
        {"API_KEYS": f" {GOOD_KEY} ,{GOOD_KEY}-2", "API_KEYS_FILE": str(keys_file)}
    )
    assert [key.reveal() for key in config.api_keys] == [
        GOOD_KEY,
        f"{GOOD_KEY}-2",
        f"{GOOD_KEY}-file",
    ]
    assert GOOD_KEY not in repr(config)
    assert Config.from_env({}).api_keys == ()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"API_KEYS": "s3cr3t"}, "API_KEYS: key 1 is shorter than 16"),
        ({"API_KEYS": f"{GOOD_KEY},s3cr3t"}, "API_KEYS: key 2 is shorter"),
        ({"API_KEYS": "s3cr3t with spaces in it"}, "API_KEYS: key 1 has spaces"),
        ({"API_KEYS": "s3cr3t-ключ-не-ascii-символы"}, "API_KEYS: key 1 has spaces"),
        ({"API_KEYS": " , ,"}, "API_KEYS: is set but holds no key"),
        ({"API_KEYS_FILE": "/no/such/file"}, "API_KEYS_FILE: no such file"),
    ],
)
def test_unusable_api_keys_stop_the_start_without_showing_the_key(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        Config.from_env(env)
    assert "s3cr3t" not in str(raised.value)


def test_a_bad_line_of_the_keys_file_is_named_by_its_number(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# comment\n{GOOD_KEY}\nshort\n")
    with pytest.raises(ConfigError, match="API_KEYS_FILE: line 3 is shorter"):
        Config.from_env({"API_KEYS_FILE": str(keys_file)})
    keys_file.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="API_KEYS_FILE: is set but holds no key"):
        Config.from_env({"API_KEYS_FILE": str(keys_file)})


def test_client_timeout_is_bounded() -> None:
    assert Config.from_env({"CLIENT_TIMEOUT_SECONDS": "2.5"}).client_timeout_seconds == 2.5
    with pytest.raises(ConfigError, match="CLIENT_TIMEOUT_SECONDS"):
        Config.from_env({"CLIENT_TIMEOUT_SECONDS": "0"})


# --- secure by default: no open service beyond loopback ----------------------------


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "10.1.2.3", "[::]", "example.com", "192.168.0.2"]
)
def test_listening_beyond_loopback_without_a_key_is_refused_naming_api_keys(host: str) -> None:
    with pytest.raises(ConfigError, match=r"^API_KEYS: .*ALLOW_UNAUTHENTICATED"):
        Config.from_env({"HOST": host})


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"]
)
def test_loopback_needs_no_key(host: str) -> None:
    assert Config.from_env({"HOST": host}).api_keys == ()


def test_a_key_or_an_explicit_choice_opens_any_host() -> None:
    keyed = Config.from_env({"HOST": "0.0.0.0", "API_KEYS": "k" * 32})
    assert len(keyed.api_keys) == 1
    open_on_purpose = Config.from_env({"HOST": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "true"})
    assert open_on_purpose.allow_unauthenticated
    with pytest.raises(ConfigError, match=r"^API_KEYS: "):
        Config.from_env({"HOST": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "false"})


def test_a_user_token_secret_alone_is_no_key() -> None:
    # Without API keys every route but the token's is open (server.py).
    with pytest.raises(ConfigError, match=r"^API_KEYS: "):
        Config.from_env({"HOST": "0.0.0.0", "USER_TOKEN_SECRET": "s" * 40})


# --- the local mail sink is for development only ------------------------------------


def test_a_database_without_smtp_host_is_refused_naming_smtp_host() -> None:
    # With DB_URI set this is no `make run` on a laptop: mail would silently go to .eml
    # files that nobody reads.
    with pytest.raises(ConfigError, match=r"^SMTP_HOST: .*DEV_MAIL_SINK"):
        Config.from_env({"DB_URI": "mongodb://db:27017/app"})


@pytest.mark.parametrize("value", ["false", "0", "no", ""])
def test_dev_mail_sink_off_still_refuses(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^SMTP_HOST: "):
        Config.from_env({"DB_URI": "mongodb://db:27017/app", "DEV_MAIL_SINK": value})


def test_dev_mail_sink_allows_a_database_without_smtp_host() -> None:
    config = Config.from_env({"DB_URI": "mongodb://db:27017/app", "DEV_MAIL_SINK": "true"})
    assert (config.db_uri, config.smtp_host, config.dev_mail_sink) == (
        "mongodb://db:27017/app",
        None,
        True,
    )


def test_make_run_with_nothing_set_needs_no_flag() -> None:
    # `serve` starts the embedded database and the sink, then hands both to the web
    # server's environment: neither config sees DB_URI without SMTP_HOST.
    assert Config.from_env({}).dev_mail_sink is False
    child = Config.from_env(
        {"DB_URI": "mongodb://127.0.0.1:27018/notifications", "SMTP_HOST": "127.0.0.1",
         "SMTP_PORT": "2525", "SMTP_SECURITY": "none"}
    )  # fmt: skip
    assert child.smtp_host == "127.0.0.1"


def test_check_config_refuses_a_database_without_smtp_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./.env
    for name in ("SMTP_HOST", "SMTP_PORT", "SMTP_LOGIN", "DEV_MAIL_SINK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DB_URI", "mongodb://127.0.0.1:1/app")
    assert main(["check-config"]) == 2
    assert "SMTP_HOST" in capsys.readouterr().err


def test_an_encoded_word_is_not_an_email_address() -> None:
    with pytest.raises(ConfigError, match="EMAIL"):
        Config.from_env({"EMAIL": "=?utf-8?b?DQpCY2M6IHY=?=@example.com"})


# --- secrets cannot be printed by accident ---------------------------------------------

SECRETS = {
    "API_KEYS": f"{GOOD_KEY}-api,{GOOD_KEY}-other",
    "SMTP_PASSWORD": "hunter2-pa55word",
    "DB_URI": "mongodb://app:db-pa55word@db1:27017,db2:27017/app?authSource=admin",
    "SMTP_HOST": "smtp.example.com",
    "SMTP_LOGIN": "mailer",
}
SECRET_VALUES = (f"{GOOD_KEY}-api", f"{GOOD_KEY}-other", "hunter2", "pa55word")


def _renderings(config: Config, caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """Every way a config gets printed without anyone meaning to show a secret."""
    log = logging.getLogger("test_config.renderings")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("config: %s", config)
        log.info("config: %r", config)
        log.info("keys: %s, password: %s", config.api_keys, config.smtp_password)
    as_dict = dataclasses.asdict(config)
    return {
        "str": str(config),
        "repr": repr(config),
        "f-string": f"{config} {config!r} {config.smtp_password} {config.smtp_password:>40}",
        "%s": "%s %s" % (config, config.db_password),  # noqa: UP031  # the old habit, on purpose
        "log": caplog.text,
        "asdict": repr(as_dict),
        "asdict json": json.dumps(as_dict, default=str),
        "vars": repr(vars(config)),
        "vars json": json.dumps(vars(config), default=str),
        # The habit of dumping objects through their __dict__: a Secret has none.
        "__dict__ json": json.dumps(
            config, default=lambda o: getattr(o, "__dict__", None) or str(o)
        ),
        "deepcopy": repr(copy.deepcopy(config)),
        "replace": repr(dataclasses.replace(config, port=1)),
    }


def test_no_rendering_of_the_config_shows_a_secret(caplog: pytest.LogCaptureFixture) -> None:
    config = Config.from_env(SECRETS)
    for how, text in _renderings(config, caplog).items():
        for secret in SECRET_VALUES:
            assert secret not in text, f"{how} shows {secret!r}"
        if how not in ("log",):
            assert "***" in text, how
    # What is not secret still shows: the user and hosts of DB_URI, the SMTP login.
    assert "mongodb://app@db1:27017,db2:27017/app?authSource=admin" in repr(config)
    assert "smtp_login='mailer'" in repr(config)


def test_the_secrets_are_read_back_only_through_reveal() -> None:
    config = Config.from_env(SECRETS)
    assert [k.reveal() for k in config.api_keys] == [f"{GOOD_KEY}-api", f"{GOOD_KEY}-other"]
    assert config.smtp_password is not None
    assert config.smtp_password.reveal() == "hunter2-pa55word"
    assert config.reveal_db_uri() == SECRETS["DB_URI"]
    assert config.db_uri == "mongodb://app@db1:27017,db2:27017/app?authSource=admin"
    assert config.database_name == "app"


def test_a_secret_shows_stars_has_no_dict_and_is_not_pickled() -> None:
    secret = Secret("s3cr3t-value")
    assert (str(secret), repr(secret), f"{secret}", f"{secret:>5}") == ("***",) * 3 + ("  ***",)
    assert "%s %r" % (secret, secret) == "*** ***"  # noqa: UP031
    with pytest.raises(TypeError):
        vars(secret)
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(secret)
    with pytest.raises(AttributeError):
        secret._value = "other"  # type: ignore[misc]
    assert secret == Secret("s3cr3t-value") and secret != Secret("other")
    assert secret != "s3cr3t-value"  # a plain string is not let in through ==
    assert copy.deepcopy(secret) is secret
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]


def test_a_config_built_by_hand_holds_its_secrets_as_secrets() -> None:
    # Tests and benchmarks pass plain strings; the config wraps them all the same.
    config = Config(
        api_keys=(GOOD_KEY,), smtp_password="hunter2", db_uri="mongodb://u:pa55word@h/app"
    )
    assert all(isinstance(k, Secret) for k in config.api_keys)
    assert isinstance(config.smtp_password, Secret)
    assert config.db_uri == "mongodb://u@h/app"
    assert config.reveal_db_uri() == "mongodb://u:pa55word@h/app"
    for secret in ("hunter2", "pa55word", GOOD_KEY):
        assert secret not in repr(config)
    # replace() keeps the password for the same user, and drops it for a URI without one.
    assert dataclasses.replace(config, port=1).reveal_db_uri() == "mongodb://u:pa55word@h/app"
    assert dataclasses.replace(config, db_uri="mongodb://other/app").db_password is None
    assert dataclasses.replace(config, db_uri=None).reveal_db_uri() is None
    assert dataclasses.replace(config) == config  # secrets compare by value


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("mongodb://db:27017/app", "mongodb://db:27017/app"),
        ("mongodb://u:p@db/app", "mongodb://u@db/app"),
        ("mongodb://u@db/app?authMechanism=MONGODB-X509", "mongodb://u@db/app?authMechanism=MONGODB-X509"),
        ("mongodb://u:@db/app", "mongodb://u@db/app"),
        ("mongodb+srv://u:p%40ss%3Aw@cluster.example.com/app", "mongodb+srv://u@cluster.example.com/app"),
        # The driver's reading: the userinfo ends at the last @ before the path.
        ("mongodb://u:p@ss@db/app", "mongodb://u@db/app"),
        ("mongodb://u:p:ss@db1,db2:27018/?replicaSet=rs", "mongodb://u@db1,db2:27018/?replicaSet=rs"),
        ("mongodb://db/app?appname=a@b:c", "mongodb://db/app?appname=a@b:c"),
        ("mongodb://u:p@db?tls=true", "mongodb://u@db?tls=true"),
    ],
)  # fmt: skip
def test_the_password_is_split_off_and_put_back_exactly(uri: str, shown: str) -> None:
    without, password = split_password(uri)
    assert without == shown
    assert (join_password(without, password) if password is not None else without) == uri
    assert Config(db_uri=uri).reveal_db_uri() == uri


def test_a_refused_db_uri_is_echoed_without_its_password() -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"DB_URI": "postgres://app:pa55word@db/app"})
    assert str(raised.value) == (
        "DB_URI: must start with mongodb:// or mongodb+srv:// (got 'postgres://app@db/app')"
    )


@pytest.mark.parametrize(
    "uri",
    [
        "mongodb://app:pa55/w0rd@db/app",  # unescaped / and ? in the password: the driver
        "mongodb://app:pa55?w0rd@db/app",  # sees no user, and refuses the URI
        "mongodb://app:pa55:w0rd@db/app",
        "mongodb://app:pa55@w0rd@db/app",
    ],
)
def test_a_malformed_password_is_refused_without_being_shown(
    uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./.env
    monkeypatch.setenv("DB_URI", uri)
    monkeypatch.setenv("SMTP_HOST", "smtp.example.com")
    assert main(["check-config"]) == 2
    out, err = capsys.readouterr()
    assert "DB_URI: " in err
    assert "pa55" not in out + err and "w0rd" not in out + err


def test_an_unreadable_keys_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_bytes(GOOD_KEY.encode() + b"\xff\xfes3cr3t\n")
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"API_KEYS_FILE": str(keys_file)})
    assert str(raised.value) == "API_KEYS_FILE: cannot be read as UTF-8 text (UnicodeDecodeError)"


# --- the key table and unsubscribe links ----------------------------------------------------

UNSUBSCRIBE_SECRET = "u" * 32
OPTIONAL_EMAIL_KEY = '[keys.new_comment]\nin_app = true\nemail = "if_unread"\n'
MANDATORY_EMAIL_KEY = '[keys.password_reset]\nin_app = false\nemail = "always"\nmandatory = true\n'


def keys_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return str(path)


def test_keys_file_replaces_the_key_table(tmp_path: Path) -> None:
    config = Config.from_env({"KEYS_FILE": keys_file(tmp_path, MANDATORY_EMAIL_KEY)})
    assert config.keys.names == ("password_reset",)
    assert config.keys.get("password_reset").mandatory is True


def test_a_bad_keys_file_stops_the_start_naming_the_variable_the_file_the_key_and_field(
    tmp_path: Path,
) -> None:
    path = keys_file(tmp_path, '[keys.new_comment]\nin_app = true\nemail = "sometimes"\n')
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"KEYS_FILE": path})
    assert raised.value.problems == [
        f"KEYS_FILE: {path}: key 'new_comment' field 'email': must be one of 'never', "
        "'always', 'if_unread', not 'sometimes'"
    ]
    with pytest.raises(ConfigError, match="KEYS_FILE: no such file"):
        Config.from_env({"KEYS_FILE": str(tmp_path / "nowhere.toml")})


def test_email_after_seconds_is_bounded_by_dispatch_max_age_seconds(tmp_path: Path) -> None:
    text = '[keys.a]\nin_app = true\nemail = "if_unread"\nemail_after_seconds = 7200\n'
    path = keys_file(tmp_path, text)
    env = {"KEYS_FILE": path, "UNSUBSCRIBE_SECRET": UNSUBSCRIBE_SECRET, "PUBLIC_URL": "http://x"}
    assert Config.from_env(env).keys.get("a").email_after_seconds == 7200
    with pytest.raises(ConfigError) as raised:
        Config.from_env({**env, "DISPATCH_MAX_AGE_SECONDS": "3600"})
    assert [p.split(":", 1)[0] for p in raised.value.problems] == ["KEYS_FILE"]
    assert "field 'email_after_seconds': must be from 1 to 3600" in str(raised.value)
    # A bad bound is reported alone: the file is judged once the bound is known.
    with pytest.raises(ConfigError) as raised:
        Config.from_env({**env, "DISPATCH_MAX_AGE_SECONDS": "soon"})
    assert [p.split(":", 1)[0] for p in raised.value.problems] == ["DISPATCH_MAX_AGE_SECONDS"]


def test_a_key_the_user_can_turn_off_that_emails_needs_the_secret_and_the_public_url(
    tmp_path: Path,
) -> None:
    path = keys_file(tmp_path, OPTIONAL_EMAIL_KEY + MANDATORY_EMAIL_KEY)
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"KEYS_FILE": path})
    assert [p.split(":", 1)[0] for p in raised.value.problems] == [
        "UNSUBSCRIBE_SECRET",
        "PUBLIC_URL",
    ]
    assert "(new_comment)" in raised.value.problems[0]
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"KEYS_FILE": path, "PUBLIC_URL": "https://notify.example.com"})
    assert [p.split(":", 1)[0] for p in raised.value.problems] == ["UNSUBSCRIBE_SECRET"]
    config = Config.from_env(
        {
            "KEYS_FILE": path,
            "PUBLIC_URL": "https://notify.example.com/",
            "UNSUBSCRIBE_SECRET": UNSUBSCRIBE_SECRET,
        }
    )
    assert config.public_url == "https://notify.example.com"
    assert config.unsubscribe_secret is not None
    assert config.unsubscribe_secret.reveal() == UNSUBSCRIBE_SECRET
    assert UNSUBSCRIBE_SECRET not in repr(config)


def test_mandatory_email_keys_alone_need_neither(tmp_path: Path) -> None:
    config = Config.from_env({"KEYS_FILE": keys_file(tmp_path, MANDATORY_EMAIL_KEY)})
    assert (config.unsubscribe_secret, config.public_url) == (None, None)
    assert Config.from_env({}).public_url is None  # the seed's table: all mail is mandatory


def test_a_short_unsubscribe_secret_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"UNSUBSCRIBE_SECRET": "short-s3cret"})
    assert str(raised.value).startswith("UNSUBSCRIBE_SECRET: must be at least 32 bytes")
    assert "short-s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("https://notify.example.com", "https://notify.example.com"),
        ("https://notify.example.com/", "https://notify.example.com"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("HTTPS://example.com/notifications//", "HTTPS://example.com/notifications"),
    ],
)
def test_public_url_is_kept_without_its_trailing_slash(given: str, kept: str) -> None:
    assert Config.from_env({"PUBLIC_URL": given}).public_url == kept


@pytest.mark.parametrize(
    "bad",
    [
        "notify.example.com",
        "ftp://notify.example.com",
        "javascript:alert(1)",
        "https://",
        "https://notify.example.com/?ref=mail",
        "https://notify.example.com/#top",
        "https://notify.example.com/a b",
        "https://user:pass@notify.example.com",
        "https://notify.example.com:99999",
        "https://notify.example.com/\u00e9",
    ],
)
def test_a_bad_public_url_is_refused_naming_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"PUBLIC_URL": bad})
    assert [p.split(":", 1)[0] for p in raised.value.problems] == ["PUBLIC_URL"]


def test_a_config_built_by_hand_holds_the_unsubscribe_secret_as_a_secret() -> None:
    config = Config(unsubscribe_secret=UNSUBSCRIBE_SECRET)  # type: ignore[arg-type]
    assert isinstance(config.unsubscribe_secret, Secret)
    assert UNSUBSCRIBE_SECRET not in repr(config)


@pytest.mark.parametrize(
    "bad",
    [
        'https://notify.example.com/"quoted"',
        "https://notify.example.com/a>b",
        "https://notify.example.com/<a>",
        "https://notify.example.com/" + "a" * 900,
    ],
)
def test_a_public_url_no_list_unsubscribe_header_can_carry_is_refused_at_start(
    bad: str, tmp_path: Path
) -> None:
    # Accepted, it would make every email of a key the user can turn off fail for good
    # at send time ("cannot build message"), hours after the start.
    path = keys_file(tmp_path, OPTIONAL_EMAIL_KEY)
    env = {"KEYS_FILE": path, "UNSUBSCRIBE_SECRET": UNSUBSCRIBE_SECRET}
    with pytest.raises(ConfigError) as raised:
        Config.from_env({**env, "PUBLIC_URL": bad})
    assert [p.split(":", 1)[0] for p in raised.value.problems] == ["PUBLIC_URL"]


def test_every_public_url_accepted_builds_an_email_up_to_the_longest(tmp_path: Path) -> None:
    longest_key = "k" * 64  # the longest token: a 64-character key name
    path = keys_file(tmp_path, f'[keys.{longest_key}]\nin_app = false\nemail = "always"\n')
    env = {"KEYS_FILE": path, "UNSUBSCRIBE_SECRET": UNSUBSCRIBE_SECRET}
    accepted = []
    for base in ("https://notify.example.com/", "HTTPS://notify.example.com/"):
        for size in (0, 500, 800, 820, 830, 840, 860, 900):
            with contextlib.suppress(ConfigError):
                accepted.append(Config.from_env({**env, "PUBLIC_URL": base + "a" * size}))
    assert 6 <= len(accepted) < 16
    for config in accepted:
        url = unsubscribe_url(config, "f" * 24, longest_key)
        assert url is not None
        email = OutgoingEmail("u@example.com", "s", "t", None, "<a@example.com>", url)
        build_message(email, from_email="from@example.com", from_name=None)
