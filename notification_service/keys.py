"""The one table of notification keys and what each one does (SPEC §3).

A new key is one line here: the request models accept it, the domain follows its
actions, and the templates of a key that sends email are loaded (and checked) at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal


@dataclass(frozen=True)
class Actions:
    record: bool  # stored in the user's notifications array
    email: bool  # sent as an email through the outbox


KEYS: dict[str, Actions] = {
    "registration": Actions(record=False, email=True),
    "new_message": Actions(record=True, email=False),
    "new_post": Actions(record=True, email=False),
    "new_login": Actions(record=True, email=True),
}

EMAIL_KEYS: tuple[str, ...] = tuple(key for key, actions in KEYS.items() if actions.email)

if TYPE_CHECKING:
    NotificationKey = str
else:
    # Built from the table, so that the request models (and the OpenAPI document they
    # will produce) list exactly these keys, in this order.
    NotificationKey = Literal[tuple(KEYS)]
