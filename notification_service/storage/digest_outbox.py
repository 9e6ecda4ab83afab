"""The outbox's digest records: opened and joined at create time, written at due time.

A digest ("email if unread", digests.py) is an outbox record of `kind: "digest"` opened
as `scheduled`, without content, by the first notification of its (user, key), which
later ones join (`schedule_digest`) until its due time; the claim (Outbox.claim_batch)
then closes it (a later notification opens another), and the dispatcher either writes
its content (`write_digests`) and sends it like any email, or cancels it
(Outbox.cancel) with a `cancel_reason`. The `digest_open` index they rely on is created
with the outbox's (Outbox.ensure_indexes).

The reads of the users a digest needs at due time are digest_store.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, DuplicateKeyError

from .mongo_connector import Document, guarded, only_duplicates

DIGEST = "digest"  # the `kind` of a digest record


class DigestOutbox:
    """The digest writes of the outbox's collection (Outbox.digests)."""

    def __init__(self, records: Collection[Document], wake: Callable[[], None]) -> None:
        """`records`: the outbox's collection; `wake`: the outbox's, called when a
        digest is opened (a new due time for the idle dispatchers)."""
        self.records = records
        self._wake = wake

    @guarded
    def schedule_digest(
        self, user_id: str, key: str, notification_id: str, now: datetime, delay_seconds: float
    ) -> str | None:
        """Add a notification to the user's open digest of `key`, opening one due
        `delay_seconds` from `now` if none is open; return the digest's id when this
        opened it, None when it joined one.

        One upsert on the `digest_open` index: the first notification opens the batch,
        later ones join it (their wait is shorter than their delay) until a dispatcher
        claims it. Called before the notification is pushed, so no transaction is
        needed: an id whose push never happened is simply not found at due time.

        A joined batch's id is not in an update's answer: reading it would cost every
        create one more command (1.2 ms on SecantusDB), and findAndModify a collection
        scan there (220 ms at 20,000 records), for an id the create's answer does not
        show (its email_id is null). `open_digest_id` reads it when wanted.
        """
        query = _open_digest(user_id, key)
        update = _join(notification_id, ObjectId(), user_id, key, now, delay_seconds)
        try:
            result = self.records.update_one(query, update, upsert=True)
        except DuplicateKeyError:
            # Another create opened it between our look and our insert (mongod; SecantusDB
            # serialises the two): it is there now, so this joins it.
            result = self.records.update_one(query, update, upsert=True)
        if result.upserted_id is None:
            return None
        # A new due time: idle dispatchers of this process look again at when to wake
        # (next_due), rather than at the end of a long poll. A join changes no due time.
        self._wake()
        return str(result.upserted_id)

    @guarded
    def open_digest_id(self, user_id: str, key: str) -> str | None:
        """The id of the user's open (scheduled) digest of `key`, if one is open."""
        found = self.records.find_one(_open_digest(user_id, key), {"_id": 1})
        return None if found is None else str(found["_id"])

    @guarded
    def schedule_digests(
        self, entries: list[tuple[str, str]], key: str, now: datetime, delay_seconds: float
    ) -> dict[str, str]:
        """`schedule_digest` for each (user_id, notification_id) of a fan-out, in one
        bulk write; return the digests it opened, by user id (those joined are not
        named: their ids would cost a read per user)."""
        if not entries:
            return {}
        requests = [
            UpdateOne(
                _open_digest(user_id, key),
                _join(notification_id, ObjectId(), user_id, key, now, delay_seconds),
                upsert=True,
            )
            for user_id, notification_id in entries
        ]
        opened: dict[str, str] = {}
        try:
            result = self.records.bulk_write(requests, ordered=False)
            upserted = dict(result.upserted_ids or {})
        except BulkWriteError as exc:
            if not only_duplicates(exc):
                raise
            # Opens that lost a race to another create: they join its batch now.
            lost = sorted(error["index"] for error in exc.details["writeErrors"])
            upserted = {u["index"]: u["_id"] for u in exc.details.get("upserted", [])}
            retried = self.records.bulk_write([requests[i] for i in lost], ordered=False)
            again = retried.upserted_ids or {}
            upserted.update({i: again[n] for n, i in enumerate(lost) if n in again})
        for index, digest_id in upserted.items():
            opened[entries[index][0]] = str(digest_id)
        if opened:
            self._wake()  # as schedule_digest
        return opened

    @guarded
    def write_digests(self, contents: list[tuple[Any, str, Document]]) -> set[Any]:
        """Store the rendered content of claimed digests, each (id, the claim's token,
        fields) in one bulk write; return the ids whose claim still held (the others
        belong to whoever took them over, and are not to be sent by this claim)."""
        if not contents:
            return set()
        result = self.records.bulk_write(
            [
                UpdateOne(
                    {"_id": digest_id, "status": "sending", "claimed_by": token}, {"$set": fields}
                )
                for digest_id, token, fields in contents
            ],
            ordered=False,
        )
        ids = [digest_id for digest_id, _, _ in contents]
        if result.matched_count == len(contents):
            return set(ids)
        # Which were written: a bulk write counts, it does not name.
        held = self.records.find(
            {"_id": {"$in": ids}, "claimed_by": {"$in": list({t for _, t, _ in contents})}},
            projection={"_id": 1, "claimed_by": 1},
        )
        tokens = {digest_id: token for digest_id, token, _ in contents}
        return {doc["_id"] for doc in held if tokens[doc["_id"]] == doc["claimed_by"]}


def _open_digest(user_id: str, key: str) -> Document:
    """The open digest of (user, key): the `digest_open` index's fields and partial
    filter, and nothing else: SecantusDB answers a filter with one more field (even
    `kind`) with a collection scan (6-9 ms against 0.8 ms at 300 digests). Only
    digests are ever scheduled, so the status says it is one."""
    return {"user_id": user_id, "key": key, "status": "scheduled"}


# The ids a digest keeps, the newest: twice the most a user's array holds
# (NOTIFICATIONS_LIMIT is at most 500), so that ids repeated or of notifications since
# deleted leave room for every one that can still be listed.
DIGEST_IDS_MAX = 1000


def _join(
    notification_id: str,
    digest_id: ObjectId,
    user_id: str,
    key: str,
    now: datetime,
    delay_seconds: float,
) -> Document:
    """Add the notification to the open digest, opening it (as `digest_id`) if none is.

    No content yet (`to`, `subject`, ...): it is rendered at due time from what is
    still unread then, by digests.py.
    """
    return {
        "$setOnInsert": {
            "_id": digest_id,
            "kind": DIGEST,
            "user_id": user_id,
            "key": key,
            "status": "scheduled",
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now + timedelta(seconds=delay_seconds),
            # Where its give-up age starts (dispatcher._too_old): a batch waits its
            # delay before its first attempt, an email queued at once none.
            "due_at": now + timedelta(seconds=delay_seconds),
            "last_error": None,
            "sent_at": None,
            "claimed_by": None,
        },
        # Appended, the newest DIGEST_IDS_MAX kept: a busy key's batch stays bounded, and
        # so does each join's cost ($addToSet compares every element: 35 ms a create at
        # 5,000 ids on SecantusDB, against 1 ms for this at any length). A repeated id (a
        # retried create, a thread collapsed into again) comes again at the end; the
        # due-time step reads the list as a set.
        "$push": {"notification_ids": {"$each": [notification_id], "$slice": -DIGEST_IDS_MAX}},
    }
