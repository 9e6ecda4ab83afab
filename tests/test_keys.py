"""The table of notification keys is the one source of what the API accepts and does."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from notification_service.keys import EMAIL_KEYS, KEYS, NotificationKey
from notification_service.schemas import CreateRequest

USER = "638f394d4b7243fc0399ea67"


def test_the_seed_keys_do_what_the_spec_says() -> None:
    table = {key: (a.record, a.email) for key, a in KEYS.items()}
    assert table == {
        "registration": (False, True),
        "new_message": (True, False),
        "new_post": (True, False),
        "new_login": (True, True),
    }
    assert EMAIL_KEYS == ("registration", "new_login")


def test_the_request_model_accepts_exactly_the_table_keys() -> None:
    assert get_args(NotificationKey) == tuple(KEYS)
    for key in KEYS:
        assert CreateRequest.model_validate({"user_id": USER, "key": key}).key == key
    with pytest.raises(ValidationError):
        CreateRequest.model_validate({"user_id": USER, "key": "new_comment"})
    schema = CreateRequest.model_json_schema()
    assert schema["properties"]["key"]["enum"] == list(KEYS)
