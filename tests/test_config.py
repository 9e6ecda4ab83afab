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
