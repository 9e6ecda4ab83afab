"""The key table: the seed's default, KEYS_FILE loading and its refusals, and an app
that accepts, stores and lists exactly the keys of its table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydantic import ValidationError

from notification_service.config import Config
from notification_service.keys import DEFAULT_KEYS, KeysFileError, KeySpec, KeyTable
from notification_service.schemas import CreateRequest, ListQuery

USER = "638f394d4b7243fc0399ea67"
MAX_AGE = 86400.0


def write(tmp_path: Path, text: str | bytes, name: str = "keys.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, max_age_seconds: float = MAX_AGE) -> KeyTable:
    return KeyTable.load(path, max_age_seconds=max_age_seconds)


# --- the default table -------------------------------------------------------------------


def test_the_default_table_is_the_seeds_four_keys_with_their_behaviour() -> None:
    table = {s.name: (s.in_app, s.email, s.mandatory, s.template, s.channels) for s in DEFAULT_KEYS}
    assert table == {
        "registration": (False, "always", True, "registration", ("email",)),
        "new_message": (True, "never", False, None, ("in_app",)),
        "new_post": (True, "never", False, None, ("in_app",)),
        "new_login": (True, "always", True, "new_login", ("in_app", "email")),
    }
    assert DEFAULT_KEYS.names == ("registration", "new_message", "new_post", "new_login")
    assert [s.name for s in DEFAULT_KEYS.emailing] == ["registration", "new_login"]
    assert Config().keys == DEFAULT_KEYS == Config.from_env({}).keys


def test_a_table_is_looked_up_by_name_and_refuses_an_unknown_one() -> None:
    assert DEFAULT_KEYS.get("new_post") == KeySpec("new_post", in_app=True, email="never")
    assert "new_post" in DEFAULT_KEYS and "new_comment" not in DEFAULT_KEYS
    assert len(DEFAULT_KEYS) == 4
    with pytest.raises(KeyError):
        DEFAULT_KEYS.get("new_comment")
    with pytest.raises(ValueError, match="twice"):
        KeyTable([KeySpec("a", True, "never"), KeySpec("a", False, "always")])


def test_without_context_the_request_models_take_the_default_table() -> None:
    for name in DEFAULT_KEYS.names:
        assert CreateRequest.model_validate({"user_id": USER, "key": name}).key == name
    with pytest.raises(ValidationError):
        CreateRequest.model_validate({"user_id": USER, "key": "new_comment"})


# --- loading a file ----------------------------------------------------------------------


def test_the_issues_example_loads_with_the_defaults_of_the_fields_it_omits(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """
        [keys.new_message]
        in_app = true
        email = "if_unread"
        email_after_seconds = 600
        """,
    )
    assert list(load(path)) == [
        KeySpec("new_message", in_app=True, email="if_unread", email_after_seconds=600)
    ]


def test_a_file_replaces_the_table_in_its_own_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [keys.weekly_digest]
        in_app = false
        email = "always"
        template = "weekly"
        [keys.new_comment]
        in_app = true
        email = "never"
        [keys.password_reset]
        in_app = false
        email = "always"
        mandatory = true
        """,
    )
    table = load(path)
    assert table.names == ("weekly_digest", "new_comment", "password_reset")
    assert table.get("weekly_digest").template == "weekly"
    assert table.get("new_comment").channels == ("in_app",)
    assert table.get("password_reset").mandatory is True
    assert table.get("password_reset").template is None  # the generic template
    assert table.get("new_comment").email_after_seconds == 900
    assert "new_post" not in table  # replaced, not extended


def test_email_after_seconds_may_reach_the_dispatchers_max_age(tmp_path: Path) -> None:
    text = '[keys.a]\nin_app = true\nemail = "if_unread"\nemail_after_seconds = 3600\n'
    assert load(write(tmp_path, text), max_age_seconds=3600).get("a").email_after_seconds == 3600
    with pytest.raises(KeysFileError, match="from 1 to 3599"):
        load(write(tmp_path, text), max_age_seconds=3599)


GOOD = 'in_app = true\nemail = "never"\n'

# (what, file text, the key named, the field named, a word of the problem)
BAD_FILES: list[tuple[str, str | bytes, str | None, str | None, str]] = [
    ("unknown field", f'[keys.a]\n{GOOD}colour = "red"\n', "a", "colour", "unknown field"),
    ("typo of a field", '[keys.a]\nin_app = true\nemails = "never"\n', "a", "emails", "unknown"),
    ("in_app a string", '[keys.a]\nin_app = "yes"\nemail = "never"\n', "a", "in_app", "true or"),
    ("email a bool", "[keys.a]\nin_app = true\nemail = true\n", "a", "email", "a string"),
    ("mandatory a number", f"[keys.a]\n{GOOD}mandatory = 1\n", "a", "mandatory", "true or"),
    (
        "template a number",
        '[keys.a]\nin_app = true\nemail = "always"\ntemplate = 3\n',
        "a",
        "template",
        "a string",
    ),
    (
        "email unknown mode",
        '[keys.a]\nin_app = true\nemail = "sometimes"\n',
        "a",
        "email",
        "if_unread",
    ),
    (
        "if_unread without in_app",
        '[keys.a]\nin_app = false\nemail = "if_unread"\n',
        "a",
        "email",
        "in_app = true",
    ),
    ("no channel", '[keys.a]\nin_app = false\nemail = "never"\n', "a", "in_app", "no channel"),
    ("in_app missing", '[keys.a]\nemail = "always"\n', "a", "in_app", "required"),
    ("email missing", "[keys.a]\nin_app = true\n", "a", "email", "required"),
    (
        "delay zero",
        '[keys.a]\nin_app = true\nemail = "if_unread"\nemail_after_seconds = 0\n',
        "a",
        "email_after_seconds",
        "from 1 to 86400",
    ),
    (
        "delay past max age",
        '[keys.a]\nin_app = true\nemail = "if_unread"\nemail_after_seconds = 86401\n',
        "a",
        "email_after_seconds",
        "DISPATCH_MAX_AGE_SECONDS",
    ),
    (
        "delay a float",
        '[keys.a]\nin_app = true\nemail = "if_unread"\nemail_after_seconds = 1.5\n',
        "a",
        "email_after_seconds",
        "an integer",
    ),
    (
        "delay a bool",
        '[keys.a]\nin_app = true\nemail = "if_unread"\nemail_after_seconds = true\n',
        "a",
        "email_after_seconds",
        "an integer",
    ),
    (
        "delay without if_unread",
        f"[keys.a]\n{GOOD}email_after_seconds = 60\n",
        "a",
        "email_after_seconds",
        "if_unread",
    ),
    (
        "template of a key that never emails",
        f'[keys.a]\n{GOOD}template = "a"\n',
        "a",
        "template",
        "never emails",
    ),
    (
        "template a path",
        '[keys.a]\nin_app = true\nemail = "always"\ntemplate = "../etc/x"\n',
        "a",
        "template",
        "file name",
    ),
    ("name upper case", f"[keys.NewPost]\n{GOOD}", "NewPost", None, "^[a-z][a-z0-9_]{0,63}$"),
    ("name with a dash", f'[keys."new-post"]\n{GOOD}', "new-post", None, "must match"),
    ("name too long", f"[keys.{'a' * 65}]\n{GOOD}", "a" * 65, None, "must match"),
    ("name starting with a digit", f"[keys.1st]\n{GOOD}", "1st", None, "must match"),
    ("a key that is not a table", '[keys]\na = "yes"\n', "a", None, "must be a table"),
    ("no keys table", f"[key.a]\n{GOOD}", None, None, "[keys]"),
    ("keys not a table", 'keys = ["a"]\n', None, None, "[keys]"),
    ("empty keys table", "[keys]\n", None, None, "defines no key"),
    ("invalid TOML", "[keys.a\nin_app = true\n", None, None, "not valid TOML"),
    ("not UTF-8", b'[keys.a]\nin_app = true\nemail = "n\xe9ver"\n', None, None, "not UTF-8"),
]


@pytest.mark.parametrize(
    ("what", "text", "key", "field", "problem"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
def test_a_bad_file_is_refused_naming_the_file_the_key_and_the_field(
    tmp_path: Path, what: str, text: str | bytes, key: str | None, field: str | None, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(KeysFileError) as raised:
        load(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:"), message
    assert (raised.value.key, raised.value.field) == (key, field)
    if key is not None:
        assert f"key {key!r}" in message
    if field is not None:
        assert f"field {field!r}" in message
    assert problem in message


def test_a_file_that_cannot_be_read_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match=r"missing\.toml: cannot be read"):
        load(tmp_path / "missing.toml")


# --- an app running a KEYS_FILE table -----------------------------------------------------

KEYS_FILE = """
[keys.new_comment]
in_app = true
email = "never"

[keys.weekly_report]
in_app = false
email = "always"
mandatory = true
"""


@pytest.fixture
def file_config(tmp_path: Path, db_uri: str) -> Config:
    return Config.from_env(
        {
            "KEYS_FILE": str(write(tmp_path, KEYS_FILE)),
            "DB_URI": db_uri,
            "DEV_MAIL_SINK": "true",
            "DISPATCHER_THREADS": "0",
        }
    )


def test_a_key_of_the_keys_file_is_created_and_listed_and_the_replaced_ones_are_422(
    make_app: Callable[..., Flask], file_config: Config, make_user: Callable[..., str]
) -> None:
    client = make_app(file_config).test_client()
    user = make_user()
    created = client.post("/create", json={"user_id": user, "key": "new_comment", "data": {"a": 1}})
    assert created.status_code == 201, created.get_json()
    notification_id = created.get_json()["data"]["notification_id"]
    listed = client.get(f"/list?user_id={user}&key=new_comment").get_json()["data"]
    assert [(n["id"], n["key"], n["data"]) for n in listed["list"]] == [
        (notification_id, "new_comment", {"a": 1})
    ]

    # The seed's keys are gone with the table the file replaced: the same 422 as any
    # unknown key, whose message lists the table's keys.
    refused = client.post("/create", json={"user_id": user, "key": "new_post"})
    assert refused.status_code == 422
    error = refused.get_json()["error"]
    assert error["code"] == "validation_failed"
    assert error["details"] == [
        {"field": "key", "problem": "Input should be 'new_comment' or 'weekly_report'"}
    ]
    refused = client.get(f"/list?user_id={user}&key=new_post")
    assert refused.status_code == 422
    assert refused.get_json()["error"]["details"][0]["field"] == "key"


def test_a_key_without_a_template_is_emailed_through_the_generic_one(
    make_app: Callable[..., Flask], file_config: Config, make_user: Callable[..., str], db: Any
) -> None:
    client = make_app(file_config).test_client()
    user = make_user(name="Zoë")
    body = {"user_id": user, "key": "weekly_report", "data": {"title": "<b>Week 48</b>"}}
    created = client.post("/create", json=body)
    assert created.status_code == 201, created.get_json()
    data = created.get_json()["data"]
    assert data["notification_id"] is None and data["email_id"] is not None
    record = db[file_config.outbox_collection].find_one({"key": "weekly_report"})
    assert record["subject"] == "A new notification (weekly_report)"
    assert "title: <b>Week 48</b>" in record["text"] and "Zoë" in record["text"]
    assert "&lt;b&gt;Week 48&lt;/b&gt;" in record["html"] and "<b>Week" not in record["html"]


def test_the_default_table_still_answers_the_seeds_422_for_an_unknown_key(
    make_app: Callable[..., Flask], config: Config, user_id: str
) -> None:
    client = make_app(config).test_client()
    refused = client.post("/create", json={"user_id": user_id, "key": "new_comment"})
    assert refused.status_code == 422
    assert refused.get_json()["error"]["details"] == [
        {
            "field": "key",
            "problem": "Input should be 'registration', 'new_message', 'new_post' or 'new_login'",
        }
    ]


def test_list_query_validates_the_key_against_the_table_in_its_context() -> None:
    table = KeyTable([KeySpec("only_one", in_app=True, email="never")])
    query = {"user_id": USER, "key": "only_one"}
    assert ListQuery.model_validate(query, context={"keys": table}).key == "only_one"
    with pytest.raises(ValidationError) as raised:
        ListQuery.model_validate({**query, "key": "new_post"}, context={"keys": table})
    assert raised.value.errors()[0]["type"] == "literal_error"
