"""The email outbox: a MongoDB collection that the API writes and dispatchers drain.

A record's life (`Status`, the one list of statuses):

    pending -> queued                (see below)
    scheduled ----.                  (a digest, due at `next_attempt_at`)
    queued -------+-> sending -> sent | queued (retry) | failed | cancelled
                                     (claimed, with a lease)
    failed -> queued                 (a resend: `dead_letters.requeue`, its earlier life
                                     in `history`)

While a record is sending, `claimed_by` names the claim (a token per batch) and
`next_attempt_at` is the end of its lease, so one index, (status, next_attempt_at),
finds both what is due and what a dead dispatcher left.

A digest ("email if unread", digests.py) is a record of `kind: "digest"` opened as
`scheduled`, without content, by the first notification of its (user, key), which
later ones join (`digests.schedule_digest`) until its due time; the claim then closes
it (a later notification opens another), and the dispatcher either writes its content
(`digests.write_digests`) and sends it like any email, or `cancel`s it with a
`cancel_reason`.

This module is the queue itself; the concerns beside it, over the same collection, are
attributes of `Outbox`, each its own class: `digests` (storage/digest_outbox.py),
`dead_letters` (storage/dead_letter_store.py) and `user_emails`
(storage/user_email_store.py). Their indexes are created here, with the queue's.

Without transactions (a standalone server) a `new_login` writes its email first as
`pending`, which nothing claims or counts, and makes it `queued` (`activate`) once the
notification is in the user's array: the email never goes out for a request that
failed. A pending record whose request died between the steps is settled by the
dispatchers' sweep (`stale_pending`, then `activate` or `discard_pending`).

Sent, failed and cancelled records leave after OUTBOX_RETENTION_DAYS through TTL
indexes on `sent_at`, `failed_at` and `cancelled_at`, each restricted to its status,
so no other record is ever removed, whatever it holds in those fields.

Every write here is journaled (the client's write concern, mongo_connector.connect),
so an acknowledged claim or outcome survives a database crash: a claim found gone
later was taken over after its lease ran out, never lost to the crash. The one
exception is the send rate's document (`take_send_slot`), which only spaces sends.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, Literal, TypedDict

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, ReturnDocument, WriteConcern
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from .storage.dead_letter_store import DeadLetterStore
from .storage.digest_outbox import DigestOutbox
from .storage.mongo_connector import Document, guarded, only_duplicates
from .storage.user_email_store import UserEmailStore

Status = Literal["pending", "scheduled", "queued", "sending", "sent", "failed", "cancelled"]
# Why a record was cancelled instead of sent (issue 18 adds "erased").
CancelReason = Literal[
    "nothing_unread", "unsubscribed", "user_not_found", "user_has_no_email", "erased"
]
# Pending records are deliberately absent: they wait for their request (or the sweep).
CLAIMABLE: tuple[Status, ...] = ("scheduled", "queued", "sending")
# (index name, date field, the only status it may remove).
RETENTION_INDEXES: tuple[tuple[str, str, Status], ...] = (
    ("sent_retention", "sent_at", "sent"),
    ("failed_retention", "failed_at", "failed"),
    ("cancelled_retention", "cancelled_at", "cancelled"),
)
_INDEX_NOT_FOUND = 27
_INDEX_CONFLICTS = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
# The _id of the one document of `<outbox>_rate`.
_RATE_DOCUMENT = "smtp"


class LastError(TypedDict):
    code: int | None  # the SMTP reply code, None when there was no reply
    message: str
    permanent: bool  # a retry cannot help
    outage: bool  # the server was down or refused everyone, not just this email


class Outbox:
    def __init__(
        self, db: Database[Document], collection: str, *, retention_days: int | None = None
    ) -> None:
        """`retention_days`: OUTBOX_RETENTION_DAYS, which `ensure_indexes` applies (0 keeps
        records forever). None leaves the retention indexes as they are: for tools that
        use an outbox without owning its settings, which must not drop them."""
        self.records: Collection[Document] = db[collection]
        # Acknowledged by the primary alone: a slot lost to a crash or a failover lets
        # a few sends through early once, which is not worth a journal flush per email.
        self.rate: Collection[Document] = db.get_collection(
            f"{collection}_rate", write_concern=WriteConcern(w=1)
        )
        self.retention_days = retention_days
        self._listeners: list[Callable[[], None]] = []
        self._rng = random.Random()
        self._lock = threading.Lock()
        # The concerns beside the queue, each over the same collection: reached through
        # the outbox so that whoever holds one (Services, DispatchContext) holds them all.
        self.digests = DigestOutbox(self.records, self._wake)
        self.dead_letters = DeadLetterStore(self.records, self._wake)
        self.user_emails = UserEmailStore(self.records)

    @guarded
    def ensure_indexes(self) -> None:
        """Create the indexes, and bring the retention indexes to `retention_days`."""
        self.records.create_index(
            [("status", ASCENDING), ("next_attempt_at", ASCENDING)], name="due"
        )
        # One open digest per (user, key): two creates racing to open one make one
        # record (the loser's upsert fails on the index and joins it). Partial on the
        # status alone, the form SecantusDB and mongod both honour as unique (checked
        # with racing upserts); only digests are ever scheduled.
        self.records.create_index(
            [("user_id", ASCENDING), ("key", ASCENDING)],
            name="digest_open",
            unique=True,
            partialFilterExpression={"status": "scheduled"},
        )
        # A user's records, for an export or an erasure (`user_emails.of_user`): by id,
        # and the ones addressed without a user, by address. A rare read, but without
        # these it would scan every record kept for OUTBOX_RETENTION_DAYS.
        self.records.create_index([("user_id", ASCENDING)], name="user")
        self.records.create_index([("to", ASCENDING)], name="address")
        # The dead letters (GET /email?status=failed, newest first; bulk resends of
        # those failed before a time). Partial: only failed records are in it, so mongod
        # maintains nothing for the emails that go out. On SecantusDB at 5,000 records
        # (250 failed): a page 14 ms, a bulk resend's filter matching nothing 1 ms (14 ms
        # on the `due` index's status prefix alone), against 77-162 ms as a collection
        # scan (docs/operations.md, Dead letters).
        self.records.create_index(
            [("status", ASCENDING), ("failed_at", DESCENDING), ("_id", DESCENDING)],
            name="dead_letters",
            partialFilterExpression={"status": "failed"},
        )
        if self.retention_days is not None:
            self._ensure_retention(self.retention_days * 86400)

    def _ensure_retention(self, seconds: int) -> None:
        existing = self.records.index_information()
        for name, field, status in RETENTION_INDEXES:
            current = existing.get(name)
            if not seconds:
                if current is not None:
                    # Another process may have dropped it first.
                    with _ignoring(_INDEX_NOT_FOUND):
                        self.records.drop_index(name)
                continue
            if current is None:
                try:
                    self.records.create_index(
                        [(field, ASCENDING)],
                        name=name,
                        expireAfterSeconds=seconds,
                        # Restricted to its status: a queued, sending or pending record
                        # is never removed, whatever date it holds.
                        partialFilterExpression={"status": status},
                    )
                except OperationFailure as exc:
                    # Another process, started with another retention, created it
                    # between our look and our create: the latest setting wins.
                    if exc.code not in _INDEX_CONFLICTS:
                        raise
                    self._set_expiry(name, seconds)
            elif current.get("expireAfterSeconds") != seconds:
                # The operator changed OUTBOX_RETENTION_DAYS: create_index would refuse
                # the new value, collMod changes it in place (no rebuild).
                self._set_expiry(name, seconds)

    def _set_expiry(self, index: str, seconds: int) -> None:
        self.records.database.command(
            "collMod", self.records.name, index={"name": index, "expireAfterSeconds": seconds}
        )

    def on_enqueue(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each enqueue in this process (wakes an idle dispatcher)."""
        with self._lock:
            self._listeners.append(listener)

    def _wake(self) -> None:
        for listener in self._listeners:
            listener()

    @staticmethod
    def _new_record(
        record: Document, now: datetime, email_id: str | None, pending: bool
    ) -> Document:
        return {
            **record,
            "_id": ObjectId(email_id) if email_id is not None else ObjectId(),
            "status": "pending" if pending else "queued",
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
            "last_error": None,
            "sent_at": None,
            "claimed_by": None,
        }

    @guarded
    def enqueue(
        self,
        record: Document,
        now: datetime,
        *,
        email_id: str | None = None,
        pending: bool = False,
        session: Any = None,
    ) -> str:
        """Store a new email, due now; return its id. Durable once this returns.

        `email_id` (24 hex characters) presets the id, from the request's own IdBlock.
        `pending` stores it as pending: not sent until `activate` (or the sweep).
        `session`: a pymongo ClientSession whose transaction the insert joins.
        """
        doc = self._new_record(record, now, email_id, pending)
        try:
            self.records.insert_one(doc, session=session)
        except DuplicateKeyError:
            # A preset id comes from the request's own id block, so the record is this
            # request's earlier attempt (cut short, or its reply lost): already done.
            # In a transaction the error must abort it, so it goes to the caller.
            if session is not None or email_id is None:
                raise
        if not pending:
            self._wake()
        return str(doc["_id"])

    @guarded
    def enqueue_many(
        self,
        records: list[Document],
        now: datetime,
        *,
        email_ids: list[str],
        pending: bool = False,
        session: Any = None,
    ) -> list[str]:
        """Store several new emails with one insert; return their ids (`email_ids`).

        `email_ids` (24 hex characters each, one per record, in order) are preset ids
        from the request's IdBlock, so a retry of the request inserts nothing twice:
        without a session, records found already stored are taken as its earlier
        attempt. `pending` and `session` as for `enqueue`.
        """
        docs = [
            self._new_record(record, now, email_id, pending)
            for record, email_id in zip(records, email_ids, strict=True)
        ]
        if not docs:
            return []
        try:
            # Unordered: after a duplicate the rest are still inserted.
            self.records.insert_many(docs, ordered=False, session=session)
        except BulkWriteError as exc:
            if session is not None or not only_duplicates(exc):
                raise
        if not pending:
            self._wake()
        return [str(doc["_id"]) for doc in docs]

    @guarded
    def activate(self, email_ids: list[str], now: datetime) -> int:
        """Make pending emails queued and due now; return how many were pending."""
        if not email_ids:
            return 0
        result = self.records.update_many(
            {"_id": {"$in": _object_ids(email_ids)}, "status": "pending"},
            {"$set": {"status": "queued", "next_attempt_at": now}},
        )
        if result.modified_count:
            self._wake()
        return result.modified_count

    @guarded
    def stale_pending(self, before: datetime, limit: int) -> list[Document]:
        """Up to `limit` pending records written at or before `before`, oldest first:
        `_id`, `user_id` and `notification_id` (what the sweep needs to settle them)."""
        cursor = (
            self.records.find(
                {"status": "pending", "next_attempt_at": {"$lte": before}},
                projection={"_id": 1, "user_id": 1, "notification_id": 1},
            )
            .sort("next_attempt_at", ASCENDING)
            .limit(limit)
        )
        return list(cursor)

    @guarded
    def discard_pending(self, email_ids: list[str]) -> int:
        """Delete these emails if they are still pending; return how many were."""
        if not email_ids:
            return 0
        result = self.records.delete_many(
            {"_id": {"$in": _object_ids(email_ids)}, "status": "pending"}
        )
        return result.deleted_count

    @guarded
    def cancel(self, email_ids: list[Any], token: str, reason: CancelReason, now: datetime) -> int:
        """Cancel claimed records instead of sending them (while the claim `token` still
        holds them); return how many this call cancelled."""
        if not email_ids:
            return 0
        result = self.records.update_many(
            {"_id": {"$in": email_ids}, "status": "sending", "claimed_by": token},
            {
                "$set": {
                    "status": "cancelled",
                    "cancel_reason": reason,
                    "cancelled_at": now,
                    "claimed_by": None,
                }
            },
        )
        return result.modified_count

    @guarded
    def get(self, email_id: str) -> Document | None:
        """The record of `email_id` (24 hex characters, validated by the caller)."""
        return self.records.find_one({"_id": ObjectId(email_id)})

    @guarded
    def existing(self, email_ids: list[str], *, session: Any = None) -> set[str]:
        """Which of these emails are stored, in any status (a retried request's check);
        `session`: inside its transaction."""
        if not email_ids:
            return set()
        found = self.records.find(
            {"_id": {"$in": _object_ids(email_ids)}}, projection={"_id": 1}, session=session
        )
        return {str(doc["_id"]) for doc in found}

    @guarded
    def claim_batch(
        self, token: str, now: datetime, lease_seconds: float, limit: int
    ) -> list[Document]:
        """Atomically claim up to `limit` due records (or records whose lease ran out).

        Each record is claimed by a conditional update that re-checks it is still due,
        so two dispatchers can never both hold one; `token` (unique per batch) then
        finds exactly what this call won. Three operations per batch instead of a
        find_one_and_update per email: on SecantusDB the latter costs ~20 ms, which
        would cap a dispatcher thread at ~50 emails/s (docs/measurements-history.md).
        """
        for _ in range(3):
            ids = self._candidates(now, limit)
            if not ids:
                return []
            won = self.records.update_many(
                {"_id": {"$in": ids}, "status": {"$in": list(CLAIMABLE)}, **self._due(now)},
                {
                    "$set": {
                        "status": "sending",
                        "claimed_by": token,
                        "next_attempt_at": now + timedelta(seconds=lease_seconds),
                    },
                    "$inc": {"attempts": 1},
                },
            )
            if won.modified_count:
                claimed = self.records.find({"_id": {"$in": ids}, "claimed_by": token})
                # In the candidates' (due) order: the claim gave them all one lease end,
                # and ids preset from requests' id blocks say nothing about age.
                order = {email_id: n for n, email_id in enumerate(ids)}
                return sorted(claimed, key=lambda doc: order[doc["_id"]])
            # Every candidate went to another dispatcher first: look again at once,
            # rather than idling as if nothing were due.
        return []

    def _candidates(self, now: datetime, limit: int) -> list[Any]:
        # One query per status, each an equality on the index's first field: SecantusDB
        # answered a `$in` on status with a collection scan. Expired leases come first
        # (they waited longest), then due digests (they waited their whole delay). Of
        # the queued, twice the room is read and a random half kept, so that
        # dispatchers claiming at the same moment mostly reach for different emails;
        # the order stays oldest-first to within two batches.
        stale = self._due_ids("sending", now, limit)
        room = limit - len(stale)
        digests = self._due_ids("scheduled", now, room) if room else []
        room -= len(digests)
        queued = self._due_ids("queued", now, 2 * room) if room else []
        if len(queued) > room:
            kept = sorted(self._rng.sample(range(len(queued)), room))
            queued = [queued[n] for n in kept]
        return stale + digests + queued

    def _due_ids(self, status: Status, now: datetime, limit: int) -> list[Any]:
        cursor = (
            self.records.find({"status": status, **self._due(now)}, projection={"_id": 1})
            .sort("next_attempt_at", ASCENDING)
            .limit(limit)
        )
        return [doc["_id"] for doc in cursor]

    @staticmethod
    def _due(now: datetime) -> Document:
        return {"next_attempt_at": {"$lte": now}}

    @guarded
    def renew(
        self, email_ids: list[Any], token: str, now: datetime, lease_seconds: float
    ) -> set[Any]:
        """Extend a claim's lease from `now`; return the ids it still held."""
        query = {"_id": {"$in": email_ids}, "status": "sending", "claimed_by": token}
        result = self.records.update_many(
            query, {"$set": {"next_attempt_at": now + timedelta(seconds=lease_seconds)}}
        )
        if result.matched_count == len(email_ids):
            return set(email_ids)
        return {doc["_id"] for doc in self.records.find(query, projection={"_id": 1})}

    @guarded
    def release(self, email_ids: list[Any] | None, token: str, now: datetime) -> int:
        """Give back claimed, unattempted records so any dispatcher can take them now.

        `email_ids` None gives back whatever the claim `token` still holds: only for a
        claim none of whose emails was tried (its reply was lost, so its ids are unknown).
        """
        query: Document = {"status": "sending", "claimed_by": token}
        if email_ids is not None:
            query["_id"] = {"$in": email_ids}
        result = self.records.update_many(
            query,
            {
                "$set": {"status": "queued", "next_attempt_at": now, "claimed_by": None},
                "$inc": {"attempts": -1},
            },
        )
        return result.modified_count

    @guarded
    def next_due(self) -> datetime | None:
        """When the earliest claimable record falls due (lets an idle dispatcher sleep)."""
        times = [
            record["next_attempt_at"]
            for status in CLAIMABLE
            if (
                record := self.records.find_one(
                    {"status": status},
                    projection={"next_attempt_at": 1},
                    sort=[("next_attempt_at", ASCENDING)],
                )
            )
            is not None
        ]
        return min(times, default=None)

    @guarded
    def take_send_slot(self, interval_seconds: float) -> float:
        """Take the deployment's next send slot, `interval_seconds` after the previous
        one; return how many seconds from now it begins (0: at once).

        `<outbox>_rate` holds one document whose `next_at` is when the next slot is
        free, in milliseconds of the database's clock (`$$NOW`), so that the hosts'
        clocks play no part. One atomic update pipeline takes the slot: slot =
        max(now, next_at), next_at = slot + interval. Numbers, not dates, so that an
        interval below a millisecond still adds up. A findAndModify: on SecantusDB it
        reads the whole collection, which is this one document.
        """
        pipeline: list[Document] = [
            {"$set": {"now": {"$toDouble": "$$NOW"}}},
            {"$set": {"slot": {"$max": ["$now", {"$ifNull": ["$next_at", 0]}]}}},
            {"$set": {"next_at": {"$add": ["$slot", interval_seconds * 1000]}}},
        ]

        def take() -> Document:
            taken = self.rate.find_one_and_update(
                {"_id": _RATE_DOCUMENT},
                pipeline,
                projection={"_id": 0, "now": 1, "slot": 1},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
            assert taken is not None  # an upsert returning AFTER always has a document
            return taken

        try:
            taken = take()
        except DuplicateKeyError:
            # Two first slots at once: the other one inserted the document; use it.
            taken = take()
        return max(0.0, (float(taken["slot"]) - float(taken["now"])) / 1000)

    @guarded
    def mark_sent(self, email_ids: list[Any], now: datetime) -> int:
        """Record that the SMTP server accepted these emails; return how many this call
        recorded (the others were recorded already).

        Not conditional on holding the claim, unlike every other outcome: the email
        went out, and leaving its record claimable would send it again. If the lease
        ran out meanwhile and another dispatcher holds the email, that one's own
        outcome then finds the record sent and changes nothing.
        """
        result = self.records.update_many(
            # Nor over a record an erasure cancelled while it was in flight
            # (`user_emails.erase`):
            # it ends cancelled, without its address, whatever became of the send.
            {"_id": {"$in": email_ids}, "status": {"$nin": ["sent", "cancelled"]}},
            {"$set": {"status": "sent", "sent_at": now, "claimed_by": None}},
        )
        return result.modified_count

    @guarded
    def mark_retry(self, email_id: Any, worker: str, error: LastError, at: datetime) -> bool:
        return self._finish(
            email_id, worker, {"status": "queued", "last_error": error, "next_attempt_at": at}
        )

    @guarded
    def mark_failed(self, email_id: Any, worker: str, error: LastError, now: datetime) -> bool:
        return self._finish(
            email_id, worker, {"status": "failed", "last_error": error, "failed_at": now}
        )

    @guarded
    def release_backoffs(self, now: datetime) -> int:
        """Make every email waiting out an outage's backoff due now; return how many.

        Emails waiting because of their own 4xx (greylisting, a full mailbox) keep
        their backoff: the server being back says nothing about them.
        """
        result = self.records.update_many(
            {"status": "queued", "next_attempt_at": {"$gt": now}, "last_error.outage": True},
            {"$set": {"next_attempt_at": now}},
        )
        return result.modified_count

    def _finish(self, email_id: Any, worker: str, fields: Document) -> bool:
        # Conditional on still holding the claim, like healthchecks' "exactly one row".
        result = self.records.update_one(
            {"_id": email_id, "status": "sending", "claimed_by": worker},
            {"$set": {**fields, "claimed_by": None}},
        )
        return result.modified_count == 1

    @guarded
    def oldest_due(self, now: datetime) -> datetime | None:
        """When the longest-waiting due email (or digest) fell due (None when none is)."""
        times = [
            record["next_attempt_at"]
            for status in ("queued", "scheduled")
            if (
                record := self.records.find_one(
                    {"status": status, **self._due(now)},
                    projection={"next_attempt_at": 1},
                    sort=[("next_attempt_at", ASCENDING)],
                )
            )
            is not None
        ]
        return min(times, default=None)

    @guarded
    def backlog(self) -> dict[str, int]:
        """How many emails wait (queued), are being sent, and digests wait for their
        due time (scheduled), counted on the index."""
        return {status: self.records.count_documents({"status": status}) for status in CLAIMABLE}


def _object_ids(email_ids: list[str]) -> list[ObjectId]:
    return [ObjectId(email_id) for email_id in email_ids]


@contextlib.contextmanager
def _ignoring(code: int) -> Iterator[None]:
    try:
        yield
    except OperationFailure as exc:
        if exc.code != code:
            raise
