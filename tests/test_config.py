"""Configuration: defaults, the .env file, and refusals that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from notification_service.config import Config, ConfigError


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
            "SMTP_PASSWORD": "secret",
            "SMTP_EMAIL": "noreply@example.com",
            "SMTP_NAME": "Служба",
            "EMAIL": "test@example.com",
        }
    )
    assert config.port == 8080
    assert config.database_name == "app"
    assert (config.smtp_host, config.resolved_smtp_port) == ("smtp.example.com", 465)
    assert (config.smtp_login, config.smtp_password) == ("mailer", "secret")
    assert (config.smtp_email, config.smtp_name, config.email) == (
        "noreply@example.com",
        "Служба",
        "test@example.com",
    )
    assert "secret" not in repr(config)


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
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{variable}: "):
        Config.from_env(env)


# --- API keys ---------------------------------------------------------------------

GOOD_KEY = "0123456789abcdef-key"


def test_api_keys_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated 2026-11\n{GOOD_KEY}-file\n\n{GOOD_KEY}\n")
    config = Config.from_env(
        {"API_KEYS": f" {GOOD_KEY} ,{GOOD_KEY}-2", "API_KEYS_FILE": str(keys_file)}
    )
    assert config.api_keys == (GOOD_KEY, f"{GOOD_KEY}-2", f"{GOOD_KEY}-file")
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
