"""Each user's notification preferences, in their own document (preference_updates.py
says where and why).

Read by the preferences routes, by the create path (`opted_out`, from the user document
it has already read) and by the dispatcher at send time (`email_allowed`), so that a
change made before an email is due stops it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from bson import ObjectId
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure

from ..config import Config
from ..errors import UserDocumentInvalid, UserNotFound
from ..keys import KeySpec
from . import preference_updates as prefs
from .ids import id_batches, matching
from .mongo_connector import DOCUMENT_REFUSALS, Document, guarded
from .updates import Layout

Choices = dict[str, dict[str, bool]]  # {"<key>": {"in_app"?: bool, "email"?: bool}}


class PreferenceStore:
    """The `<field>_prefs` of the users collection."""

    def __init__(self, db: Database[Document], config: Config) -> None:
        self.users: Collection[Document] = db[config.users_collection]
        self.layout = Layout.of(config)
        self.field = prefs.prefs_field(self.layout)

    # -- pure, on a document already read ------------------------------------------------

    def opted_out(self, user_doc: Mapping[str, Any], key: str) -> set[str]:
        """The channels (`in_app`, `email`) of `key` that the user has turned off, read
        from their document as the caller has it (it must not project `<field>_prefs`
        out). Mandatory keys are the caller's business: this reads what is stored."""
        return prefs.opted_out(self.layout, user_doc, key)

    def skipped(self, user_doc: Mapping[str, Any], spec: KeySpec) -> list[str]:
        """The channels of `spec` a create skips for this user, in the key's order: those
        they turned off; none for a mandatory key (the create path's `skipped`)."""
        if spec.mandatory:
            return []
        off = self.opted_out(user_doc, spec.name)
        return [channel for channel in spec.channels if channel in off]

    def in_app_allowed(self, key: str) -> Document:
        """The condition a create's `$push` filter adds so that a user who turned
        `key`'s in-app notifications off gets none (no extra command)."""
        return prefs.in_app_allowed(self.layout, key)

    # -- reads ---------------------------------------------------------------------------

    @guarded
    def get(self, user_id: str) -> Choices:
        """What the user has set: only the channels they turned on or off.

        :raise UserNotFound:
        """
        user = self.users.find_one(
            {"_id": ObjectId(user_id)}, projection=prefs.projection(self.layout)
        )
        if user is None:
            raise UserNotFound()
        return prefs.stored(self.layout, user)

    @guarded
    def email_allowed(self, user_ids: list[str], key: str) -> set[str]:
        """The users among `user_ids` that exist and have not turned `key`'s email off:
        one `find` (of 50 ids at most each), reading only that key's preferences."""
        allowed: set[str] = set()
        projection = prefs.projection(self.layout, key)
        for oids in id_batches(user_ids):
            for user in self.users.find({"_id": matching(oids)}, projection=projection):
                if "email" not in prefs.opted_out(self.layout, user, key):
                    allowed.add(str(user["_id"]))
        return allowed

    # -- writes --------------------------------------------------------------------------

    @guarded
    def update(self, user_id: str, changes: Mapping[str, Mapping[str, bool]]) -> Choices:
        """Set the given channels (the others stay), then read them all back.

        :raise UserNotFound: / :raise UserDocumentInvalid: the document cannot take them
            (its `<field>_prefs` is not a document, say).
        """
        oid = ObjectId(user_id)
        if changes:
            with self._refusals():
                matched = self.users.update_one(
                    {"_id": oid}, prefs.set_channels(self.layout, changes)
                ).matched_count
            if not matched:
                raise UserNotFound()
        # A separate read rather than findAndModify, which SecantusDB serves with a
        # collection scan (updates.py); a preferences change is rare.
        return self.get(user_id)

    @guarded
    def set_channel(self, user_id: str, key: str, channel: str, on: bool) -> bool:
        """Set one channel of one key unless it is so already; whether a write happened.
        A user who is gone, or already so, changes nothing.

        :raise UserDocumentInvalid:
        """
        query = prefs.changing(self.layout, ObjectId(user_id), key, channel, on)
        with self._refusals():
            result = self.users.update_one(
                query, prefs.set_channels(self.layout, {key: {channel: on}})
            )
        return result.modified_count > 0

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        """The server refusing the user's document (a field in the way, 16 MB, the
        application's validator) is a 409, as for the inbox's writes."""
        try:
            yield
        except OperationFailure as exc:
            if exc.code in DOCUMENT_REFUSALS:
                raise UserDocumentInvalid(
                    f"The user's document cannot take preferences in {self.field!r}.",
                    details=[{"field": self.field, "problem": "cannot hold preferences"}],
                ) from exc
            raise
