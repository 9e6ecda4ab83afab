"""Pure builders of the queries and updates of a user's preferences (preference_store.py).

Preferences live in the user's own document, beside the notifications array:
`<field>_prefs = {"<key>": {"in_app": bool, "email": bool}}`, holding only what the user
has set (a channel absent is on). There, a create's existing write can carry the in-app
condition (`in_app_allowed`) without another command, the email path reads them with
the user it reads anyway, and erasing a user's notifications (which unsets the array
and its meta) leaves the opt-outs in place, kept by user id without the address.

Key names match keys.KEY_NAME (no `.`, no `$`), so a key is safe as a path segment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import ObjectId

from .updates import Layout, bump

Document = dict[str, Any]
CHANNELS = ("in_app", "email")


def prefs_field(layout: Layout) -> str:
    """The field of the user's document that holds their preferences."""
    return f"{layout.field}_prefs"


def path(layout: Layout, key: str, channel: str) -> str:
    """The dotted path of one channel of one key."""
    return f"{prefs_field(layout)}.{key}.{channel}"


def stored(layout: Layout, user: Mapping[str, Any]) -> dict[str, dict[str, bool]]:
    """What the user has set, from their document: a channel is off where the database
    finds `false` at its path (`in_app_allowed`, the condition of a create's write, is
    that search: it looks into arrays on the way and at the end, so an opt-out another
    writer left as `[{"<key>": {"in_app": false}}]` or `{"in_app": [false]}` is one for
    both), on where it holds `true`; anything else reads as not set."""
    raw = user.get(prefs_field(layout))
    found: dict[str, dict[str, bool]] = {}
    for key in _names(raw):
        chosen: dict[str, bool] = {}
        for channel in CHANNELS:
            if _holds_false(raw, (key, channel)):
                chosen[channel] = False
            elif _at(raw, key, channel) is True:
                chosen[channel] = True
        if chosen:
            found[key] = chosen
    return found


def _names(raw: Any) -> list[str]:
    """The keys named in the field, in their order: its own, or its documents' when it
    is an array of them."""
    names: dict[str, None] = {}
    for part in raw if isinstance(raw, list) else [raw]:
        if isinstance(part, Mapping):
            names.update(dict.fromkeys(k for k in part if isinstance(k, str)))
    return list(names)


def _at(raw: Any, key: str, channel: str) -> Any:
    channels = raw.get(key) if isinstance(raw, Mapping) else None
    return channels.get(channel) if isinstance(channels, Mapping) else None


def _holds_false(value: Any, path: tuple[str, ...]) -> bool:
    """Whether the query `{<path>: false}` matches `value`: a document is followed by
    name, an array's documents each followed (one level, as the database does), and at
    the end `false` itself or an array that holds it (never 0 or "false")."""
    if not path:
        return value is False or (isinstance(value, list) and any(v is False for v in value))
    if isinstance(value, Mapping):
        return path[0] in value and _holds_false(value[path[0]], path[1:])
    if isinstance(value, list):
        return any(isinstance(v, Mapping) and _holds_false(v, path) for v in value)
    return False


def opted_out(layout: Layout, user: Mapping[str, Any], key: str) -> set[str]:
    """The channels of `key` the user has turned off (only an explicit false counts)."""
    return {channel for channel, on in stored(layout, user).get(key, {}).items() if not on}


def set_channels(layout: Layout, changes: Mapping[str, Mapping[str, bool]]) -> Document:
    """One `$set` of the given channels (a partial update: the others stay as they are),
    and the version every write moves."""
    return {
        "$set": {
            path(layout, key, channel): on
            for key, channels in changes.items()
            for channel, on in channels.items()
        },
        **bump(layout),
    }


def changing(layout: Layout, oid: ObjectId, key: str, channel: str, on: bool) -> Document:
    """The filter of a write that sets one channel: only when it is not so already, so
    that a repeated unsubscribe writes nothing (and moves no version)."""
    return {"_id": oid, path(layout, key, channel): {"$ne": on}}


def in_app_allowed(layout: Layout, key: str) -> Document:
    """A filter condition a create's write adds: the user has not turned `key`'s in-app
    notifications off (a user who never said anything matches)."""
    return {path(layout, key, "in_app"): {"$ne": False}}


def projection(layout: Layout, key: str | None = None) -> Document:
    """Read the preferences (of one key, or all) and nothing else."""
    return {prefs_field(layout) if key is None else f"{prefs_field(layout)}.{key}": 1}
