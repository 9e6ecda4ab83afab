"""What a digest needs of its users at due time, read in one round trip per 50 users.

A digest (outbox.py, digests.py) names the notifications of its batch; at due time
only those still in the user's array, unread and not expired go out. Reading them
beside the user's address and preferences, in the same aggregate, makes the check and
the content one consistent read of the user's document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo.collection import Collection
from pymongo.database import Database

from ..config import Config
from . import updates
from .ids import id_batches, matching
from .mongo_connector import Document, guarded
from .updates import Layout

UNREAD = "digest_unread"  # the field the read adds to each user document


class DigestStore:
    def __init__(self, db: Database[Document], config: Config) -> None:
        self.users: Collection[Document] = db[config.users_collection]
        self.layout = Layout.of(config)

    @guarded
    def unread(self, batches: dict[str, list[str]], now: datetime) -> dict[str, Document]:
        """Each existing user of `batches` (user id -> notification ids), by id: the user's
        document without the notifications array and its meta (the templates' `user`,
        with the address and the preferences), plus `digest_unread`: those of the
        notifications still in the array, unread and not expired, newest first.

        A notification id found in another user's batch is never in this user's array
        (ids are unique), so one list of all the batch's ids serves every user.
        """
        oids: list[ObjectId] = []
        for user_id in batches:
            try:
                oids.append(ObjectId(user_id))
            except (InvalidId, TypeError):
                continue  # no user of this API: found nowhere
        wanted = sorted({n for ids in batches.values() for n in ids})
        found: dict[str, Document] = {}
        for chunk in id_batches(oids):
            for doc in self.users.aggregate(self._pipeline(chunk, wanted, now)):
                found[str(doc["_id"])] = doc
        return found

    def _pipeline(self, oids: list[ObjectId], wanted: list[str], now: datetime) -> list[Any]:
        layout = self.layout
        unread = {
            "$filter": {
                "input": updates.live(layout, layout.cutoff(now)),
                "as": "n",
                "cond": {
                    "$and": [
                        {"$eq": ["$$n.is_new", True]},
                        {"$in": ["$$n.id", {"$literal": wanted}]},
                    ]
                },
            }
        }
        return [
            {"$match": {"_id": matching(oids)}},
            {"$set": {UNREAD: unread}},
            {"$project": {layout.field: 0, layout.meta: 0}},
        ]
