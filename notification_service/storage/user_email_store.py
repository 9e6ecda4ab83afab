"""The outbox's records of one user, for an export or an erasure (user_data.py).

The `user` and `address` indexes these reads use are created with the outbox's
(Outbox.ensure_indexes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypedDict

from pymongo.collection import Collection

from .mongo_connector import Document, guarded


class UserEmailStore:
    """A user's records in the outbox's collection (Outbox.user_emails)."""

    def __init__(self, records: Collection[Document]) -> None:
        """`records`: the outbox's collection."""
        self.records = records

    @guarded
    def of_user(
        self, user_id: str, addresses: list[str], projection: Document | None = None
    ) -> list[Document]:
        """The records of a user: those of `user_id`, and those sent to one of
        `addresses` with no user (POST /email's `to`; its domain in any case), newest
        first.

        A record of ANOTHER user sent to the same address is not theirs: an address two
        users share is each one's, and one's erasure must not touch the other's data.
        One indexed query per field (SecantusDB scans the collection for an `$or`).
        """
        projection = self._with_user(projection)
        found = {doc["_id"]: doc for doc in self.records.find({"user_id": user_id}, projection)}
        for address in addresses:
            for doc in self.records.find(_to_mailbox(address), _with_to(projection)):
                if doc.get("user_id") is None and _same_mailbox(doc.get("to"), address):
                    found.setdefault(doc["_id"], doc)
        return sorted(found.values(), key=lambda doc: (doc["created_at"], doc["_id"]), reverse=True)

    @staticmethod
    def _with_user(projection: Document | None) -> Document | None:
        if projection is None:
            return None
        return {**projection, "user_id": 1, "created_at": 1}

    @guarded
    def erase(self, email_ids: list[Any], now: datetime) -> ErasedEmails:
        """Erase these records (a user's, from `of_user`); say how many of each kind.

        Not sent yet (pending, scheduled, queued), or in flight (sending: claimed by a
        dispatcher): cancelled with `cancel_reason: "erased"` and stripped to a tombstone
        of their state and times (`_TOMBSTONE`): nothing of the person, their address
        or the content stays, and GET /email/<id> tells whoever queued one why it never
        went, until OUTBOX_RETENTION_DAYS removes it as any cancelled record. An email
        in flight has lost its claim: no retry or failure of that dispatcher is
        recorded on it (they need the claim), nor a send (`mark_sent` spares cancelled
        records), so it ends cancelled without its address even if the SMTP server
        accepted it meanwhile (`in_flight` counts those: they may have gone out).

        Finished (sent, failed, cancelled before): deleted. Nothing waits on them; an
        anonymised copy would keep whatever fields later versions add (an error that
        quotes the address, say).

        Unsent first, then finished: a record that was sending at the first step is
        cancelled before its send can be recorded, and one that finished meanwhile is
        deleted at the second. Repeated while the unsent step still changes something
        (a claim given back to queued between the two commands).
        """
        if not email_ids:
            return {"cancelled": 0, "in_flight": 0, "deleted": 0}
        cancelled = in_flight = 0
        ids = {"_id": {"$in": email_ids}}
        tombstone: list[Document] = [
            {"$project": dict.fromkeys(_TOMBSTONE, 1)},
            {
                "$set": {
                    "status": "cancelled",
                    "cancel_reason": "erased",
                    "cancelled_at": now,
                    "claimed_by": None,
                }
            },
        ]
        for _ in range(5):
            waiting = self.records.update_many(
                {**ids, "status": {"$in": ["pending", "scheduled", "queued"]}}, tombstone
            ).modified_count
            sending = self.records.update_many({**ids, "status": "sending"}, tombstone)
            cancelled += waiting + sending.modified_count
            in_flight += sending.modified_count
            if not (waiting or sending.modified_count):
                break
        deleted = self.records.delete_many(
            {
                **ids,
                "status": {"$in": ["sent", "failed", "cancelled"]},
                # This erasure's own tombstones (and an earlier one's) stay.
                "cancel_reason": {"$ne": "erased"},
            }
        ).deleted_count
        return {"cancelled": cancelled, "in_flight": in_flight, "deleted": deleted}


class ErasedEmails(TypedDict):
    cancelled: int  # not sent yet or in flight: now tombstones
    in_flight: int  # of those, claimed by a dispatcher: they may have gone out
    deleted: int  # sent, failed or cancelled before


# What a tombstone keeps of an erased record: its state and times, and the key (a name
# of the service's table). No user id, address, subject, content, Message-ID, error or
# unsubscribe link.
_TOMBSTONE = ("_id", "kind", "key", "attempts", "created_at", "next_attempt_at")


def _to_mailbox(address: str) -> Document:
    """The filter of the records sent to `address`'s mailbox, whatever the case of its
    domain (which has none, RFC 5321 2.4; its local part may): every `to` that starts
    with the local part and "@", a range of the `address` index ("@" + 1 is "A"), which
    `_same_mailbox` then narrows to the domain."""
    local, at, _ = address.rpartition("@")
    if not at:
        return {"to": address}
    return {"to": {"$gte": f"{local}@", "$lt": f"{local}A"}}


def _same_mailbox(to: Any, address: str) -> bool:
    if not isinstance(to, str):
        return False
    local, _, domain = to.rpartition("@")
    wanted_local, _, wanted_domain = address.rpartition("@")
    return local == wanted_local and domain.lower() == wanted_domain.lower()


def _with_to(projection: Document | None) -> Document | None:
    return None if projection is None else {**projection, "to": 1}
