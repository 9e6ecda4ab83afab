"""The domain of preferences: which channels of which keys a user gets, and the
one-click unsubscribe links of their emails (unsubscribe.py).

A user holds only what they changed (storage/preference_updates.py); every key of the
table answers, each with the channels it uses, and a mandatory key always shows them
on: nobody can turn it off, neither through PUT nor through a link.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ErrorDetail, InvalidUnsubscribeToken, MandatoryKey, ValidationFailed
from .keys import KeyTable
from .notifications import Services
from .schemas import KeyPreferences, Preferences, PreferencesUpdate
from .unsubscribe import read_token


def get(svc: Services, user_id: str) -> Preferences:
    """Every key of the table with the user's channels.

    :raise UserNotFound:
    """
    return view(svc.config.keys, svc.preferences.get(user_id))


def put(svc: Services, request: PreferencesUpdate) -> Preferences:
    """Turn the given channels on or off (the others stay), in one write; answer as `get`.

    :raise ValidationFailed: a key the table lacks, or a channel its key does not use.
    :raise MandatoryKey: turning off a channel of a mandatory key (nothing is written).
    :raise UserNotFound: / :raise UserDocumentInvalid:
    """
    keys: KeyTable = svc.config.keys
    problems: list[ErrorDetail] = []
    changes: dict[str, dict[str, bool]] = {}
    mandatory: list[str] = []
    for name, channels in request.keys.items():
        if name not in keys:
            problems.append({"field": f"keys.{name}", "problem": "is not a key of this service"})
            continue
        spec = keys.get(name)
        for channel in channels:
            if channel not in spec.channels:
                problems.append(
                    {"field": f"keys.{name}.{channel}", "problem": "is not a channel of this key"}
                )
        if spec.mandatory:
            if any(on is False for on in channels.values()):
                mandatory.append(name)
            continue  # "on" is all a mandatory key can be: nothing to store
        if channels:
            changes[name] = {channel: bool(on) for channel, on in channels.items()}
    if problems:
        raise ValidationFailed(details=problems)
    if mandatory:
        raise MandatoryKey(*mandatory)
    return view(keys, svc.preferences.update(request.user_id, changes))


def view(keys: KeyTable, stored: Mapping[str, Mapping[str, bool]]) -> Preferences:
    """The answer of GET and PUT: each key of `keys` with the channels it uses, on
    unless the user turned them off; a mandatory key's always on."""
    shown: dict[str, KeyPreferences] = {}
    for spec in keys:
        own = stored.get(spec.name, {})
        channels = {c: True if spec.mandatory else own.get(c, True) for c in spec.channels}
        shown[spec.name] = {**channels, "mandatory": spec.mandatory}  # type: ignore[typeddict-item]
    return {"keys": shown}


@dataclass(frozen=True)
class Link:
    """What an unsubscribe link names, and whether its key can be turned off."""

    user_id: str
    key: str
    mandatory: bool


def read_link(svc: Services, token: str) -> Link:
    """The (user, key) of a genuine unsubscribe token; reads nothing from the database.

    :raise InvalidUnsubscribeToken: malformed, altered, forged, or no secret configured.
    """
    secret = svc.config.unsubscribe_secret
    if secret is None:  # no link of this service can be genuine
        raise InvalidUnsubscribeToken()
    user_id, key = read_token(secret.reveal().encode("utf-8"), token)
    keys: KeyTable = svc.config.keys
    return Link(user_id, key, keys.mandatory(key))


def unsubscribe(svc: Services, token: str) -> Link:
    """Turn off the email of the link's key for its user (RFC 8058's one-click).

    Idempotent; a user whose document is gone is not an error (nothing will be sent to
    them). A key no longer in the table is turned off all the same, so that it stays off
    if it comes back.

    :raise InvalidUnsubscribeToken: / :raise MandatoryKey: the key became mandatory.
    :raise UserDocumentInvalid: the user's document cannot hold preferences.
    """
    return _set_email(svc, token, on=False)


def resubscribe(svc: Services, token: str) -> Link:
    """Undo `unsubscribe`: the link's key emails its user again.

    :raise InvalidUnsubscribeToken: / :raise UserDocumentInvalid:
    """
    return _set_email(svc, token, on=True)


def _set_email(svc: Services, token: str, *, on: bool) -> Link:
    link = read_link(svc, token)
    if link.mandatory:
        if on:
            return link  # on is all it can be
        raise MandatoryKey(link.key)
    svc.preferences.set_channel(link.user_id, link.key, "email", on)
    return link
